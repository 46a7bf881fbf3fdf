"""The server role: users arrive at target_addr, the client dials in at tunnel_addr.

Listeners live as long as the server; a *session* lives as long as one client's
tunnel connection. When a session ends, its pooled data connections go with it
and the next client may connect (after SERVICE_COOLDOWN if the session had
been in use, at once if it never opened a data connection, e.g. a port probe).
"""

import random
import socket
import ssl
import time
from collections import OrderedDict
from functools import partial
from typing import List, Optional

import gevent
import gevent.pool
from gevent.event import Event
from gevent.lock import Semaphore

from nodepass_gevent import auth, net, protocol, readers, relay, udpflow
from nodepass_gevent.config import Address, Config, Settings
from nodepass_gevent.edge import Edge
from nodepass_gevent.log import log
from nodepass_gevent.pool import ServerPool
from nodepass_gevent.protocol import HANDSHAKE_TIMEOUT, HEARTBEAT_MISSES
from nodepass_gevent.stats import Stats
from nodepass_gevent.supervisor import Supervisor

DATA_PORT_RANGE = (1024, 8192)  # as v1.0 picks it
DATA_PORT_TRIES = 64
POOL_WAIT = 5.0           # how long a user waits for a pooled data connection
MAX_PENDING_HANDSHAKES = 256
MAX_PENDING_CONTROLS = 16  # tunnel connections not yet a session (key handshakes)
FULL_WARNING_INTERVAL = 5.0  # at most one "semaphore full" warning this often


class Session:
    """One connected client: its tunnel connection and a lock for writing signals."""

    def __init__(self, control: socket.socket, peer: tuple) -> None:
        self.control = control
        self.peer_host = peer[0]
        self.peer = net.format_address(peer)
        self.in_use = False   # set once the client opens a data connection
        self.started = time.monotonic()
        self.udp_flow = False  # set once the client acknowledges UDP flows
        self.ended = Event()
        self._write_lock = Semaphore()

    def send(self, signal: bytes) -> bool:
        """Write one signal line; on failure end the session and return False."""
        if self.ended.is_set():
            return False
        with self._write_lock:  # signal lines must never interleave
            try:
                self.control.sendall(signal)
                return True
            except OSError as exc:
                log.warning("Tunnel: write to client %s failed: %s", self.peer, exc)
        self.end()
        return False

    def alive(self) -> bool:
        return not self.ended.is_set() and net.is_idle(self.control)

    def end(self) -> None:
        """Close the tunnel connection (wakes its reader). Never raises."""
        self.ended.set()
        net.abort(self.control)
        net.close_quietly(self.control)


