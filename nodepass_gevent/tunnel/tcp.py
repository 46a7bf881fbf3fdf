"""TCP users, both halves: one user connection = one data connection.

Server: a user connects to target_addr; the server takes a pooled data
connection, sends the launch signal (kind 1) naming its id, and relays.
Client: the launch signal names a pooled data connection; the client dials
the target and relays. The relay and its copy contract are relay.py's.

    user --TCP--> server ==data connection==> client --TCP--> target

With ``proxy=1|2`` (edge/policy.py) the server writes a PROXY protocol header
(proxyheader.py) on the data connection first, right after the launch
signal: the client forwards it to the target as the user's first bytes.

Where nothing has to wait or be paced, both halves run from event-loop
callbacks instead, no greenlet per connection (CallbackConnections, below):
the server's from the accept callback, the client's from the launch signal.
"""

import logging
import os
import socket
from typing import Callable, Optional

from gevent import get_hub
from gevent.event import Event

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import relay, zerocopy
from nodepass_gevent.copy.tlsstream import TLSStream
from nodepass_gevent.edge.ratelimit import TunnelRate
from nodepass_gevent.log import log
from nodepass_gevent.wire.v1 import protocol


def serve_user(user: socket.socket, peer: tuple, hand_out, stats: Stats,
               proxy_header: Optional[bytes] = None, rate: Optional[TunnelRate] = None
               ) -> None:
    """The server's half: ``hand_out(kind, peer)`` gives an announced data
    connection or None (then the user is closed at once). ``proxy_header``
    goes first on the data connection; ``rate`` paces the relay."""
    data = hand_out(protocol.KIND_TCP, peer)
    if data is None or (proxy_header is not None and not _send_header(data, proxy_header, peer)):
        net.close_quietly(user)
        return
    stats.tcp_opened()
    try:
        relay.exchange(user, data, stats, rate)
    finally:
        stats.tcp_closed()


def _send_header(data: socket.socket, header: bytes, peer: tuple) -> bool:
    """Write the PROXY header; on failure close the data connection, False."""
    try:
        net.send_message(data, header)
        return True
    except OSError as exc:
        log.debug("Target: PROXY header for %s not sent: %s", net.format_address(peer), exc)
        net.close_quietly(data)
        return False


def launch(data: socket.socket, target: net.Target, stats: Stats,
           on_target: Callable[[Optional[OSError]], None]) -> None:
    """The client's half: join the launched data connection to a new
    connection to the target (both closed when done). ``on_target(error)``
    hears whether the target answered (None) or not, before the relay: the
    client's health (the caller logs a failure, rate-limited)."""
    try:
        sock = target.connect(socket.SOCK_STREAM)
    except OSError as exc:
        net.close_quietly(data)
        on_target(exc)
        return
    on_target(None)
    stats.tcp_opened()
    try:
        relay.exchange(data, sock, stats)
    finally:
        stats.tcp_closed()


# -- both halves without a greenlet (issue 22) -------------------------------------

_WRITE = 2  # libev's EV_WRITE


class CallbackConnections:
    """TCP connections that run from event-loop callbacks, no greenlet each: a
    churned connection's greenlet (spawn, about five switches, exit) cost
    about 100k instructions, a quarter of a side's per connection. Drained and
    cut on stop as a gevent Group is (join, len, kill: lifecycle.drain_on_stop).

    Each takes a place of ``pool``, the role's gevent Pool of users or
    launches (SEMAPHORE_LIMIT), as its greenlets do. ``fail(exc)`` hears a
    bug in a callback (the event loop would only print it).
    """

    def __init__(self, pool, fail: Callable[[BaseException], None]) -> None:
        self._places = pool._semaphore  # gevent's Pool: one place per greenlet in it
        self.fail = fail
        self._running = set()
        self._empty = Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._running)

    def _take_place(self) -> bool:
        return self._places.acquire(blocking=False)

    def _add(self, connection) -> None:
        self._running.add(connection)
        self._empty.clear()

    def ended(self, connection) -> None:
        """Once per connection: its place is free again."""
        self._running.discard(connection)
        self._places.release()
        if not self._running:
            self._empty.set()

    def join(self, timeout: Optional[float] = None) -> bool:
        return self._empty.wait(timeout)

    def kill(self, timeout: Optional[float] = None) -> None:
        """Cut every connection at once (after the drain). Never raises."""
        for connection in list(self._running):
            connection.abort()


