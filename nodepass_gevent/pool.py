"""Pools of pre-dialed data connections, one kind per role.

Server side: connections the client dialed in, each filed under the id the
server wrote on it, handed out first-in first-out, checked alive before use.
Client side: connections dialed ahead of time, looked up by the id named in a
launch signal; refilled as soon as one is used, sized by the v1.0 rule
(about once a second: fewer than 20% of capacity created -> shrink by one,
more than 80% -> grow by one, within MIN/MAX_POOL_CAPACITY).
"""

import socket
import time
from collections import OrderedDict, deque
from typing import Callable, Dict, Optional, Tuple

import gevent
import gevent.pool
from gevent.event import AsyncResult, Event
from gevent.queue import Empty, Queue

from nodepass_gevent import net
from nodepass_gevent.log import log
from nodepass_gevent.lifecycle import Component

DataConnection = Tuple[str, socket.socket]

ADJUST_INTERVAL = 1.0     # seconds between capacity adjustments (v1.0's round)
GROW_RATIO, SHRINK_RATIO = 0.8, 0.2
MAX_PARALLEL_DIALS = 64   # dials in flight at once while refilling
DIAL_BACKOFF_FIRST, DIAL_BACKOFF_MAX = 0.1, 5.0
ID_ARRIVAL_WAIT = 2.0     # how long a launch may wait for its id to be read
# More than capacity/3 launches naming unknown ids within this many seconds
# mean the server's pool and ours disagree: ours is flushed. Rare misses
# spread over a long life are noise, not disagreement.
MISS_WINDOW = 10.0
# What a failed dial raises (socket, TLS and protocol errors): retried with
# back-off. Anything else is a bug and fails the client (lifecycle.py).
DIAL_FAILURES = (OSError, ValueError)


