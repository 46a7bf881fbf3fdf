"""The client role: dials the server's tunnel, keeps a pool of data connections,
and joins each launched one to the private target.

A *session* is one tunnel connection. It ends when the server closes it, a
write or read fails, or no line (not even a heartbeat) arrives for
HEARTBEAT_MISSES report intervals; the client then reconnects after
SERVICE_COOLDOWN. Exchanges already running are not cut by that. With several
tunnel addresses (failover) the next session goes to the next server, with the
pauses failover.ServerOrder decides.
"""

import socket
import ssl
from typing import Dict, Optional

import gevent
import gevent.pool

from nodepass_gevent import auth, net, protocol, readers, relay, tls, udpflow
from nodepass_gevent.config import Address, Config, Settings
from nodepass_gevent.failover import ServerOrder
from nodepass_gevent.log import log
from nodepass_gevent.pool import ClientPool, DataConnection
from nodepass_gevent.protocol import AUTH_NONCE_LENGTH, HANDSHAKE_TIMEOUT
from nodepass_gevent.stats import Stats
from nodepass_gevent.supervisor import Supervisor

CONNECT_TIMEOUT = 5.0     # dialing the tunnel, a data connection or the target
AUTH_BACKOFF_MAX = 60.0   # longest pause between tries after the key was rejected


class SessionError(Exception):
    """The tunnel cannot go on (server gone, refused policy, bad signal)."""


