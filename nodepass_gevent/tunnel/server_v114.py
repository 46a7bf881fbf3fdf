"""The server role on the NodePass v1.14 wire (``wire=1.14``), TCP pool, reverse mode.

    tunnel port   no session: server_session.answer_handshake   GET -> 200, or 405/404/401
                  a session:  server_session.accept_pool_connection   from its client's IP
    pool          pool.ServerPool: oldest first to users, by id to verify
    control       control.ControlChannel on connection 00000000: ping/pong, verify, flush
    users         hand_out: wait for the client's verify (tls 1/2), the oldest idle
                  connection, a tcp {remote, id} signal, then server.py relays raw;
                  a new UDP user address: a udp {remote, id} signal (udp_v114.RawFlow)

server.Server wires this in place of wire/v1's control and data port (one
port for everything); the users' listener, the semaphore, the relay and the
reports stay the server's. A session lasts as long as its control channel:
when it ends, its pool goes with it and the next GET opens a new one.
UDP users get a pool connection per user address (udp_v114.py), as v1.14.
"""

import ssl
import time
from typing import Optional

import gevent
import gevent.pool

from nodepass_gevent.base import health, net
from nodepass_gevent.copy import tls
from nodepass_gevent.tunnel import udp_v114
from nodepass_gevent.tunnel.pool import ServerPool
from nodepass_gevent.wire.v1 import protocol
from nodepass_gevent.wire.v114 import control, handshake, ids, server_session, signals
from nodepass_gevent.wire.v114.client_session import key_for
from nodepass_gevent.wire.v114.keys import certificate_fingerprint

MAX_PENDING = 256     # tunnel-port connections handled at once (handshakes, TLS)
CONTROL_WAIT = 10.0   # after a handshake: v1.14's 5 s for a pooled connection + 5 s for id 0
NAMED_WAIT = 5.0      # a verify may name a connection whose id is still being written
NAMED_POLL = 0.05     # as v1.14's OutgoingGet polls
POOL_WAIT = 5.0       # a user waits this long for an idle pool connection (NP_POOL_GET_TIMEOUT)
VERIFY_WAIT = 15.0    # a user waits this long for the client's verify (tls 1/2)
TLS_NAMES = {"0": "plain", "1": "self-signed", "2": "crt/key"}
REFUSALS_LOGGED = 10  # refused handshakes said one by one, then one line per health.REPEAT s


class V114Session:
    """One v1.14 client: its IP, its control channel; what server.py reads of a session."""

    udp_flow = True  # a UDP session per user address (server.py, udp.py) ...
    flow_class = udp_v114.RawFlow  # ... on a pool connection of its own, unframed

    def __init__(self, peer: tuple) -> None:
        self.peer_host = peer[0]
        self.peer = net.format_address(peer)
        self.started = time.monotonic()
        self.control_claimed = False  # id 00000000 given out
        self.channel = None  # type: Optional[control.ControlChannel]
        self.closed = False

    @property
    def last_heartbeat(self) -> Optional[float]:
        return self.channel.last_line if self.channel is not None else None

    def close(self) -> None:
        self.closed = True
        if self.channel is not None:
            self.channel.close()