class Server:
    """Listens for one client and any number of users; see the module docstring."""

    def __init__(self, config: Config, settings: Settings,
                 ssl_context: Optional[ssl.SSLContext]) -> None:
        self.config, self.settings, self.ssl_context = config, settings, ssl_context
        self.stats = Stats()
        self.edge = Edge(config, self.stats, log.warning)  # proxy=, allow=, rate=, ...
        self.pool = ServerPool(settings.max_pool_capacity)
        # The semaphore: one slot per user TCP connection or UDP exchange.
        self._users = gevent.pool.Pool(settings.semaphore_limit)
        self._handshakes = gevent.pool.Pool(MAX_PENDING_HANDSHAKES)
        # Tunnel connections: the session's, plus ones still being handled.
        self._controls = gevent.pool.Pool(MAX_PENDING_CONTROLS + 1)
        self._pending_controls = OrderedDict()  # type: OrderedDict[socket.socket, None]
        self._session = None  # type: Optional[Session]
        self._cooldown_until = 0.0
        self._next_full_warning = 0.0
        self._listeners = []  # type: List[socket.socket]
        self._loops = Supervisor("Server")
        self._offers_udp_flow = config.udp_mode == protocol.UDP_MODE_FLOW
        self._flows = udpflow.ServerFlows()
        self.data_port = 0
        self.failed = self._loops.failed  # set if an internal loop dies: the process should exit
        self.closed = False

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Open every listener (BindError if one cannot be) and start serving."""
        try:
            tunnel = net.listen_tcp(self.config.tunnel)
            self._listeners.append(tunnel)
            data = self._listen_data_port()
            self._listeners.append(data)
            target_tcp = net.listen_tcp(self.config.target)
            self._listeners.append(target_tcp)
            target_udp = net.listen_udp(self.config.target)
            self._listeners.append(target_udp)
        except BaseException:
            self._close_listeners()
            raise
        self.data_port = net.local_port(data)
        self._loops.spawn(net.serve_forever, tunnel, self._on_tunnel, self._spawn_control,
                          "tunnel")
        self._loops.spawn(net.serve_forever, data, self._on_data, self._handshakes.spawn, "data")
        self._loops.spawn(net.serve_forever, target_tcp, self._on_user, self._admit_user,
                          "target")
        self._loops.spawn(net.receive_forever, target_udp, self.settings.udp_data_buf_size,
                          self._on_user_datagram, "Target")
        self._loops.spawn(self._report_forever)
        edge = self.config.edge_summary()
        log.info("Server: tunnel %s, data port %d, target %s (tcp+udp), tls=%d, auth=%s%s",
                 self.config.tunnel, self.data_port, self.config.target, self.config.tls_mode,
                 "on" if self.config.auth_key else "off", ", " + edge if edge else "")

    def stop(self, timeout: float) -> None:
        """Stop accepting, let user connections finish for ``timeout``, then cut them."""
        if self.closed:
            return
        self.closed = True
        self._close_listeners()
        self._loops.kill()
        self._end_session()
        self._flows.end_all()  # UDP has nothing in flight worth a grace period
        self._controls.kill(block=False)
        self._handshakes.kill(block=False)
        self.pool.flush()
        self._users.join(timeout=timeout)
        if len(self._users):
            log.warning("Server: cutting %d connections still open after %.1fs",
                        len(self._users), timeout)
            self._users.kill(timeout=1)

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            net.close_quietly(listener)

    def _listen_data_port(self) -> socket.socket:
        host = self.config.tunnel.host
        for port in random.sample(range(*DATA_PORT_RANGE), DATA_PORT_TRIES):
            try:
                return net.listen_tcp(Address(host, port))
            except net.BindError:
                continue  # taken: try another
        return net.listen_tcp(Address(host, 0))  # crowded range: let the kernel choose

    # -- the tunnel (control) connection -----------------------------------

    def _spawn_control(self, handle, control: socket.socket, peer: tuple) -> None:
        """Handle a tunnel connection; when all places are taken, cut the oldest
        one still handshaking rather than queue the newcomer behind it.

        Peers that connect and say nothing would otherwise hold every place
        for a handshake timeout each, and lock the real client out for as
        long as they keep coming. The real client answers at once, so it is
        never the oldest for long.
        """
        if self._controls.full() and self._pending_controls:
            oldest, _ = self._pending_controls.popitem(last=False)
            net.abort(oldest)  # its handler fails its handshake and frees the place
        self._pending_controls[control] = None
        self._controls.spawn(handle, control, peer)

    def _on_tunnel(self, control: socket.socket, peer: tuple) -> None:
        try:
            self._serve_tunnel(control, peer)
        finally:
            self._pending_controls.pop(control, None)

    def _serve_tunnel(self, control: socket.socket, peer: tuple) -> None:
        who = net.format_address(peer)
        tunnel_signal = protocol.encode_tunnel_signal(self.data_port, self.config.tls_mode,
                                                      self._offers_udp_flow)
        if self.config.auth_key is not None:
            tunnel_signal = self._authenticate_client(control, who)
        refusal = self._refusal()  # checked after the handshake: another may have won
        if refusal or tunnel_signal is None:
            if refusal:
                log.warning("Tunnel: refused %s: %s", who, refusal)
            net.close_quietly(control)
            return
        self._end_session()
        self._pending_controls.pop(control, None)  # a session now: never cut for a newcomer
        net.set_user_timeout(control, self.settings.report_interval * HEARTBEAT_MISSES)
        session = self._session = Session(control, peer)
        if not session.send(tunnel_signal):
            self._end_session()  # gone already (a probe that reset): no session left behind
            return
        log.info("Tunnel: client connected from %s%s", session.peer,
                 " (authenticated)" if self.config.auth_key else "")
        self._read_until_closed(session)
        if self._session is session:
            self._end_session()

    def _refusal(self) -> Optional[str]:
        """Why a new client cannot have the tunnel now, or None if it can."""
        current = self._session
        if current is not None and current.alive():
            if current.in_use or time.monotonic() - current.started < HANDSHAKE_TIMEOUT:
                return "a client is already connected from %s" % current.peer
            # A real client dials data connections at once; one that has not
            # after a handshake timeout is a squatter, not a client.
            log.warning("Tunnel: %s never opened a data connection; replacing it",
                        current.peer)
        if time.monotonic() < self._cooldown_until:
            return "cooling down after the last client"
        return None

    def _authenticate_client(self, control: socket.socket, who: str) -> Optional[bytes]:
        """Run the key handshake; the tunnel signal to send, or None (logged)."""
        server_nonce = auth.new_nonce()
        try:
            control.settimeout(HANDSHAKE_TIMEOUT)
            control.sendall(protocol.encode_auth_challenge(server_nonce))
            response = readers.recv_line(control, protocol.MAX_SIGNAL_LENGTH)
            client_nonce = auth.check_client_response(self.config.auth_key, server_nonce,
                                                      response)
            if client_nonce is None:
                control.sendall(protocol.AUTH_REJECTION)
            control.settimeout(None)
        except OSError as exc:
            log.warning("Tunnel: %s did not authenticate: %s", who, exc or "timed out")
            return None
        if client_nonce is None:
            log.warning("Tunnel: %s failed authentication (wrong or missing key)", who)
            return None
        return auth.encode_tunnel_signal(self.config.auth_key, client_nonce, server_nonce,
                                         self.data_port, self.config.tls_mode,
                                         self._offers_udp_flow)

    def _read_until_closed(self, session: Session) -> None:
        # A v1.0 client never writes on the tunnel: reading tells us when it
        # goes away. Ours may acknowledge an extension; anything else is dropped.
        lines = session.control.makefile("rb")
        try:
            while not session.ended.is_set():
                line = lines.readline(protocol.MAX_SIGNAL_LENGTH)
                if not line:
                    break
                if line == protocol.ACK_UDP_FLOW and self._offers_udp_flow:
                    session.udp_flow = True
                    log.info("Tunnel: client %s uses UDP flows", session.peer)
        except (OSError, ValueError):
            pass
        finally:
            lines.close()

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.end()
        self.pool.flush()
        if session.in_use and not self.closed:
            self._cooldown_until = time.monotonic() + self.settings.service_cooldown
            log.warning("Tunnel: client %s disconnected; accepting a new one in %.1fs",
                        session.peer, self.settings.service_cooldown)
        else:
            log.info("Tunnel: connection from %s closed", session.peer)

    def _report_forever(self) -> None:
        while True:
            gevent.sleep(self.settings.report_interval)
            session = self._session
            if session is not None:
                session.send(protocol.HEARTBEAT)
            if self.stats.changed_since_report():
                self.report()

    def report(self) -> None:
        log.info("Server: %s", self.stats.line(self.pool.idle, self.pool.capacity))

    # -- data connections from the client ----------------------------------

    def _on_data(self, sock: socket.socket, peer: tuple) -> None:
        session = self._session
        if session is None or peer[0] != session.peer_host:
            log.warning("Data: refused %s: not the connected tunnel client",
                        net.format_address(peer))
            net.close_quietly(sock)
            return
        connection_id = protocol.new_connection_id()
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            if self.config.auth_key is not None and not self._authenticate_data(sock):
                log.warning("Data: %s failed authentication", session.peer)
                net.close_quietly(sock)
                return
            sock.sendall(connection_id.encode("ascii"))
            sock.settimeout(None)
        except (OSError, ValueError) as exc:
            log.debug("Data: handshake with %s failed: %s", net.format_address(peer), exc)
            net.close_quietly(sock)
            return
        session.in_use = True
        if session.ended.is_set() or not self.pool.add(connection_id, sock):
            net.close_quietly(sock)
            return
        log.debug("Data: connection %s from %s pooled", connection_id, session.peer)

    def _authenticate_data(self, sock: socket.socket) -> bool:
        nonce = auth.new_nonce()
        sock.sendall(nonce.encode("ascii"))
        response = readers.recv_exactly(sock, protocol.AUTH_MAC_LENGTH)
        return auth.check_data_response(self.config.auth_key, nonce, response)

    # -- users ---------------------------------------------------------------

    def _take_data_connection(self, kind: str, user: str):
        """A pooled connection announced to the client, or None (logged)."""
        session = self._session
        if session is None:
            log.debug("Target: no tunnel client; dropping %s user %s",
                      protocol.KIND_NAMES[kind], user)
            return None
        taken = self.pool.take(POOL_WAIT)
        if taken is None:
            log.warning("Target: no data connection ready within %.0fs; dropping %s user %s",
                        POOL_WAIT, protocol.KIND_NAMES[kind], user)
            return None
        connection_id, data = taken
        if not session.send(protocol.encode_launch_signal(connection_id, kind)):
            net.close_quietly(data)
            return None
        log.debug("Target: %s user %s -> data connection %s",
                  protocol.KIND_NAMES[kind], user, connection_id)
        return data

    def _spawn_user(self, *args) -> None:
        """Run a user's handler in the semaphore; say so when users must wait."""
        if self._users.full() and time.monotonic() >= self._next_full_warning:
            self._next_full_warning = time.monotonic() + FULL_WARNING_INTERVAL
            log.warning("Target: SEMAPHORE_LIMIT (%d) reached: new users wait for a free place",
                        self.settings.semaphore_limit)
        self._users.spawn(*args)

    def _admit_user(self, handle, user: socket.socket, peer: tuple) -> None:
        """allow=/deny=/per_user= first: a refused user costs no place and no signal."""
        key = self.edge.admit_tcp(user, peer)
        if key is not None:
            self._spawn_user(handle, user, peer, key)

    def _on_user(self, user: socket.socket, peer: tuple, key: object) -> None:
        try:
            data = self._take_data_connection(protocol.KIND_TCP, net.format_address(peer))
            if data is None or not self._send_proxy_header(user, peer, data):
                net.close_quietly(user)
                return
            with self.stats.tcp_connection():
                relay.exchange(user, data, self.stats, self.edge.rate)
        finally:
            self.edge.release_tcp(key)

    def _send_proxy_header(self, user: socket.socket, peer: tuple, data: socket.socket) -> bool:
        """proxy=1|2: the header goes first on the data connection, after the launch
        signal; the client forwards it to the service with the user's bytes."""
        header = self.edge.proxy_header(user, peer)
        if header is None:
            return True
        try:
            data.sendall(header)
            return True
        except OSError as exc:
            log.debug("Target: PROXY header for %s not sent: %s", net.format_address(peer), exc)
            net.close_quietly(data)
            return False

    def _on_user_datagram(self, listener: socket.socket, datagram: bytes, peer: tuple) -> None:
        if not self.edge.admit_datagram(peer, len(datagram)):
            return  # refused by allow=/deny= or over rate=: dropped (counted, logged)
        flow = self._flows.get(peer)
        if flow is not None:
            flow.offer(datagram)
        elif self._session is not None and self._session.udp_flow:
            size = self.settings.udp_data_buf_size
            flow = udpflow.ServerFlow(listener, peer, self.stats, size,
                                      self.settings.udp_read_timeout, self.edge.pass_reply)
            flow.offer(datagram)
            self._flows.add(flow)  # now, so the next datagram finds it
            self._spawn_user(self._flows.run, flow, partial(
                self._take_data_connection, protocol.KIND_UDP_FLOW, "%s:%d" % peer[:2]))
        else:
            self._spawn_user(self._on_datagram, listener, datagram, peer)

    def _on_datagram(self, listener: socket.socket, datagram: bytes, peer: tuple) -> None:
        data = self._take_data_connection(protocol.KIND_UDP, "%s:%d" % peer[:2])
        if data is None:
            return
        try:
            data.sendall(datagram)
            reply = readers.read_until_eof(data, self.settings.udp_data_buf_size,
                                         self.settings.udp_read_timeout)
            if reply and self.edge.pass_reply(len(reply)):
                listener.sendto(reply, peer)
            self.stats.udp_exchanged(len(datagram), len(reply))
        except OSError as exc:
            log.debug("Target: UDP exchange for %s failed: %s", peer, exc)
        finally:
            net.close_quietly(data)
