"""The client role: wiring. Dials the server's tunnel, keeps a pool of data
connections, and joins each launched one to the private target.

    session loop   control.open_client_session   tunnel, handshake, extensions
    pool           pool.ClientPool + dataconn.Dialer   pre-dialed data connections
    launches       tcp.launch / udp.launch_v1 / udp.launch_flow, in the semaphore

A session is one tunnel connection. It ends when the server closes it, a
write or read fails, or no line (not even a heartbeat) arrives for
HEARTBEAT_MISSES report intervals; the client then reconnects after
SERVICE_COOLDOWN. Exchanges already running are not cut by that. With several
tunnel addresses (failover) the next session goes to the next server, with the
pauses failover.ServerOrder decides.
"""

import dataclasses
import logging
import ssl
import time
from typing import Optional

import gevent
import gevent.pool

from nodepass_gevent.base import health, net
from nodepass_gevent.base.lifecycle import Component
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import WIRE_AUTO, WIRE_V114, Address, Config, Settings, format_addresses
from nodepass_gevent.copy import tls
from nodepass_gevent.log import TunnelLog
from nodepass_gevent.tunnel import client_v114, tcp, udp, wire_detect
from nodepass_gevent.tunnel.failover import ServerOrder
from nodepass_gevent.tunnel.pool import ClientPool
from nodepass_gevent.wire.v1 import auth, control, dataconn, protocol
from nodepass_gevent.wire.v1.control import SessionError

CONNECT_TIMEOUT = 5.0     # dialing the target
AUTH_BACKOFF_MAX = 60.0   # longest pause between tries after the key was rejected

__all__ = ["Client", "SessionError"]


def _pause_text(seconds: float) -> str:
    """A pause for the log: "1.3s", or "40ms" where "0.0s" would read as none."""
    return "%.1fs" % seconds if seconds >= 0.1 else "%dms" % round(seconds * 1000)


