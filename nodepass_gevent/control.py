"""The control channel (the tunnel connection), both halves.

The client dials the server's tunnel address; the server answers with the
tunnel signal (data port, TLS mode; with a shared key, after the key
handshake of auth.py), then sends one launch signal per user and a
heartbeat every REPORT_INTERVAL. A v1.0 client never writes on it; ours may
acknowledge an extension (UDP flows). The bytes are protocol.py's.

A *session* is one tunnel connection; it decides which launch kinds may pass:
TCP and v1 UDP always, UDP flows only once offered and acknowledged.

Server half, ServerControl: one client at a time. A newcomer is refused while
the session is in use; a session that never opened a data connection after
HANDSHAKE_TIMEOUT is a squatter and is replaced; after a used session ends,
the next client waits SERVICE_COOLDOWN. Peers that connect and say nothing
are cut, oldest first, when MAX_PENDING_CONTROLS are handshaking.

Client half, open_client_session() and ClientSession.next_launch().
"""

import socket
import time
from collections import OrderedDict
from typing import FrozenSet, Optional

import gevent.pool
from gevent.lock import Semaphore

from nodepass_gevent import auth, net, protocol, readers
from nodepass_gevent.config import Config, Settings
from nodepass_gevent.protocol import HANDSHAKE_TIMEOUT, HEARTBEAT_MISSES, Signal
from nodepass_gevent.stats import Stats

MAX_PENDING_CONTROLS = 16  # tunnel connections not yet a session (key handshakes)
CONNECT_TIMEOUT = 5.0      # dialing the tunnel (client)

ALWAYS_ALLOWED = frozenset((protocol.KIND_TCP, protocol.KIND_UDP))
WITH_UDP_FLOWS = ALWAYS_ALLOWED | {protocol.KIND_UDP_FLOW}


class SessionError(Exception):
    """The tunnel cannot go on (server gone, refused policy, bad signal)."""


# -- the server half ---------------------------------------------------------------

class ServerSession:
    """One connected client: its tunnel connection and a lock for writing signals."""

    def __init__(self, control: socket.socket, peer: tuple, log) -> None:
        self.control = control
        self.peer_host = peer[0]
        self.peer = net.format_address(peer)
        self.log = log
        self.in_use = False   # set once the client opens a data connection
        self.started = time.monotonic()
        self.launch_kinds = ALWAYS_ALLOWED  # which launch signals the client takes
        self.last_heartbeat = None  # type: Optional[float]
        self.closed = False
        self._write_lock = Semaphore()

    @property
    def udp_flow(self) -> bool:
        return protocol.KIND_UDP_FLOW in self.launch_kinds

    def send(self, signal: bytes) -> bool:
        """Write one signal line; on failure close the session and return False."""
        if self.closed:
            return False
        with self._write_lock:  # signal lines must never interleave
            try:
                net.send_small(self.control, signal)
                return True
            except OSError as exc:
                self.log.warning("Tunnel: write to client %s failed: %s", self.peer, exc)
        self.close()
        return False

    def heartbeat(self) -> None:
        if self.send(protocol.HEARTBEAT):
            self.last_heartbeat = time.monotonic()

    def alive(self) -> bool:
        return not self.closed and net.is_idle(self.control)

    def close(self) -> None:
        """Close the tunnel connection (wakes its reader). Never raises."""
        self.closed = True
        net.abort(self.control)
        net.close_quietly(self.control)