class CallbackLaunches(CallbackConnections):
    """The client's TCP launches from callbacks (CallbackConnections)."""

    def start(self, data: socket.socket, target: net.Target, stats: Stats,
              on_target: Callable[[Optional[OSError]], None]) -> bool:
        """launch() from callbacks, if it can be: a plain data connection, a
        target resolved already, splice at hand. False: nothing done, the
        caller runs launch() in a greenlet."""
        sockaddr = target.resolved(socket.SOCK_STREAM)
        splice = zerocopy.engine()
        if sockaddr is None or splice is None or isinstance(data, TLSStream) or \
                not self._take_place():
            return False
        try:
            sock = net.start_tcp_dial(sockaddr)
        except OSError as exc:
            self._places.release()
            target.forget(socket.SOCK_STREAM)
            net.close_quietly(data)
            on_target(exc)
            return True
        self._add(_Launch(self, data, sock, target, stats, on_target, splice))
        return True


class CallbackUsers(CallbackConnections):
    """The server's TCP users from the accept callback (CallbackConnections):
    wired only for a tunnel without TLS, proxy= or rate=; used when a data
    connection waits in the pool and the launch signal can go out at once.
    Else serve_user() runs in a greenlet as before (it waits for a data
    connection, or writes a header, or paces)."""

    def serve_now(self, user: socket.socket, peer: tuple, session, pool, stats: Stats,
                  release: Callable[[tuple], None], log) -> bool:
        """Serve ``user`` from here, or False (nothing done: use serve_user)."""
        splice = zerocopy.engine_if_known()  # the first user's relay probes it
        if session is None or splice is None or not session.can_send_now() or \
                not self._take_place():
            return False
        taken = pool.take_now()
        if taken is None:
            self._places.release()
            return False
        connection_id, data = taken
        if not session.send_now(protocol.encode_launch_signal(connection_id, protocol.KIND_TCP)):
            self._places.release()
            net.close_quietly(data)
            net.close_quietly(user)
            release(peer)
            return True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Target: tcp user %s -> data connection %s", net.format_address(peer),
                      connection_id)
        self._add(_User(self, user, data, peer, stats, release, splice))
        return True


class _User:
    """One user on the server, relayed from callbacks (CallbackUsers)."""

    def __init__(self, users: CallbackUsers, user: socket.socket, data: socket.socket,
                 peer: tuple, stats: Stats, release: Callable[[tuple], None], splice) -> None:
        self.users, self.peer, self.stats, self.release = users, peer, stats, release
        stats.tcp_opened()
        self.running = None  # type: Optional[zerocopy.Running]
        self.running = zerocopy.start_exchange(user, data, stats.counter(True),
                                               stats.counter(False), splice, self._on_exchanged)

    def _on_exchanged(self, forward: int, backward: int) -> None:
        self.stats.tcp_closed()
        self.release(self.peer)
        self.users.ended(self)

    def abort(self) -> None:
        """Cut it (a stop). Never raises."""
        if self.running is not None:
            self.running.abort()


class _Launch:
    """One launched TCP connection: the target's connect, then the exchange,
    both from callbacks (CallbackLaunches)."""

    def __init__(self, launches: CallbackLaunches, data: socket.socket, sock: socket.socket,
                 target: net.Target, stats: Stats, on_target, splice) -> None:
        self.launches, self.data, self.sock = launches, data, sock
        self.target, self.stats, self.on_target, self.splice = target, stats, on_target, splice
        self.running = None  # type: Optional[zerocopy.Running]
        self._watching = True
        loop = get_hub().loop
        self._writable = loop.io(sock.fileno(), _WRITE)
        self._deadline = loop.timer(target.timeout)
        self._writable.start(self._on_connected)
        self._deadline.start(self._on_deadline)

    def _on_connected(self) -> None:
        try:
            self._stop_watching()
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._failed(OSError(code, os.strerror(code)))
                return
            self.on_target(None)
            self.stats.tcp_opened()
            self.running = zerocopy.start_exchange(
                self.data, self.sock, self.stats.counter(True), self.stats.counter(False),
                self.splice, self._on_exchanged)
        except BaseException as exc:  # noqa: B902 - a bug, in a callback: fail the client
            self.abort()
            self.launches.fail(exc)

    def _on_deadline(self) -> None:
        self._stop_watching()
        self._failed(socket.timeout("timed out"))

    def _failed(self, error: OSError) -> None:
        """The target did not answer: as launch() says it (on_target)."""
        self.target.forget(socket.SOCK_STREAM)
        self._close()
        self.on_target(error)

    def _on_exchanged(self, forward: int, backward: int) -> None:
        self.stats.tcp_closed()
        self.launches.ended(self)

    def abort(self) -> None:
        """Cut it wherever it is (a stop). Never raises."""
        if self.running is not None:
            self.running.abort()  # its on_done ends this launch
            return
        self._stop_watching()
        self._close()

    def _close(self) -> None:
        net.close_quietly(self.sock)
        net.close_quietly(self.data)
        self.launches.ended(self)

    def _stop_watching(self) -> None:
        if self._watching:
            self._watching = False
            for watcher in (self._writable, self._deadline):
                watcher.stop()
                watcher.close()