class V114Control:
    """The tunnel port's handler (``handle``, through ``spawn``) and the session;
    ``hand_out`` gives users their pool connections. ``server`` is the
    server.Server: its pool, stats, log, settings, and _drop for turned-away users."""

    def __init__(self, server) -> None:
        self.server = server
        self.config, self.log, self.stats = server.config, server.log, server.stats
        self.pool = server.pool  # type: ServerPool
        self.key = key_for(self.config.auth_key, self.config.tunnel.port)
        self.tls_code = str(self.config.tls_mode)
        self.context = server.ssl_context
        self.fingerprint = ""
        if self.context is not None:
            tls.require_tls_1_3(self.context)  # this tunnel's own context (fleet.py)
            self.fingerprint = certificate_fingerprint(tls.leaf_certificate(self.context))
        self.reply = handshake.TunnelConfig(handshake.FLOW_REVERSE, self.pool.capacity,
                                            self.tls_code, handshake.POOL_TYPE_TCP)
        self.spawn = gevent.pool.Pool(MAX_PENDING)  # the listener stops accepting when full
        self.session = None  # type: Optional[V114Session]
        self.tls_streak = health.Streak()  # TLS handshakes failed (server.health reads it)
        self._refusals = _LogBudget()  # refused handshakes: bounded, however many come
        self._strangers = health.Throttle()  # connections from another IP during a session
        self.closed = False

    # -- the tunnel port ---------------------------------------------------------

    def handle(self, sock, peer: tuple) -> None:
        session = self.session
        if session is None:
            self._handshake(sock, peer)
        elif peer[0] != session.peer_host:
            # v1.14 pools connections from the handshake's IP only [pool:handleConnection].
            net.close_quietly(sock)
            held = self._strangers.due()
            if held is not None:
                self.log.warning("Tunnel: refused %s: the tunnel belongs to client %s%s",
                                 net.format_address(peer), session.peer, _more(held))
        else:
            self._pool_connection(session, sock, peer)

    def _handshake(self, sock, peer: tuple) -> None:
        try:
            answer = server_session.answer_handshake(sock, self.key, self.reply)
        finally:
            net.close_quietly(sock)
        who = net.format_address(peer)
        if answer.passed:
            self._refusals.refill()
            if self.session is None and not self.closed:
                self._open_session(peer)
            return
        if answer.status == handshake.UNAUTHORIZED:
            self.stats.auth_failures += 1
        if answer.status is None and answer.detail == server_session.PROBE:
            self.log.debug("Tunnel: %s %s", who, answer.detail)  # a port probe
            return
        held = self._refusals.due()
        if held is not None:
            self.log.warning("Tunnel: handshake from %s refused: %s%s", who, answer.detail,
                             _more(held))

    def _open_session(self, peer: tuple) -> None:
        session = self.session = V114Session(peer)
        self.log.info("Tunnel: v1.14 client %s passed the handshake; waiting for its pool",
                      session.peer)
        self.server.spawn(self._expect_control, session)

    def _expect_control(self, session: V114Session) -> None:
        gevent.sleep(CONTROL_WAIT)
        if self.session is session and session.channel is None:
            self.log.warning("Tunnel: client %s sent no pool connection within %.0fs after"
                             " its handshake; waiting for a new handshake", session.peer,
                             CONTROL_WAIT)
            self.end_session(session)

    def _pool_connection(self, session: V114Session, sock, peer: tuple) -> None:
        chosen = []

        def choose_id() -> Optional[bytes]:
            if session.closed:
                return None
            if not session.control_claimed:
                session.control_claimed = True
                chosen.append(ids.CONTROL_NAME)
                return ids.CONTROL_ID
            if self.pool.idle >= self.pool.capacity:
                return None  # v1.14 closes a connection beyond max idle
            raw = server_session.new_pool_id(self.pool.ids())
            chosen.append(ids.id_name(raw))
            return raw

        try:
            sock = server_session.accept_pool_connection(sock, self.context, choose_id)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._pool_connection_failed(exc, peer)
            return
        if sock is None:
            self.log.debug("Tunnel: pool connection from %s closed: the pool is full (%d)",
                           net.format_address(peer), self.pool.capacity)
            return
        if self.tls_streak.active:
            self.log.info("Tunnel: TLS handshakes with the client work again after %d"
                          " failures", self.tls_streak.end())
        if chosen[0] == ids.CONTROL_NAME:
            self._run_control(session, sock)
        elif session.closed or not self.pool.add(chosen[0], sock):
            net.close_quietly(sock)

    def _pool_connection_failed(self, exc: Exception, peer: tuple) -> None:
        reason = health.describe_failure(exc)
        self.log.debug("Tunnel: pool connection from %s failed: %s",
                       net.format_address(peer), reason)
        if not isinstance(exc, ssl.SSLError):
            return
        self.stats.tls_failures += 1
        self.tls_streak.fail(reason)
        held = self.tls_streak.throttle.due()
        if held is not None:
            self.log.warning("Tunnel: TLS handshake with client %s failed: %s (%d in a row%s)",
                             net.format_address(peer), reason, self.tls_streak.failures,
                             _more(held))

    def _run_control(self, session: V114Session, sock) -> None:
        channel = session.channel = control.ControlChannel(
            sock, self.key, self.tls_code, _PoolView(self), self.log, "Server", "the client")
        self.log.info("Tunnel: client connected from %s (v1.14 wire, tls=%s %s, type=0, flow -,"
                      " max=%d)%s", session.peer, self.tls_code, TLS_NAMES[self.tls_code],
                      self.pool.capacity, "; users wait for its verify" if self.context else "")
        try:
            channel.run()
        except control.ControlLost as exc:
            if not session.closed:
                self.log.warning("Tunnel: client %s: %s", session.peer, exc)
        finally:
            self.end_session(session)

    # -- the session -------------------------------------------------------------

    def end_session(self, session: Optional[V114Session] = None) -> None:
        session = session or self.session
        if session is None:
            return
        was_current = self.session is session
        if was_current:
            self.session = None
        session.close()
        if was_current:
            self.server._session_ended()  # its pool goes with it
            if not self.closed:
                self.log.info("Tunnel: session of client %s ended; waiting for a new"
                              " handshake", session.peer)

    def heartbeat(self) -> None:
        """Nothing to do: the control channel pings by itself (control.py)."""

    def close(self) -> None:
        self.closed = True
        self.end_session()
        self.spawn.kill(block=False)

    # -- users ---------------------------------------------------------------------

    def hand_out(self, kind: str, peer: tuple):
        """A pool connection announced to the client for the user at ``peer``, or None."""
        session = self.session
        if session is None or session.channel is None:
            self.server._drop(kind, peer, "no tunnel client is connected")
            return None
        if not session.channel.verified.wait(VERIFY_WAIT):
            self.server._drop(kind, peer, "the client's TLS verify has not come within %.0fs"
                              % VERIFY_WAIT)
            return None
        taken = self.pool.take(POOL_WAIT)
        if taken is None:
            self.server._drop(kind, peer, "no pool connection ready within %.0fs"
                              % POOL_WAIT)
            return None
        name, data = taken
        announce = signals.tcp if kind == protocol.KIND_TCP else signals.udp  # a UDP session
        session.channel.send(announce(net.format_address(peer), name))
        return data