class ServerControl:
    """The server's half of the control channel; see the module docstring.

    ``on_session_end`` runs when a session ends (the server flushes its pool).
    """

    def __init__(self, config: Config, settings: Settings, data_port: int, stats: Stats,
                 log, on_session_end) -> None:
        self.config, self.settings, self.data_port = config, settings, data_port
        self.stats, self.log = stats, log
        self._on_session_end = on_session_end
        self.offers_udp_flow = config.udp_mode == protocol.UDP_MODE_FLOW
        self.session = None  # type: Optional[ServerSession]
        # Tunnel connections still being handled, oldest first.
        self._handlers = gevent.pool.Group()
        self._pending = OrderedDict()  # type: OrderedDict[socket.socket, None]
        self._cooldown_until = 0.0
        self.closed = False

    def spawn(self, function, control: socket.socket, *args) -> None:
        """Handle a tunnel connection (the tunnel listener's spawn); when every
        place is taken, cut the oldest one still handshaking rather than
        queue the newcomer behind it.

        Peers that connect and say nothing would otherwise hold every place
        for a handshake timeout each, and lock the real client out for as
        long as they keep coming. The real client answers at once, so it is
        never the oldest for long. Never blocks: it runs in the accept callback.
        """
        if len(self._pending) >= MAX_PENDING_CONTROLS:
            oldest, _ = self._pending.popitem(last=False)
            net.abort(oldest)  # its handler fails its handshake and frees the place
        self._pending[control] = None
        self._handlers.spawn(function, control, *args)

    def handle(self, control: socket.socket, peer: tuple) -> None:
        try:
            self._serve(control, peer)
        finally:
            self._pending.pop(control, None)

    def heartbeat(self) -> None:
        session = self.session
        if session is not None:
            session.heartbeat()

    def end_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        session.close()
        self._on_session_end()
        if session.in_use and not self.closed:
            self._cooldown_until = time.monotonic() + self.settings.service_cooldown
            self.log.warning("Tunnel: client %s disconnected; accepting a new one in %.1fs",
                             session.peer, self.settings.service_cooldown)
        else:
            self.log.info("Tunnel: connection from %s closed", session.peer)

    def close(self) -> None:
        """End the session and every tunnel connection still handshaking."""
        self.closed = True
        self.end_session()
        self._handlers.kill(block=False)

    def _serve(self, control: socket.socket, peer: tuple) -> None:
        who = net.format_address(peer)
        tunnel_signal = protocol.encode_tunnel_signal(self.data_port, self.config.tls_mode,
                                                      self.offers_udp_flow)
        if self.config.auth_key is not None:
            tunnel_signal = self._authenticate(control, who)
        refusal = self._refusal()  # checked after the handshake: another may have won
        if refusal or tunnel_signal is None:
            if refusal:
                self.log.warning("Tunnel: refused %s: %s", who, refusal)
            net.close_quietly(control)
            return
        self.end_session()
        self._pending.pop(control, None)  # a session now: never cut for a newcomer
        net.set_user_timeout(control, self.settings.report_interval * HEARTBEAT_MISSES)
        session = self.session = ServerSession(control, peer, self.log)
        if not session.send(tunnel_signal):
            self.end_session()  # gone already (a probe that reset): no session left behind
            return
        self.log.info("Tunnel: client connected from %s%s", session.peer,
                      " (authenticated)" if self.config.auth_key else "")
        self._read_acknowledgements(session)
        if self.session is session:
            self.end_session()

    def _refusal(self) -> Optional[str]:
        """Why a new client cannot have the tunnel now, or None if it can."""
        current = self.session
        if current is not None and current.alive():
            if current.in_use or time.monotonic() - current.started < HANDSHAKE_TIMEOUT:
                return "a client is already connected from %s" % current.peer
            # A real client dials data connections at once; one that has not
            # after a handshake timeout is a squatter, not a client.
            self.log.warning("Tunnel: %s never opened a data connection; replacing it",
                             current.peer)
        if time.monotonic() < self._cooldown_until:
            return "cooling down after the last client"
        return None

    def _authenticate(self, control: socket.socket, who: str) -> Optional[bytes]:
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
            self.log.warning("Tunnel: %s did not authenticate: %s", who, exc or "timed out")
            return None
        if client_nonce is None:
            self.stats.auth_failures += 1
            self.log.warning("Tunnel: %s failed authentication (wrong or missing key)", who)
            return None
        return auth.encode_tunnel_signal(self.config.auth_key, client_nonce, server_nonce,
                                         self.data_port, self.config.tls_mode,
                                         self.offers_udp_flow)

    def _read_acknowledgements(self, session: ServerSession) -> None:
        # Reading tells us when the client goes away. Ours may acknowledge an
        # extension it was offered; anything else is dropped.
        lines = session.control.makefile("rb")
        try:
            while not session.closed:
                line = lines.readline(protocol.MAX_SIGNAL_LENGTH)
                if not line:
                    break
                if line == protocol.ACK_UDP_FLOW and self.offers_udp_flow:
                    session.launch_kinds = WITH_UDP_FLOWS
                    self.log.info("Tunnel: client %s uses UDP flows", session.peer)
        except (OSError, ValueError):
            pass
        finally:
            lines.close()


# -- the client half ---------------------------------------------------------------

