"""The server role: wiring. Users arrive at target_addr, the client dials in at tunnel_addr.

Four listeners (listeners.py), each handing its connections to the module of
their kind:

    tunnel_addr  TCP  -> control.ServerControl  one client's tunnel, signals, heartbeats
    data port    TCP  -> dataconn.DataPort      the client's data connections -> pool
    target_addr  TCP  -> tcp.serve_user         a user = a pooled data connection
    target_addr  UDP  -> udp.UdpUsers           datagrams: v1.0 exchanges or flows

With wire=1.14 (server_v114.py) there is no data port: the v1.14 handshake
and its pool connections share the tunnel port, and server_v114.V114Control
stands where control.ServerControl and dataconn.DataPort stand.

Listeners live as long as the server; a session (control.py) as long as one
client's tunnel connection. When a session ends, its pooled data connections
go with it. User TCP connections and UDP exchanges share the semaphore
(SEMAPHORE_LIMIT, semaphore.py), drained for SHUTDOWN_TIMEOUT on stop.
"""

import logging
import random
import socket
import ssl
import time
from typing import List, Optional

import gevent.pool

from nodepass_gevent.base import health, net
from nodepass_gevent.base.lifecycle import Component
from nodepass_gevent.base.semaphore import UserSemaphore
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import WIRE_V114, Address, Config, Settings
from nodepass_gevent.edge.policy import Edge
from nodepass_gevent.log import TunnelLog
from nodepass_gevent.tunnel import server_v114, tcp, udp
from nodepass_gevent.tunnel.listeners import TcpListener, UdpListener
from nodepass_gevent.tunnel.pool import ServerPool
from nodepass_gevent.wire.v1 import control, dataconn, protocol

DATA_PORT_RANGE = (1024, 8192)  # as v1.0 picks it
DATA_PORT_TRIES = 64
POOL_WAIT = 5.0           # how long a user waits for a pooled data connection
MAX_PENDING_HANDSHAKES = 256  # data connections being proven at once


