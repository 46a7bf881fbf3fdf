"""Pools of pre-dialed data connections, one kind per role.

Server side: connections the client dialed in, each filed under the id the
server wrote on it, handed out first-in first-out, checked alive before use.
Client side: connections dialed ahead of time, looked up by the id named in a
launch signal; refilled as soon as one is used, sized by the v1.0 rule
(about once a second: fewer than 20% of capacity created -> shrink by one,
more than 80% -> grow by one, within MIN/MAX_POOL_CAPACITY).

The client refills from the take that used a connection and from each dial
that ends, at once: a refill that waited for the manager greenlet could miss
its wake-up (a dial's greenlet still counted as dialing when its wake-up ran)
and leave every user waiting on the server's empty pool until the next
capacity round, a second later.
"""

import logging
import socket
import time
from collections import OrderedDict, deque
from typing import Callable, Dict, Optional, Tuple

import gevent
import gevent.pool
from gevent.event import AsyncResult, Event
from gevent.queue import Empty, Queue

from nodepass_gevent.base import health, net
from nodepass_gevent.base.lifecycle import Component
from nodepass_gevent.log import log
from nodepass_gevent.wire.v1.protocol import HANDSHAKE_TIMEOUT

DataConnection = Tuple[str, socket.socket]

ADJUST_INTERVAL = 1.0     # seconds between capacity adjustments (v1.0's round)
GROW_RATIO, SHRINK_RATIO = 0.8, 0.2
MAX_PARALLEL_DIALS = 64   # dials in flight at once while refilling
DIAL_BACKOFF_FIRST, DIAL_BACKOFF_MAX = 0.1, 5.0
# How long a launch may wait for its id to be read: as long as a dial in
# flight may still deliver one (it reads the id within HANDSHAKE_TIMEOUT). On
# a congested link a dropped id segment waits for TCP's retransmission, which
# can take seconds; 2 s lost launches behind a 2 Mbit/s bottleneck.
ID_ARRIVAL_WAIT = HANDSHAKE_TIMEOUT
# Ids whose launch gave up waiting, kept so that a connection that brings one
# later is closed, not pooled: the server handed it to a user already, and a
# close ends that user at once where a pooled connection would leave it hanging.
GIVEN_UP_REMEMBERED = 1024
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
        # For starved_for(): when a connection last came, when the pool last ran dry.
        self._last_filed = self._emptied_at = time.monotonic()

    @property
    def idle(self) -> int:
        return self._queue.qsize()

    def describe(self) -> str:
        """The pool in the report line. The client decides how many connections
        wait here; ``capacity`` is only the most this side keeps
        (MAX_POOL_CAPACITY), which is why it reads larger than the client's."""
        return "idle=%d (dialed in by the client; room for %d)" % (self.idle, self.capacity)

    def starved_for(self, since: float) -> float:
        """Seconds the pool has been empty with no connection coming, counted
        from ``since`` at the earliest (the session's start); 0 while one waits."""
        if self._queue.qsize():
            return 0.0
        return time.monotonic() - max(since, self._last_filed, self._emptied_at)

    def add(self, connection_id: str, sock: socket.socket) -> bool:
        """File a new connection; False (caller closes it) when the pool is full or closed."""
        if self.closed or self._queue.qsize() >= self.capacity:
            return False
        self._queue.put((connection_id, sock))
        self._last_filed = time.monotonic()
        return True

    def take(self, timeout: float) -> Optional[DataConnection]:
        """The oldest live connection, waiting up to ``timeout`` for one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                taken = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                return None
            if self._checked(*taken):
                return taken

    def take_now(self) -> Optional[DataConnection]:
        """take() without waiting (an event-loop callback's): None if none is here."""
        while self._queue.qsize():
            taken = self._queue.get_nowait()
            if self._checked(*taken):
                return taken
        return None

    def _checked(self, connection_id: str, sock: socket.socket) -> bool:
        """Whether a connection just taken is live; a dead one is closed."""
        if not self._queue.qsize():
            self._emptied_at = time.monotonic()
        if net.is_idle(sock):
            return True
        log.debug("Pool: data connection %s is closed or not silent; dropped", connection_id)
        net.close_quietly(sock)
        return False

    # v1.14's verify names one connection (wire/v114/control.py). gevent's Queue
    # keeps its items in the deque ``queue``; only getters wait on it, and they
    # wait only while it is empty, so taking one from the middle wakes no one.

    def newest_id(self) -> Optional[str]:
        """The id of the connection filed last, or None (the v1.14 verify's pick)."""
        waiting = self._queue.queue
        return waiting[-1][0] if waiting else None

    def take_named(self, connection_id: str) -> Optional[socket.socket]:
        """The waiting connection filed under ``connection_id``, or None."""
        waiting = self._queue.queue
        for item in waiting:
            if item[0] == connection_id:
                waiting.remove(item)
                if not waiting:
                    self._emptied_at = time.monotonic()
                return item[1]
        return None

    def ids(self) -> set:
        """The ids of the waiting connections (a new one must not repeat one)."""
        return {item[0] for item in self._queue.queue}

    def close(self) -> None:
        """Take no more connections, and close the waiting ones. Never raises."""
        self.closed = True
        self.flush()

    def flush(self) -> None:
        """Close every waiting connection (they belong to a client that is gone)."""
        self._emptied_at = time.monotonic()
        while True:
            try:
                _, sock = self._queue.get_nowait()
            except Empty:
                return
            net.close_quietly(sock)


class ClientPool:
    """Pre-dialed data connections on the client, looked up by id; its manager
    greenlet runs under the owner's ``supervisor`` (and logs through it).

    ``dial()`` dials one connection, in a greenlet of its own. ``start_dial``,
    if given, is tried first: ``start_dial(on_done)`` starts a dial driven
    from event-loop callbacks (dataconn.Dialer.start) and returns it, or
    returns None when it cannot (then ``dial`` runs). ``remedy(error)``, if
    given, says what to do about a failed dial (logged with the failure).
    """

    def __init__(self, dial: Callable[[], DataConnection], min_capacity: int,
                 max_capacity: int, supervisor: Component,
                 start_dial: Optional[Callable] = None,
                 remedy: Optional[Callable[[BaseException], str]] = None) -> None:
        self._dial = dial
        self._start_dial = start_dial
        self._remedy = remedy
        self._loop_dials = set()  # dials under way in callbacks (start_dial's)
        self._supervisor = supervisor
        self.log = supervisor.log
        self.min_capacity, self.max_capacity = min_capacity, max_capacity
        self.capacity = min_capacity
        self._idle = OrderedDict()  # type: OrderedDict[str, socket.socket]
        self._waiters = {}  # type: Dict[str, AsyncResult]
        self._dialers = gevent.pool.Group()  # bounded by _dialing, which never waits
        self._dialing = 0   # dials in flight (exact: a finished dial is out before it refills)
        self._wakeup = Event()
        self._loop = gevent.get_hub().loop
        self._created = 0   # since the last capacity adjustment
        self._misses = deque()  # when each recent miss happened (monotonic seconds)
        self._given_up = OrderedDict()  # type: OrderedDict[str, None]  (see GIVEN_UP_REMEMBERED)
        self._failures = 0  # dials failed in a row
        self.streak = health.Streak()  # the same failures, for the log and the health verdict
        # For starved_for(): the last dial that worked, when the pool last ran dry.
        self._last_success = self._emptied_at = time.monotonic()
        self._bug = None  # type: Optional[BaseException]  (raised by a dial: see _manage)
        self._manager = None
        self.closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    def describe(self) -> str:
        """The pool in the report line: idle connections and the target it
        refills to, which adapts within MIN/MAX_POOL_CAPACITY (_adjust).

        Idle can exceed the target: when the target shrinks, or a dial under
        way lands after it did, the connections already open are kept until
        used rather than closed (the server may be handing one to a user).
        """
        text = "idle=%d target=%d (adapts within %d..%d)" % (
            self.idle, self.capacity, self.min_capacity, self.max_capacity)
        surplus = self.idle - self.capacity
        if surplus > 0:
            text = text[:-1] + "; %d over target after it shrank, kept until used)" % surplus
        return text

    def starved_for(self) -> float:
        """Seconds with no connection idle and none dialed since the pool ran
        dry (or since it started); 0 while one is idle."""
        if self._idle or self.closed:
            return 0.0
        return time.monotonic() - max(self._last_success, self._emptied_at)

    @property
    def dials_under_way(self) -> int:
        return self._dials_under_way()

    def start(self) -> None:
        self._manager = self._supervisor.spawn(self._manage)

    def take(self, connection_id: str) -> Optional[socket.socket]:
        """The connection filed under ``connection_id``, or None if it never comes."""
        sock = self._idle.pop(connection_id, None)
        if sock is not None and not self._idle:
            self._emptied_at = time.monotonic()
        if sock is None and self._dials_under_way() > 0 and not self.closed:
            # The server may signal an id before we finished reading it off
            # its connection (docs/protocol.md, "Signal before id"): wait briefly.
            waiter = self._waiters.setdefault(connection_id, AsyncResult())
            sock = waiter.wait(timeout=ID_ARRIVAL_WAIT)
            self._waiters.pop(connection_id, None)
        self._loop.run_callback(self._refill)  # once this launch waits: not before it
        if sock is None:
            self._given_up[connection_id] = None
            while len(self._given_up) > GIVEN_UP_REMEMBERED:
                self._given_up.popitem(last=False)
            self._count_miss(connection_id)
        return sock

    def take_now(self, connection_id: str) -> Optional[socket.socket]:
        """take() if the connection is here already; None (nothing done) if it
        is not: then take() waits for it, in a greenlet."""
        sock = self._idle.pop(connection_id, None)
        if sock is not None:
            if not self._idle:
                self._emptied_at = time.monotonic()
            self._loop.run_callback(self._refill)
        return sock

    def newest_id(self) -> Optional[str]:
        """The id of the connection pooled last, or None (the v1.14 verify's pick)."""
        return next(reversed(self._idle), None)

    def close(self) -> None:
        """Stop refilling and close every idle connection. Never raises."""
        self.closed = True
        if self._manager is not None:
            self._manager.kill(block=False)
        self._dialers.kill(block=False)
        for dial in list(self._loop_dials):
            dial.cancel()
        self._loop_dials.clear()
        self.flush()

    def flush(self) -> None:
        if self._idle:
            self._emptied_at = time.monotonic()
        while self._idle:
            _, sock = self._idle.popitem(last=False)
            net.close_quietly(sock)

    def _file(self, connection_id: str, sock: socket.socket) -> None:
        waiter = self._waiters.pop(connection_id, None)
        if waiter is not None:
            waiter.set(sock)
        elif self._given_up.pop(connection_id, 0) is None:
            self.log.warning("Pool: data connection %s came after its launch gave up; closed",
                             connection_id)
            net.close_quietly(sock)
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
            if self._bug is not None:
                raise self._bug  # here, in the supervised manager: it fails the owner
            if self._failures:
                gevent.sleep(backoff.pause())  # the last dial failed: not again at once
            else:
                backoff.reset()
            self._top_up()
            self._wakeup.wait(timeout=max(0.0, next_adjust - time.monotonic()))
            if time.monotonic() >= next_adjust:
                self._drop_dead()
                self._adjust()
                next_adjust = time.monotonic() + ADJUST_INTERVAL

    def _dials_under_way(self) -> int:
        return self._dialing + len(self._loop_dials)

    def _top_up(self) -> None:
        """Start dials until idle plus dialing connections reach capacity.

        Called as each dial ends (and after each take), so the pool refills
        one connection at a time as dials finish: a slow one (a SYN lost on a
        bad link costs a second) holds up only itself, not a whole batch.
        """
        if self.closed:
            return
        under_way, failures = self._dials_under_way(), self._failures
        missing = self.capacity - len(self._idle) - under_way
        for _ in range(min(missing, MAX_PARALLEL_DIALS - under_way)):
            if not self._start_loop_dial():
                self._dialing += 1
                self._dialers.spawn(self._dial_and_refill)
            if self._failures > failures or self._bug is not None:
                return  # could not even start one: the manager retries after its back-off

    def _start_loop_dial(self) -> bool:
        """A dial from callbacks, if ``start_dial`` can; False: use a greenlet."""
        if self._start_dial is None:
            return False
        try:
            dial = self._start_dial(self._loop_dial_done)
        except DIAL_FAILURES as exc:
            self._dial_failed(exc)
            self._wakeup.set()
            return True
        except BaseException as exc:  # noqa: B902 - not a dial failure: a bug
            self._bug = exc  # raised by the manager (this may be an event-loop callback)
            self._wakeup.set()
            return True
        if dial is None:
            return False
        self._loop_dials.add(dial)
        return True

    def _loop_dial_done(self, dial, connection: Optional[DataConnection],
                        error: Optional[BaseException]) -> None:
        """A callback dial ended (in an event-loop callback: must not block)."""
        self._loop_dials.discard(dial)
        if connection is None and not isinstance(error, DIAL_FAILURES):
            self._bug = error  # a bug in the dial: the manager raises it
            self._wakeup.set()
            return
        try:
            if connection is None:
                self._dial_failed(error)
                self._wakeup.set()  # the manager retries after its back-off
                return
            self._dial_succeeded(*connection)
            self._top_up()  # short still (a connection came too late): dial again
        except BaseException as exc:  # noqa: B902 - not a dial failure: a bug
            self._bug = exc
            self._wakeup.set()

    def _refill(self) -> None:
        """Replace what a take used or a dial ended, at once; after a failed dial
        (or a bug) the manager decides instead, with its back-off."""
        if self._failures or self._bug is not None or self.closed:
            self._wakeup.set()
        else:
            self._top_up()

    def _dial_and_refill(self) -> None:
        try:
            self._dial_one()
        except gevent.GreenletExit:
            raise
        except BaseException as exc:  # noqa: B902 - not a dial failure: a bug
            self._bug = exc
        finally:
            self._dialing -= 1
            self._refill()

    def _dial_one(self) -> bool:
        try:
            connection_id, sock = self._dial()
        except DIAL_FAILURES as exc:  # retried by the manager
            self._dial_failed(exc)
            return False
        self._dial_succeeded(connection_id, sock)
        return True

    def _dial_failed(self, exc: BaseException) -> None:
        """Count a failed dial and say so: the first of a streak at once (an
        error with its remedy if no retry can fix it: an untrusted
        certificate); once users cannot be served (no connection for
        health.GRACE), an error with the remedy at most every health.REPEAT s."""
        self._failures += 1
        reason = health.describe_failure(exc)
        first = self.streak.fail(reason)
        level = health.level_for(exc)
        if first:
            if level >= logging.ERROR:
                self.streak.throttle.due()  # this line is the streak's first error
            self.log.log(level, "Pool: data connection failed: %s (retrying with backoff)%s",
                         reason, self._remedy_text(exc) if level >= logging.ERROR else "")
            return
        starved = self.starved_for()
        if starved > health.GRACE and self.streak.throttle.due() is not None:
            self.log.error("Pool: no data connection for %.0fs, users cannot be served:"
                           " %s (%d failed dials since the first, %.0fs ago)%s", starved,
                           reason, self.streak.failures, self.streak.age(),
                           self._remedy_text(exc))
        else:
            self.log.debug("Pool: data connection failed: %s", reason)

    def _remedy_text(self, exc: BaseException) -> str:
        remedy = self._remedy(exc) if self._remedy is not None else ""
        return "; " + remedy if remedy else ""

    def _dial_succeeded(self, connection_id: str, sock: socket.socket) -> None:
        self._last_success = time.monotonic()
        if self._failures:
            self.log.info("Pool: data connections work again after %d failures in %.0fs",
                          self._failures, self.streak.age())
            self._failures = 0
            self.streak.end()
        self._created += 1
        self._file(connection_id, sock)

    def _drop_dead(self) -> None:
        """Close idle connections the server (or a firewall timing out) closed,
        so that the next fill replaces them."""
        dead = set(net.closed_by_peer(self._idle.values()))
        if not dead:
            return
        if len(dead) == len(self._idle):
            self._emptied_at = time.monotonic()
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