class ClientSession:
    """One open tunnel on the client, after the handshake."""

    def __init__(self, control: socket.socket, lines, data_port: int, tls_mode: int,
                 launch_kinds: FrozenSet[str], silence: float) -> None:
        self.control, self.lines = control, lines
        self.data_port, self.tls_mode = data_port, tls_mode
        self.launch_kinds = launch_kinds
        self.silence = silence  # no line for this long: the server is gone
        self.last_line = time.monotonic()

    @property
    def data_sockaddr(self) -> tuple:
        """The address the tunnel reached (no second lookup), at the data port."""
        server_address = self.control.getpeername()
        return (server_address[0], self.data_port) + server_address[2:]

    def next_launch(self, log) -> Signal:
        """The next launch signal of a kind this session takes; heartbeats and
        bad or unknown signals are skipped. Raises when the tunnel is gone."""
        while True:
            try:
                line = read_signal_line(self.lines)
            except socket.timeout:
                raise ConnectionError("no heartbeat from the server for %.1fs"
                                      % self.silence) from None
            except protocol.ProtocolError as exc:
                log.warning("Client: skipped a bad signal: %s", exc)
                continue
            self.last_line = time.monotonic()
            if not line.strip():
                continue  # heartbeat
            try:
                signal = protocol.parse_signal(line)
            except protocol.ProtocolError as exc:
                log.warning("Client: skipped a bad signal: %s", exc)
                continue
            if signal.kind in self.launch_kinds:
                return signal
            log.debug("Client: ignored signal of unknown kind %r", signal.kind)

    def close(self) -> None:
        """Close the tunnel connection. Never raises."""
        net.close_quietly(self.lines)  # else the descriptor stays open for the reader
        net.close_quietly(self.control)


def open_client_session(config: Config, settings: Settings, log) -> ClientSession:
    """Dial the tunnel, run the handshake and accept the extensions offered."""
    control = net.dial_tcp(config.tunnel, CONNECT_TIMEOUT)
    try:
        silence = settings.report_interval * HEARTBEAT_MISSES
        net.set_user_timeout(control, silence)
        control.settimeout(HANDSHAKE_TIMEOUT)
        lines = control.makefile("rb")
        signal = client_handshake(config, control, lines)
        data_port, tls_mode = int(signal.host), int(signal.kind)
        if tls_mode < config.tls_mode:
            raise SessionError("server %s offers tls=%d, below this client's minimum tls=%d;"
                               " refusing the tunnel" % (config.tunnel, tls_mode,
                                                         config.tls_mode))
        launch_kinds = ALWAYS_ALLOWED
        if protocol.offers_udp_flow(signal):
            control.sendall(protocol.ACK_UDP_FLOW)
            launch_kinds = WITH_UDP_FLOWS
        control.settimeout(silence)
    except BaseException:
        net.close_quietly(control)
        raise
    return ClientSession(control, lines, data_port, tls_mode, launch_kinds, silence)


def client_handshake(config: Config, control: socket.socket, lines) -> Signal:
    """Read the tunnel signal, proving the shared key first if there is one."""
    signal = protocol.parse_signal(read_signal_line(lines))
    key = config.auth_key
    if not protocol.is_auth_challenge(signal):
        if key is not None:
            raise SessionError("server %s does not ask for the shared key; refusing it"
                               " (is it a NodePass v1.0 server, or an impostor?)"
                               % (config.tunnel,))
        return protocol.check_tunnel_signal(signal)
    if key is None:
        raise SessionError("server %s requires a shared key: use client://KEY@host:port/..."
                           " or NODEPASS_KEY" % (config.tunnel,))
    server_nonce, client_nonce = signal.query.get(protocol.FIELD_NONCE, ""), auth.new_nonce()
    if not auth.is_nonce(server_nonce):
        raise protocol.ProtocolError("bad authentication challenge")
    control.sendall(auth.client_response(key, server_nonce, client_nonce))
    answer = protocol.parse_signal(read_signal_line(lines))
    if protocol.is_auth_rejection(answer):
        raise auth.AuthError("server %s rejected our shared key" % (config.tunnel,))
    if not auth.check_tunnel_signal(key, client_nonce, server_nonce, answer):
        raise auth.AuthError("server %s did not prove the shared key (wrong key, or a"
                             " tampered tunnel signal)" % (config.tunnel,))
    return protocol.check_tunnel_signal(answer)


def read_signal_line(lines) -> bytes:
    """One signal line; ProtocolError (the rest skipped) if it is too long."""
    line = lines.readline(protocol.MAX_SIGNAL_LENGTH + 1)
    if not line:
        raise ConnectionError("the server closed the tunnel")
    if not line.endswith(b"\n") and len(line) > protocol.MAX_SIGNAL_LENGTH:
        while line and not line.endswith(b"\n"):  # skip the rest of the long line
            line = lines.readline(protocol.MAX_SIGNAL_LENGTH + 1)
        raise protocol.ProtocolError("signal longer than %d bytes" % protocol.MAX_SIGNAL_LENGTH)
    return line