class Client(Component):
    """The client role; see the module docstring."""

    kind = "Client"

    def __init__(self, config: Config, settings: Settings, name: str = "") -> None:
        super().__init__(TunnelLog(name))
        self.name = name
        self.config, self.settings = config, settings
        self.stats = Stats()
        self.target = net.Target(config.target, CONNECT_TIMEOUT)
        # The semaphore: one place per launched TCP connection or UDP exchange.
        self.launches = self.drain_on_stop(gevent.pool.Pool(settings.semaphore_limit))
        self.pool = None  # type: Optional[ClientPool]
        self.session = None  # type: Optional[control.ClientSession]
        self._flow_connections = set()  # data connections of open UDP flows
        self._udp_too_large = udp.TooLargeDrops("client", settings.udp_data_buf_size,
                                                self.stats, self.log)  # v1.0 datagrams
        self._auth_failures = 0  # in a row, for the back-off
        self.servers = ServerOrder(config.servers, settings.service_cooldown)
        self.wires = wire_detect.WireMemory()  # per server, for wire=auto
        self.wire = config.wire  # of the last session: "auto" until one found out
        self._opened = False  # the current session's tunnel opened
        self.target_watch = health.TargetWatch(self.target, self.stats, self.log, self.spawn)
        # The control channel's outage, for the health verdict and its log line.
        self._down = health.Streak()
        self._down.begin()

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self.spawn(self._run_sessions)
        self.spawn(self._report_forever)

    def cut_idle(self) -> None:
        self._end_session()
        for data in list(self._flow_connections):
            net.abort(data)  # UDP has nothing in flight worth a grace period

    def _run_sessions(self) -> None:
        while not self.closed:
            auth_pause = None
            self._opened = False
            try:
                self._serve_session_noting(self.servers.current)
            except auth.AuthError as exc:
                # A wrong key will not fix itself: say so loudly, retry slowly.
                self._auth_failures += 1
                self.stats.auth_failures += 1
                auth_pause = min(AUTH_BACKOFF_MAX,
                                 self.settings.service_cooldown * 2 ** self._auth_failures)
                self.log.error("Client: authentication failed: %s", exc)
            except control.TunnelRefused as exc:  # told: error; inferred: it may pass
                (self.log.error if exc.certain else self.log.warning)("Client: %s", exc)
            except (SessionError, client_v114.V114Error, wire_detect.WireError) as exc:
                self.log.error("Client: %s", exc)
            except control.ServerUnreachable as exc:
                self.log.warning("Client: %s", exc)
            except (OSError, ssl.SSLError, protocol.ProtocolError) as exc:
                # "lost" only for a tunnel that was open: before, it did not open.
                self.log.warning("Client: tunnel to %s %s: %s", self.servers.current,
                                 "lost" if self._opened else "did not open", net.describe(exc))
            finally:
                self._end_session()
            self.stats.reconnects += 1
            pause, server = self.servers.after(self._opened)
            if len(self.servers.servers) == 1:
                pause = auth_pause or pause
                self.log.info("Client: reconnecting in %s", _pause_text(pause))
            elif pause > 0:  # failover: the policy's pause; a rejected key is one more try
                self.log.info("Client: reconnecting in %s to %s (%s)", _pause_text(pause),
                              server, self.servers.position)
            else:  # the same round: no pause, by design (failover.py)
                self.log.info("Client: trying the next server at once: %s (%s)", server,
                              self.servers.position)
            self._say_still_down()
            gevent.sleep(pause)

    def _serve_session_noting(self, server: Address) -> None:
        """_serve_session, and why it ended: for the health verdict."""
        try:
            self._serve_session(server)
        except Exception as exc:
            self._down.fail("%s: %s" % (server, health.describe_failure(exc)))
            raise

    def _say_still_down(self) -> None:
        """An outage longer than health.GRACE is an error, said again every
        health.REPEAT s (each try is logged on its own above, as a warning)."""
        down = self._down
        if down.age() > health.GRACE and down.throttle.due() is not None:
            self.log.error("Client: tunnel down for %.0fs, users cannot be served (%d tries;"
                           " last: %s)", down.age(), down.failures, down.reason)

    def _on_server(self) -> str:
        """" (server 2 of 3)" with failover, "" without: for the log."""
        return " (%s)" % self.servers.position if len(self.servers.servers) > 1 else ""

    def _serve_session(self, server: Address) -> None:
        wire, tunnel = self.config.wire, None  # pinned: dialed by the wire's own code
        if wire == WIRE_AUTO:  # find out (wire_detect.py), on the connection we keep
            wire, tunnel = self.wires.open(server, self.log)
        self.wire = wire
        if wire == WIRE_V114:  # NodePass v1.14's wire (client_v114.py)
            try:
                self.session = client_v114.V114Session(self, server, tunnel)
            except client_v114.WireMismatch:
                self.wires.forget(server, self.log)
                raise
            self.session.serve()
            return
        # The control channel dials config.tunnel: this session's server.
        config = dataclasses.replace(self.config, tunnel=server)
        session = self.session = control.open_client_session(config, self.settings, self.log,
                                                             tunnel)
        # tls=2 is verified by each data connection's handshake, not here:
        # "verified" is said once one did (_say_verified).
        self.log.info("Client: tunnel to %s open: data port %d, tls=%d (%s)%s%s",
                      server, session.data_port, session.tls_mode,
                      "certificate checked on the first data connection"
                      if session.tls_mode == protocol.TLS_VERIFIED
                      else protocol.TLS_MODE_NAMES[session.tls_mode],
                      ", authenticated" if self.config.auth_key else "", self._on_server())
        dialer = dataconn.Dialer(server, session.data_sockaddr,
                                 tls.client_context(session.tls_mode), self.config.auth_key,
                                 self.stats, self._say_verified)
        self.pool = ClientPool(dialer, self.settings.min_pool_capacity,
                               self.settings.max_pool_capacity, self, dialer.start,
                               dialer.remedy)
        self.pool.start()
        if protocol.KIND_UDP_FLOW in session.launch_kinds:
            self.log.info("Client: using UDP flows (one data connection per user address)")
        self.opened_session()
        while True:
            self._launch(self.pool, session.next_launch(self.log))

    def opened_session(self) -> None:
        """A session opened, on either wire: no longer down, ready for users."""
        self._opened = True
        if self._down.active:
            self._down.end()
        self._auth_failures = 0
        self.ready.set()

    def _say_verified(self, certificate: dict) -> None:
        self.log.info("Client: tls=2 verified: %s, for %s", tls.describe_certificate(certificate),
                      self.servers.current.dial_host)

    def _end_session(self) -> None:
        self.ready.clear()
        if self.pool is not None:
            self.pool.close()
        if self.session is not None:
            self.session.close()
        self.pool, self.session = None, None

    # -- launches ----------------------------------------------------------

    def _launch(self, pool: ClientPool, signal: protocol.Signal) -> None:
        if self.log.isEnabledFor(logging.DEBUG):  # once per launch
            self.log.debug("Client: launch %s for data connection %s",
                           protocol.KIND_NAMES[signal.kind], signal.host)
        self.launches.spawn(self._run_launch, pool, signal.kind, signal.host)

    def _run_launch(self, pool: ClientPool, kind: str, connection_id: str) -> None:
        data = pool.take(connection_id)
        if data is None:
            return
        if kind == protocol.KIND_TCP:
            tcp.launch(data, self.target, self.stats, self.target_watch)
        elif kind == protocol.KIND_UDP:
            udp.launch_v1(data, self.target, self.stats, self.settings, self.log,
                          connection_id, self._udp_too_large)
        else:
            udp.launch_flow(data, self.target, self.stats, self.settings, self.log,
                            self._flow_connections)

    # -- reports -------------------------------------------------------------

    def _report_forever(self) -> None:
        while True:
            gevent.sleep(self.settings.report_interval)
            if self.stats.changed_since_report():
                self.report()

    def report(self) -> None:
        pool = self.pool
        self.log.info("Client: %s", self.stats.line(
            pool.describe() if pool is not None else "idle=0 (no tunnel open)"))

    def status(self) -> dict:
        pool, session = self.pool, self.session
        figures = {
            "name": self.name, "role": "client", "state": self._state(),
            # With failover: the server dialed now (or next), the whole list below.
            "tunnel": str(self.servers.current), "target": str(self.config.target),
            "peer": str(self.servers.current) if self.ready.is_set() else None,
            "servers": format_addresses(self.servers.servers),
            "wire": self.wire,
            "data_port": session.data_port if session is not None else None,
            "tls": session.tls_mode if session is not None else self.config.tls_mode,
            "pool_idle": pool.idle if pool is not None else 0,
            "pool_capacity": pool.capacity if pool is not None else 0,
            "last_heartbeat_age": (time.monotonic() - session.last_line
                                   if session is not None else None),
            "control_rtt": net.smoothed_rtt(session.control) if session is not None else None,
        }
        figures.update(self.stats.figures())
        figures.update(self.health(figures["state"]))
        return figures

    def health(self, state: str) -> dict:
        """Whether users can be served now (health.py): the tunnel, then the
        data connections, then the target."""
        if state in ("failed", "stopped"):
            return health.not_running(state)
        if state != "up":
            down = self._down
            if not down.failures:
                return health.verdict(health.CONTROL_DOWN, "control channel not open yet"
                                      " (first try under way for %.0fs)" % down.age())
            return health.verdict(health.CONTROL_DOWN, "control channel down for %.0fs (%d"
                                  " tries; last: %s)" % (down.age(), down.failures,
                                                         down.reason))
        pool = self.pool
        starved = pool.starved_for() if pool is not None else 0.0
        if starved > health.GRACE:
            streak = pool.streak
            why = ("%d failed dials, last: %s" % (streak.failures, streak.reason)
                   if streak.active else "%d dials under way" % pool.dials_under_way)
            return health.verdict(health.NO_DATA_CONNECTIONS,
                                  "no data connection for %.0fs (%s)" % (starved, why))
        return self.target_watch.verdict() or health.verdict(None)

    def _state(self) -> str:
        if self.failed.is_set():
            return "failed"
        if self.closed:
            return "stopped"
        if self.ready.is_set():
            return "up"
        return "waiting" if self.stats.reconnects else "starting"