class Client:
    """Serves the server's launch signals; see the module docstring."""

    def __init__(self, config: Config, settings: Settings) -> None:
        self.config, self.settings = config, settings
        self.stats = Stats()
        # The semaphore: one slot per launched TCP connection or UDP exchange.
        self._launches = gevent.pool.Pool(settings.semaphore_limit)
        self._resolved_target = {}  # type: Dict[int, tuple]  (socket kind -> sockaddr)
        self._flow_connections = set()  # data connections of open UDP flows
        self.pool = None  # type: Optional[ClientPool]
        self._control = None  # type: Optional[socket.socket]
        self._loops = Supervisor("Client")  # also runs each session's pool manager
        self._auth_failures = 0
        self.servers = ServerOrder(config.servers, settings.service_cooldown)
        self._opened = False  # the current session's tunnel opened
        self.failed = self._loops.failed
        self.closed = False

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._loops.spawn(self._run_sessions)
        self._loops.spawn(self._report_forever)

    def stop(self, timeout: float) -> None:
        """Close the tunnel and pool; let running exchanges finish for ``timeout``."""
        if self.closed:
            return
        self.closed = True
        self._loops.kill()
        net.close_quietly(self._control)
        if self.pool is not None:
            self.pool.close()
        for data in list(self._flow_connections):
            net.abort(data)  # UDP has nothing in flight worth a grace period
        self._launches.join(timeout=timeout)
        if len(self._launches):
            log.warning("Client: cutting %d connections still open after %.1fs",
                        len(self._launches), timeout)
            self._launches.kill(timeout=1)

    def _run_sessions(self) -> None:
        while not self.closed:
            auth_pause = None
            self._opened = False
            try:
                self._session(self.servers.current)
            except auth.AuthError as exc:
                # A wrong key will not fix itself: say so loudly, retry slowly.
                self._auth_failures += 1
                auth_pause = min(AUTH_BACKOFF_MAX,
                                 self.settings.service_cooldown * 2 ** self._auth_failures)
                log.error("Client: authentication failed: %s", exc)
            except SessionError as exc:
                log.error("Client: %s", exc)
            except (OSError, ssl.SSLError, protocol.ProtocolError) as exc:
                log.warning("Client: tunnel to %s lost: %s", self.servers.current,
                            _describe(exc))
            finally:
                self._end_session()
            pause, server = self.servers.after(self._opened)
            if len(self.servers.servers) == 1:
                log.info("Client: reconnecting in %.1fs", auth_pause or pause)
                gevent.sleep(auth_pause or pause)
            else:  # failover: the policy's pause; a rejected key is one more failed try
                log.info("Client: reconnecting in %.1fs to %s (%s)", pause, server,
                         self.servers.position)
                gevent.sleep(pause)

    def _report_forever(self) -> None:
        while True:
            gevent.sleep(self.settings.report_interval)
            if self.stats.changed_since_report():
                self.report()

    def report(self) -> None:
        pool = self.pool
        idle, capacity = (pool.idle, pool.capacity) if pool is not None else (0, 0)
        log.info("Client: %s", self.stats.line(idle, capacity))

    # -- the tunnel ------------------------------------------------------

    def _on_server(self) -> str:
        """" (server 2 of 3)" with failover, "" without: for the log."""
        return " (%s)" % self.servers.position if len(self.servers.servers) > 1 else ""

    def _session(self, server: Address) -> None:
        control = self._control = net.dial_tcp(server, CONNECT_TIMEOUT)
        silence = self.settings.report_interval * protocol.HEARTBEAT_MISSES
        net.set_user_timeout(control, silence)
        control.settimeout(HANDSHAKE_TIMEOUT)
        lines = control.makefile("rb")
        signal = self._handshake(control, lines, server)
        data_port, tls_mode = int(signal.host), int(signal.kind)
        if tls_mode < self.config.tls_mode:
            raise SessionError("server %s offers tls=%d, below this client's minimum tls=%d;"
                               " refusing the tunnel" % (server, tls_mode,
                                                         self.config.tls_mode))
        log.info("Client: tunnel to %s open: data port %d, tls=%d (%s)%s%s", server,
                 data_port, tls_mode, protocol.TLS_MODE_NAMES[tls_mode],
                 ", authenticated" if self.config.auth_key else "", self._on_server())
        self._opened = True
        server_address = control.getpeername()
        # Dial the address the tunnel reached (no second lookup), at the data port.
        data_sockaddr = (server_address[0], data_port) + server_address[2:]
        self.pool = ClientPool(self._data_dialer(server, data_sockaddr,
                                                 tls.client_context(tls_mode)),
                               self.settings.min_pool_capacity, self.settings.max_pool_capacity,
                               self._loops)
        self.pool.start()
        if protocol.offers_udp_flow(signal):
            control.sendall(protocol.ACK_UDP_FLOW)
            log.info("Client: using UDP flows (one data connection per user address)")
        control.settimeout(silence)
        self._auth_failures = 0
        self._serve_signals(lines)

    def _handshake(self, control: socket.socket, lines, server: Address) -> protocol.Signal:
        """Read the tunnel signal, proving the shared key first if there is one."""
        signal = protocol.parse_signal(self._read_line(lines))
        key = self.config.auth_key
        if not protocol.is_auth_challenge(signal):
            if key is not None:
                raise SessionError("server %s does not ask for the shared key; refusing it"
                                   " (is it a NodePass v1.0 server, or an impostor?)"
                                   % (server,))
            return protocol.check_tunnel_signal(signal)
        if key is None:
            raise SessionError("server %s requires a shared key: use client://KEY@host:port/..."
                               " or NODEPASS_KEY" % (server,))
        server_nonce, client_nonce = signal.query.get(protocol.FIELD_NONCE, ""), auth.new_nonce()
        if not auth.is_nonce(server_nonce):
            raise protocol.ProtocolError("bad authentication challenge")
        control.sendall(auth.client_response(key, server_nonce, client_nonce))
        answer = protocol.parse_signal(self._read_line(lines))
        if protocol.is_auth_rejection(answer):
            raise auth.AuthError("server %s rejected our shared key" % (server,))
        if not auth.check_tunnel_signal(key, client_nonce, server_nonce, answer):
            raise auth.AuthError("server %s did not prove the shared key (wrong key, or a"
                                 " tampered tunnel signal)" % (server,))
        return protocol.check_tunnel_signal(answer)

    def _end_session(self) -> None:
        if self.pool is not None:
            self.pool.close()
        net.close_quietly(self._control)
        self.pool, self._control = None, None

    def _read_line(self, lines) -> bytes:
        line = lines.readline(protocol.MAX_SIGNAL_LENGTH + 1)
        if not line:
            raise ConnectionError("the server closed the tunnel")
        if not line.endswith(b"\n") and len(line) > protocol.MAX_SIGNAL_LENGTH:
            while line and not line.endswith(b"\n"):  # skip the rest of the long line
                line = lines.readline(protocol.MAX_SIGNAL_LENGTH + 1)
            raise protocol.ProtocolError("signal longer than %d bytes"
                                         % protocol.MAX_SIGNAL_LENGTH)
        return line

    def _serve_signals(self, lines) -> None:
        while True:
            try:
                line = self._read_line(lines)
            except socket.timeout:
                raise ConnectionError("no heartbeat from the server for %.1fs"
                                      % (self.settings.report_interval
                                         * protocol.HEARTBEAT_MISSES)) from None
            except protocol.ProtocolError as exc:
                log.warning("Client: skipped a bad signal: %s", exc)
                continue
            if not line.strip():
                continue  # heartbeat
            self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            signal = protocol.parse_signal(line)
        except protocol.ProtocolError as exc:
            log.warning("Client: skipped a bad signal: %s", exc)
            return
        if signal.kind == protocol.KIND_TCP:
            launch = self._launch_tcp
        elif signal.kind == protocol.KIND_UDP:
            launch = self._launch_udp
        elif signal.kind == protocol.KIND_UDP_FLOW:
            launch = self._launch_udp_flow
        else:
            log.debug("Client: ignored signal of unknown kind %r", signal.kind)
            return
        log.debug("Client: launch %s for data connection %s",
                  protocol.KIND_NAMES[signal.kind], signal.host)
        self._launches.spawn(launch, self.pool, signal.host)

    # -- data connections ----------------------------------------------------

    def _data_dialer(self, server: Address, sockaddr: tuple,
                     context: Optional[ssl.SSLContext]):
        server_name = server.dial_host

        def dial() -> DataConnection:
            sock = net.dial_tcp(server, CONNECT_TIMEOUT, sockaddr)
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT)
                if context is not None:
                    sock = context.wrap_socket(sock, server_hostname=server_name)
                if self.config.auth_key is not None:
                    nonce = readers.recv_exactly(sock, AUTH_NONCE_LENGTH).decode("ascii", "replace")
                    sock.sendall(auth.data_response(self.config.auth_key, nonce))
                connection_id = readers.read_id(sock)
                sock.settimeout(None)
                return connection_id, sock
            except BaseException:
                net.close_quietly(sock)
                raise

        return dial

    def _connect_target(self, kind: int, timeout: Optional[float]) -> socket.socket:
        """A TCP or UDP socket connected to the target; its address is resolved
        once, and again after a failure (maybe the name moved)."""
        try:
            sockaddr = self._resolved_target.get(kind)
            if sockaddr is None:
                sockaddr = net.resolve(self.config.target, kind, passive=False)[1]
                self._resolved_target[kind] = sockaddr
            if kind == socket.SOCK_STREAM:
                return net.dial_tcp(self.config.target, CONNECT_TIMEOUT, sockaddr)
            return net.connect(sockaddr, kind, timeout)
        except OSError:
            self._resolved_target.pop(kind, None)
            raise

    def _take_and_connect(self, pool: ClientPool, connection_id: str, kind: int,
                          timeout: Optional[float]):
        """The launched data connection and a fresh socket to the target, or None."""
        data = pool.take(connection_id)
        if data is None:
            return None
        try:
            return data, self._connect_target(kind, timeout)
        except OSError as exc:
            log.warning("Client: cannot reach %s target %s: %s",
                        "TCP" if kind == socket.SOCK_STREAM else "UDP", self.config.target,
                        _describe(exc))
            net.close_quietly(data)
            return None

    def _launch_tcp(self, pool: ClientPool, connection_id: str) -> None:
        pair = self._take_and_connect(pool, connection_id, socket.SOCK_STREAM, CONNECT_TIMEOUT)
        if pair is not None:
            with self.stats.tcp_connection():
                relay.exchange(pair[0], pair[1], self.stats)

    def _launch_udp_flow(self, pool: ClientPool, connection_id: str) -> None:
        pair = self._take_and_connect(pool, connection_id, socket.SOCK_DGRAM, None)
        if pair is None:
            return
        data, target = pair
        self._flow_connections.add(data)
        try:
            udpflow.client_flow(data, target, self.stats, self.settings.udp_data_buf_size,
                                self.settings.udp_read_timeout)
        finally:
            self._flow_connections.discard(data)

    def _launch_udp(self, pool: ClientPool, connection_id: str) -> None:
        data = pool.take(connection_id)
        if data is None:
            return
        target = None
        try:
            size, timeout = self.settings.udp_data_buf_size, self.settings.udp_read_timeout
            datagram = readers.read_burst(data, size, timeout)
            target = self._connect_target(socket.SOCK_DGRAM, timeout)
            target.send(datagram)
            reply = target.recv(size)
            data.sendall(reply)
            self.stats.udp_exchanged(len(datagram), len(reply))
        except socket.timeout:
            log.debug("Client: no UDP reply from %s within %.1fs", self.config.target, timeout)
        except (OSError, ValueError) as exc:
            log.debug("Client: UDP exchange on %s failed: %s", connection_id, _describe(exc))
        finally:
            net.close_quietly(target)
            net.close_quietly(data)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