class ServerPool:
    """Data connections waiting on the server, first in, first out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue = Queue()
        self.closed = False

    @property
    def idle(self) -> int:
        return self._queue.qsize()

    def add(self, connection_id: str, sock: socket.socket) -> bool:
        """File a new connection; False (caller closes it) when the pool is full or closed."""
        if self.closed or self._queue.qsize() >= self.capacity:
            return False
        self._queue.put((connection_id, sock))
        return True

    def take(self, timeout: float) -> Optional[DataConnection]:
        """The oldest live connection, waiting up to ``timeout`` for one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                connection_id, sock = self._queue.get(
                    timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                return None
            if net.is_idle(sock):
                return connection_id, sock
            log.debug("Pool: data connection %s is closed or not silent; dropped", connection_id)
            net.close_quietly(sock)

    def close(self) -> None:
        """Take no more connections, and close the waiting ones. Never raises."""
        self.closed = True
        self.flush()

    def flush(self) -> None:
        """Close every waiting connection (they belong to a client that is gone)."""
        while True:
            try:
                _, sock = self._queue.get_nowait()
            except Empty:
                return
            net.close_quietly(sock)


class ClientPool:
    """Pre-dialed data connections on the client, looked up by id; its manager
    greenlet runs under the owner's ``supervisor`` (and logs through it)."""

    def __init__(self, dial: Callable[[], DataConnection], min_capacity: int,
                 max_capacity: int, supervisor: Component) -> None:
        self._dial = dial
        self._supervisor = supervisor
        self.log = supervisor.log
        self.min_capacity, self.max_capacity = min_capacity, max_capacity
        self.capacity = min_capacity
        self._idle = OrderedDict()  # type: OrderedDict[str, socket.socket]
        self._waiters = {}  # type: Dict[str, AsyncResult]
        self._dialers = gevent.pool.Pool(MAX_PARALLEL_DIALS)
        self._wakeup = Event()
        self._created = 0   # since the last capacity adjustment
        self._misses = deque()  # when each recent miss happened (monotonic seconds)
        self._failures = 0  # dials failed in a row
        self._manager = None
        self.closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    def start(self) -> None:
        self._manager = self._supervisor.spawn(self._manage)

    def take(self, connection_id: str) -> Optional[socket.socket]:
        """The connection filed under ``connection_id``, or None if it never comes."""
        sock = self._idle.pop(connection_id, None)
        if sock is None and len(self._dialers) > 0 and not self.closed:
            # The server may signal an id before we finished reading it off
            # its connection (docs/protocol.md, "Signal before id"): wait briefly.
            waiter = self._waiters.setdefault(connection_id, AsyncResult())
            sock = waiter.wait(timeout=ID_ARRIVAL_WAIT)
            self._waiters.pop(connection_id, None)
        self._wakeup.set()
        if sock is None:
            self._count_miss(connection_id)
        return sock

    def close(self) -> None:
        """Stop refilling and close every idle connection. Never raises."""
        self.closed = True
        if self._manager is not None:
            self._manager.kill(block=False)
        self._dialers.kill(block=False)
        self.flush()

    def flush(self) -> None:
        while self._idle:
            _, sock = self._idle.popitem(last=False)
            net.close_quietly(sock)

    def _file(self, connection_id: str, sock: socket.socket) -> None:
        waiter = self._waiters.pop(connection_id, None)
        if waiter is not None:
            waiter.set(sock)
        elif self.closed:
            net.close_quietly(sock)
        else:
            self._idle[connection_id] = sock

    def _count_miss(self, connection_id: str) -> None:
        now = time.monotonic()
        misses = self._misses
        misses.append(now)
        while misses[0] < now - MISS_WINDOW:
            misses.popleft()
        self.log.warning("Pool: no data connection with id %s", connection_id)
        if len(misses) > self.capacity / 3:
            self.log.warning("Pool: %d launches named unknown ids; flushing the pool", len(misses))
            misses.clear()
            self.flush()

    def _manage(self) -> None:
        next_adjust = time.monotonic() + ADJUST_INTERVAL
        backoff = net.Backoff(DIAL_BACKOFF_FIRST, DIAL_BACKOFF_MAX)
        while not self.closed:
            self._wakeup.clear()
            if self._fill():
                backoff.reset()
            else:
                gevent.sleep(backoff.pause())
            self._wakeup.wait(timeout=max(0.0, next_adjust - time.monotonic()))
            if time.monotonic() >= next_adjust:
                self._drop_dead()
                self._adjust()
                next_adjust = time.monotonic() + ADJUST_INTERVAL

    def _fill(self) -> bool:
        """Dial until idle connections reach capacity; False if a dial failed."""
        missing = self.capacity - len(self._idle)
        if missing <= 0:
            return True
        results = list(self._dialers.imap_unordered(self._dial_one, range(missing)))
        return all(results)

    def _dial_one(self, _index: int) -> bool:
        try:
            connection_id, sock = self._dial()
        except DIAL_FAILURES as exc:  # retried by the manager
            self._failures += 1
            if self._failures == 1:  # the first of a streak is news; the rest are noise
                self.log.warning("Pool: data connection failed: %s (retrying with backoff)", exc)
            else:
                self.log.debug("Pool: data connection failed: %s", exc)
            return False
        if self._failures:
            self.log.info("Pool: data connections work again after %d failures", self._failures)
            self._failures = 0
        self._created += 1
        self._file(connection_id, sock)
        return True

    def _drop_dead(self) -> None:
        """Close idle connections the server (or a firewall timing out) closed,
        so that the next fill replaces them."""
        dead = set(net.closed_by_peer(self._idle.values()))
        if not dead:
            return
        for connection_id, sock in list(self._idle.items()):
            if sock in dead:
                del self._idle[connection_id]
                net.close_quietly(sock)
        self.log.debug("Pool: %d idle data connections were closed by the server; replacing them",
                  len(dead))

    def _adjust(self) -> None:
        created, self._created = self._created, 0
        if created < SHRINK_RATIO * self.capacity:
            self.capacity = max(self.min_capacity, self.capacity - 1)
        elif created > GROW_RATIO * self.capacity:
            self.capacity = min(self.max_capacity, self.capacity + 1)