class _PoolView:
    """What the control channel asks of the server (control.ControlChannel's ``peer``)."""

    def __init__(self, owner: V114Control) -> None:
        self.owner = owner
        self.pool = owner.pool

    def take(self, name: str):
        """The idle connection ``name``, waiting briefly: a verify may name a
        connection whose id we are still writing."""
        deadline = time.monotonic() + NAMED_WAIT
        while True:
            sock = self.pool.take_named(name)
            if sock is not None or time.monotonic() >= deadline:
                return sock
            gevent.sleep(NAMED_POLL)

    def newest_idle(self) -> Optional[str]:
        return self.pool.newest_id()

    def fingerprint(self, name: str) -> str:
        return self.owner.fingerprint  # the server's own certificate, on every connection

    def launch_tcp(self, signal: signals.Signal) -> None:
        self.owner.log.warning("Server: the client sent a tcp signal (forward mode, flow +),"
                               " which this server does not run; connection %s closed",
                               signal.id)
        net.close_quietly(self.pool.take_named(signal.id))

    def flush(self) -> None:
        self.owner.log.info("Server: the client asked for a flush: %d idle pool connections"
                            " closed", self.pool.idle)
        self.pool.flush()


class _LogBudget:
    """The first REFUSALS_LOGGED lines at once, then at most one every health.REPEAT
    s with the count held back: a flood of bad handshakes cannot flood the log."""

    def __init__(self) -> None:
        self.throttle = health.Throttle()
        self.left = REFUSALS_LOGGED

    def due(self) -> Optional[int]:
        if self.left > 0:
            self.left -= 1
            return 0
        return self.throttle.due()

    def refill(self) -> None:
        self.left = REFUSALS_LOGGED


def _more(held: int) -> str:
    return "; %d more not logged" % held if held else ""