class Server(Component):
    """The server role; see the module docstring."""

    kind = "Server"

    def __init__(self, config: Config, settings: Settings,
                 ssl_context: Optional[ssl.SSLContext], name: str = "") -> None:
        super().__init__(TunnelLog(name))
        self.name = name
        self.config, self.settings, self.ssl_context = config, settings, ssl_context
        self.stats = Stats()
        self.edge = Edge(config, self.stats, self.log.warning)  # proxy=, allow=, rate=, ...
        self.pool = ServerPool(settings.max_pool_capacity)
        # The semaphore: one place per user TCP connection or UDP exchange.
        self.users = self.drain_on_stop(UserSemaphore(settings.semaphore_limit, self.stats,
                                                      self.log))
        self.tcp_users = self.drain_on_stop(tcp.CallbackUsers(self.users, self.fail))
        self.data_port = 0
        self.control = None  # type: Optional[control.ServerControl]
        self.udp_users = None  # type: Optional[udp.UdpUsers]
        self._handshakes = gevent.pool.Pool(MAX_PENDING_HANDSHAKES)  # data connections
        self._listeners = []  # type: List
        self.data_port_handler = None  # type: Optional[dataconn.DataPort]
        self._no_client = health.Streak()  # no tunnel client: since when
        self._no_client.begin()
        self._drops = health.Throttle()  # the log line about users dropped
        self._starved = health.Throttle()  # the one about a client without data connections

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Open every listener (BindError if one cannot be) and start serving."""
        sockets = []
        try:
            for open_socket in (lambda: net.listen_tcp(self.config.tunnel, role="tunnel port"),
                                self._listen_data_port,
                                lambda: net.listen_tcp(self.config.target, role="target port"),
                                lambda: net.listen_udp(self.config.target, role="target port")):
                sockets.append(open_socket())
        except BaseException:
            for sock in sockets:
                net.close_quietly(sock)
            raise
        tunnel, data, target_tcp, target_udp = sockets
        self.data_port = net.local_port(data if data is not None else tunnel)
        self._wire(tunnel, data, target_tcp, target_udp)
        for listener in self._listeners:
            listener.start()
        self.udp_users.start()
        self.spawn(self._report_forever)
        self.ready.set()
        edge = self.config.edge_summary()
        self.log.info("Server: tunnel %s, data port %d, target %s (tcp+udp), tls=%d, auth=%s,"
                      " udp=%s%s%s", self.config.tunnel, self.data_port, self.config.target,
                      self.config.tls_mode, "on" if self.config.auth_key else "off",
                      self.config.udp_mode, ", " + edge if edge else "",
                      ", v1.14 wire (one port)" if self.config.wire == WIRE_V114 else "")

    def _wire(self, tunnel: socket.socket, data: Optional[socket.socket],
              target_tcp: socket.socket, target_udp: socket.socket) -> None:
        if data is None:  # wire=1.14: handshake and pool on the tunnel port
            self.control = self.data_port_handler = server_v114.V114Control(self)
            tunnel_listeners = [TcpListener(tunnel, self.control.handle, self.control.spawn,
                                            self, "tunnel", hands_on=True)]
        else:
            tunnel_listeners = self._wire_v1(tunnel, data)
        self.udp_users = udp.UdpUsers(target_udp, self.users, self.hand_out,
                                      self._session_flows, self.stats, self.settings,
                                      self, self.edge if self.edge.filters_udp else None)
        self._listeners = tunnel_listeners + [
            _UserListener(target_tcp, self._serve_user, self.users, self, "target",
                          admit=self.edge.admit_tcp if self.edge.admits_tcp else None,
                          handle_now=self._serve_user_now if self._serves_users_now(data)
                          else None),
            UdpListener(target_udp, udp.RECEIVE_SIZE, self.udp_users.handle, self, "Target"),
        ]

    def _serves_users_now(self, data: Optional[socket.socket]) -> bool:
        """A TCP user served from the accept callback (no greenlet) needs v1.0's
        pool (data port), plain TCP, and nothing that reads or paces first."""
        return (data is not None and self.ssl_context is None and self.edge.rate is None
                and not self.edge.proxy_version)

    def _wire_v1(self, tunnel: socket.socket, data: socket.socket) -> List:
        self.control = control.ServerControl(self.config, self.settings, self.data_port,
                                             self.stats, self.log, self._session_ended)
        data_port = dataconn.DataPort(self.ssl_context, self.config.auth_key, self.pool,
                                      self.stats, self.log, lambda: self.control.session)
        self.data_port_handler = data_port  # its TLS failures, for the health verdict
        return [TcpListener(tunnel, self.control.handle, self.control.spawn, self, "tunnel"),
                TcpListener(data, data_port.handle, self._handshakes, self, "data",
                            hands_on=True, handle_now=data_port.handle_now)]

    def stop_accepting(self) -> None:
        for listener in self._listeners:
            listener.close()
        if self.control is not None:
            self.control.closed = True  # a session that ends now is no cause for a cooldown

    def cut_idle(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.udp_users is not None:
            self.udp_users.close()
        self._handshakes.kill(block=False)
        self.pool.close()

    def _listen_data_port(self) -> Optional[socket.socket]:
        if self.config.wire == WIRE_V114:
            return None  # v1.14 pools on the tunnel port
        host = self.config.tunnel.host
        if self.config.data_port:  # data_port=N: that one, or a BindError naming it
            return net.listen_tcp(Address(host, self.config.data_port),
                                  role="data port (data_port=)")
        for port in random.sample(range(*DATA_PORT_RANGE), DATA_PORT_TRIES):
            try:
                return net.listen_tcp(Address(host, port))
            except net.BindError:
                continue  # taken: try another
        return net.listen_tcp(Address(host, 0))  # crowded range: let the kernel choose

    def _session_ended(self) -> None:
        self.pool.flush()  # its connections belong to a client that is gone
        self._no_client.end()
        self._no_client.begin()

    # -- users -------------------------------------------------------------

    def hand_out(self, kind: str, peer: tuple) -> Optional[socket.socket]:
        """A pooled data connection, announced to the client for the user at
        ``peer``, or None (logged)."""
        if self.config.wire == WIRE_V114:
            return self.control.hand_out(kind, peer)
        session = self.control.session
        if session is None:
            self._drop(kind, peer, "no tunnel client is connected")
            return None
        taken = self.pool.take(POOL_WAIT)
        if taken is None:
            self._drop(kind, peer, "no data connection ready within %.0fs (the client's data"
                       " connections are not arriving: see the client's log)" % POOL_WAIT)
            return None
        connection_id, data = taken
        if not session.send(protocol.encode_launch_signal(connection_id, kind)):
            net.close_quietly(data)
            return None
        if self.log.isEnabledFor(logging.DEBUG):  # once per user: no arguments made for nothing
            self.log.debug("Target: %s user %s -> data connection %s",
                           protocol.KIND_NAMES[kind], _User(peer), connection_id)
        return data

    def _drop(self, kind: str, peer: tuple, why: str) -> None:
        """A user turned away for want of a client or a data connection: counted,
        and said at once, then at most every health.REPEAT s with the count."""
        self.stats.users_dropped += 1
        held = self._drops.due()
        if held is None:
            self.log.debug("Target: dropping %s user %s: %s", protocol.KIND_NAMES[kind],
                           _User(peer), why)
            return
        self.log.warning("Target: dropping users: %s (%s user %s; %d more since the last such"
                         " line, %d in all)", why, protocol.KIND_NAMES[kind], _User(peer), held,
                         self.stats.users_dropped)

    def _serve_user(self, user: socket.socket, peer: tuple) -> None:
        edge = self.edge
        try:
            if self.users.waited_lately() and self._left_in_backlog(user, peer):
                return
            tcp.serve_user(user, peer, self.hand_out, self.stats,
                           edge.proxy_header(user, peer), edge.rate)
        finally:
            edge.release_tcp(peer)

    def _serve_user_now(self, user: socket.socket, peer: tuple) -> bool:
        """_serve_user from the accept callback, when it can be (tcp.CallbackUsers).
        A user who left while queued is closed here too, as _serve_user does."""
        if self.users.waited_lately() and self._left_in_backlog(user, peer):
            self.edge.release_tcp(peer)
            return True
        return self.tcp_users.serve_now(user, peer, self.control.session, self.pool,
                                        self.stats, self.edge.release_tcp, self.log)

    def _left_in_backlog(self, user: socket.socket, peer: tuple) -> bool:
        """A user who closed while queued behind a full semaphore: closed here,
        with no data connection spent on it (a flood of such users would drain
        the pool for the patient ones behind them). EOF before any byte reads as
        gone: a user that half-closes without sending a byte is taken for one."""
        if not net.closed_by_peer((user,)):
            return False
        self.log.debug("Target: tcp user %s left while waiting for a place", _User(peer))
        net.close_quietly(user)
        return True

    def _session_flows(self) -> Optional[type]:
        """The flow class of the session's UDP users (udp.py), None for v1.0 exchanges."""
        session = self.control.session
        if session is None or not session.udp_flow:
            return None
        return getattr(session, "flow_class", udp.ServerFlow)  # v1.14's: its own

    # -- reports -------------------------------------------------------------

    def _report_forever(self) -> None:
        while True:
            gevent.sleep(self.settings.report_interval)
            self.control.heartbeat()
            self._say_if_starved()
            if self.stats.changed_since_report():
                self.report()

    def _say_if_starved(self) -> None:
        """A client whose data connections stopped arriving (a firewall in front
        of the data port drops them, and nothing fails here) is said at
        once, then every health.REPEAT s, users or not."""
        session = self.control.session
        starved = self.pool.starved_for(session.started) if session is not None else 0.0
        if starved <= health.GRACE:
            self._starved.reset()
            return
        if self._starved.due() is not None:
            self.log.warning("Server: no data connection from client %s for %.0fs: users cannot"
                             " be served (%d dropped in all); the client must reach data port"
                             " %d (a firewall must let it through, as well as the tunnel port)"
                             " and trust this server's certificate with tls=2", session.peer,
                             starved, self.stats.users_dropped, self.data_port)

    def report(self) -> None:
        self.log.info("Server: %s", self.stats.line(self.pool.describe()))

    def status(self) -> dict:
        session = self.control.session if self.control is not None else None
        heartbeat = session.last_heartbeat if session is not None else None
        figures = {
            "name": self.name, "role": "server", "state": self._state(session),
            "tunnel": str(self.config.tunnel), "target": str(self.config.target),
            "peer": session.peer if session is not None else None,
            "data_port": self.data_port or None, "tls": self.config.tls_mode,
            "pool_idle": self.pool.idle, "pool_capacity": self.pool.capacity,
            "last_heartbeat_age": (time.monotonic() - heartbeat
                                   if heartbeat is not None else None),
            "control_rtt": net.smoothed_rtt(session.control) if session is not None else None,
        }
        figures.update(self.stats.figures())
        figures.update(self.health(figures["state"], session))
        return figures

    def health(self, state: str, session) -> dict:
        """Whether users can be served now (health.py): a client, then its
        data connections. (The client's target is the client's to judge.)"""
        if state not in ("up", "waiting"):
            return health.not_running(state)
        if session is None:
            self._no_client.begin()
            return health.verdict(health.CONTROL_DOWN, "control channel down: no tunnel client"
                                  " connected for %.0fs" % self._no_client.age())
        self._no_client.end()
        starved = self.pool.starved_for(session.started)
        if starved > health.GRACE:
            tls_streak = self.data_port_handler.tls_streak
            why = ("; %d TLS handshakes failed, last: %s" % (tls_streak.failures,
                                                              tls_streak.reason)
                   if tls_streak.active else "")
            return health.verdict(health.NO_DATA_CONNECTIONS,
                                  "no data connection from client %s for %.0fs (%d users"
                                  " dropped in all%s)" % (session.peer, starved,
                                                          self.stats.users_dropped, why))
        return health.verdict(None)

    def _state(self, session) -> str:
        if self.failed.is_set():
            return "failed"
        if self.closed:
            return "stopped"
        if not self.ready.is_set():
            return "starting"
        return "up" if session is not None else "waiting"


class _User:
    """A user's address, formatted only if a log line is written (not per connection)."""

    __slots__ = ("peer",)

    def __init__(self, peer: tuple) -> None:
        self.peer = peer

    def __str__(self) -> str:
        return net.format_address(self.peer)


class _UserListener(TcpListener):
    """The user TCP listener: asks ``admit(sock, peer)`` (allow=/deny=/per_user=,
    edge/policy.py) before a user takes a place in the semaphore (which counts the users
    who find it full): a refused user is closed in the accept callback itself."""

    def __init__(self, *args, admit=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._admit = admit

    def do_handle(self, sock, peer) -> None:
        if self._admit is None or self._admit(sock, peer):
            super().do_handle(sock, peer)
