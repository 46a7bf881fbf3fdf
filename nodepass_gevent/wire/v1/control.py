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

A refused client is told why only when it proved the shared key (then it is
ours: a v1.0 client cannot), by ``//0?error=busy#0`` or ``//0?error=cooldown#0``
in place of the tunnel signal. Without a key it is closed without a byte, as
in v1.0, and our client infers the likely reason from that close
(TunnelRefused, ``certain`` False). Both sides log who and what to do.

Client half, open_client_session() and ClientSession.next_launch().
"""

import socket
import time
from collections import OrderedDict
from typing import FrozenSet, Optional, Tuple

import gevent.pool
from gevent.lock import Semaphore

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import Config, Settings
from nodepass_gevent.copy import readers
from nodepass_gevent.wire.v1 import auth, protocol
from nodepass_gevent.wire.v1.protocol import HANDSHAKE_TIMEOUT, HEARTBEAT_MISSES, Signal

MAX_PENDING_CONTROLS = 16  # tunnel connections not yet a session (key handshakes)
CONNECT_TIMEOUT = 5.0      # dialing the tunnel (client)

ALWAYS_ALLOWED = frozenset((protocol.KIND_TCP, protocol.KIND_UDP))
WITH_UDP_FLOWS = ALWAYS_ALLOWED | {protocol.KIND_UDP_FLOW}


class SessionError(Exception):
    """The tunnel cannot go on (server gone, refused policy, bad signal)."""


class TunnelRefused(SessionError):
    """The server turned this client away: another client has the tunnel, or it
    is pausing after the last one left. ``certain``: the server said so (only
    with a key); else the client inferred it from a close before any signal."""

    def __init__(self, message: str, certain: bool) -> None:
        super().__init__(message)
        self.certain = certain


class TunnelClosed(ConnectionError):
    """The server closed the tunnel connection (between two lines)."""


class ServerUnreachable(ConnectionError):
    """The tunnel could not even be dialed (refused, no route, unknown name)."""


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
        self.connected_at = time.time()  # for the log of a refused second client
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
                net.send_message(self.control, signal)
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

    def spawn(self, function, *args) -> None:
        """Handle a tunnel connection (the tunnel listener's spawn); when every
        place is taken, cut the oldest one still handshaking rather than
        queue the newcomer behind it.

        Peers that connect and say nothing would otherwise hold every place
        for a handshake timeout each, and lock the real client out for as
        long as they keep coming. The real client answers at once, so it is
        never the oldest for long. Never blocks: it runs in the accept callback.
        The arguments are gevent's (its runner, our handle, ...), not the
        socket: handle() files the socket under _pending itself.
        """
        if len(self._pending) >= MAX_PENDING_CONTROLS:
            oldest, _ = self._pending.popitem(last=False)
            net.abort(oldest)  # its handler fails its handshake and frees the place
        self._handlers.spawn(function, *args)

    def handle(self, control: socket.socket, peer: tuple) -> None:
        self._pending[control] = None
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
        refusal = self._refusal(peer)  # checked after the handshake: another may have won
        if refusal or tunnel_signal is None:
            if refusal:
                reason, text = refusal
                self.log.warning("Tunnel: refused %s", text)
                if tunnel_signal is not None and self.config.auth_key is not None:
                    # It proved the key, so it is one of ours (a v1.0 client cannot):
                    # it may be told why. Without a key nothing is sent, as in v1.0.
                    _send_quietly(control, protocol.encode_refusal(reason))
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

    def _refusal(self, peer: tuple) -> Optional[Tuple[str, str]]:
        """Why a new client from ``peer`` cannot have the tunnel now, as (the
        reason for the wire, the log line after "refused"); None if it can."""
        who = net.format_address(peer)
        current = self.session
        if current is not None and current.alive():
            if current.in_use or time.monotonic() - current.started < HANDSHAKE_TIMEOUT:
                return protocol.REFUSED_BUSY, self._busy_text(who, peer[0], current)
            # A real client dials data connections at once; one that has not
            # after a handshake timeout is a squatter, not a client.
            self.log.warning("Tunnel: %s never opened a data connection; replacing it",
                             current.peer)
        wait = self._cooldown_until - time.monotonic()
        if wait > 0:
            return protocol.REFUSED_COOLDOWN, (
                "a client from %s: the last client left %s ago; accepting a new one in %s"
                " (SERVICE_COOLDOWN)" % (who, _duration(self.settings.service_cooldown - wait),
                                         _duration(wait)))
        return None

    def _busy_text(self, who: str, host: str, current: ServerSession) -> str:
        text = ("a second client from %s: the tunnel already has a client, %s, connected"
                " since %s (%s); a server takes one client: stop the other client, or give"
                " this one a server of its own"
                % (who, current.peer, _wall_clock(current.connected_at),
                   _duration(time.monotonic() - current.started)))
        if host == current.peer_host:  # perhaps that very client, back after a cut
            text += ("; if it is the same client reconnecting, its old tunnel ends within"
                     " %s, when heartbeats to it fail"
                     % _duration(self.settings.report_interval * HEARTBEAT_MISSES))
        return text

    def _authenticate(self, control: socket.socket, who: str) -> Optional[bytes]:
        """Run the key handshake; the tunnel signal to send, or None (logged)."""
        server_nonce = auth.new_nonce()
        try:
            control.settimeout(HANDSHAKE_TIMEOUT)
            control.sendall(protocol.encode_auth_challenge(server_nonce))
            # A peek first: a client without a key closes on the challenge
            # without a byte, which deserves its own line (it says what to do).
            if not control.recv(1, socket.MSG_PEEK) and not self._was_cut(control, who):
                self.log.warning("Tunnel: %s sent no key: it closed the connection on the key"
                                 " challenge; this server requires its shared key: give the"
                                 " client the same one (client://KEY@host:port/... or"
                                 " NODEPASS_KEY)", who)
                return None
            response = readers.recv_line(control, protocol.MAX_SIGNAL_LENGTH)
            client_nonce = auth.check_client_response(self.config.auth_key, server_nonce,
                                                      response)
            if client_nonce is None:
                control.sendall(protocol.AUTH_REJECTION)
            control.settimeout(None)
        except socket.timeout:
            self.log.warning("Tunnel: %s sent no key within %s of the key challenge (a client"
                             " without the key, a NodePass v1.0 client, which cannot use one,"
                             " or not a client at all)", who, _duration(HANDSHAKE_TIMEOUT))
            return None
        except OSError as exc:
            if not self._was_cut(control, who):
                self.log.warning("Tunnel: %s did not finish the key handshake: %s", who,
                                 net.describe(exc))
            return None
        if client_nonce is None:
            self.stats.auth_failures += 1
            self.log.warning("Tunnel: %s failed authentication: its key response does not"
                             " prove this server's key (a wrong key)", who)
            return None
        return auth.encode_tunnel_signal(self.config.auth_key, client_nonce, server_nonce,
                                         self.data_port, self.config.tls_mode,
                                         self.offers_udp_flow)

    def _was_cut(self, control: socket.socket, who: str) -> bool:
        """Whether spawn() cut this handshake to make room (then logged here)."""
        if control in self._pending:
            return False
        self.log.warning("Tunnel: cut %s in its key handshake: %d tunnel connections were"
                         " handshaking at once (the oldest goes first)", who,
                         MAX_PENDING_CONTROLS)
        return True

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


def _send_quietly(control: socket.socket, line: bytes) -> None:
    """Write a last line to a peer about to be closed; if it is gone, so be it."""
    try:
        control.settimeout(HANDSHAKE_TIMEOUT)
        control.sendall(line)
    except OSError:
        pass


def _duration(seconds: float) -> str:
    """A span for a log line: "0.5s", "42s", "5m12s", "3h04m", "2d03h"."""
    if seconds < 10:
        return "%.1fs" % max(0.0, seconds)
    whole = int(seconds)
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                          ("m", 60, "s", 1)):
        if whole >= size:
            return "%d%s%02d%s" % (whole // size, unit, whole % size // small_size, small)
    return "%ds" % whole


def _wall_clock(stamp: float) -> str:
    """A moment as the log's own timestamps show it (local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


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


def open_client_session(config: Config, settings: Settings, log,
                        control: Optional[socket.socket] = None) -> ClientSession:
    """Dial the tunnel (unless ``control`` is one already dialed, its first
    bytes unread), run the handshake and accept the extensions offered.

    Raises ServerUnreachable if the dial fails, TunnelRefused if the server
    turns this client away, and other errors if the tunnel does not open."""
    if control is None:
        control = dial_tunnel(config.tunnel)
    try:
        silence = settings.report_interval * HEARTBEAT_MISSES
        net.set_user_timeout(control, silence)
        control.settimeout(HANDSHAKE_TIMEOUT)
        lines = control.makefile("rb")
        try:
            signal = client_handshake(config, control, lines)
        except socket.timeout:
            raise ConnectionError("no tunnel signal from the server within %s"
                                  % _duration(HANDSHAKE_TIMEOUT)) from None
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


def dial_tunnel(tunnel) -> socket.socket:
    """The tunnel connection; ServerUnreachable if it cannot be dialed."""
    try:
        return net.dial_tcp(tunnel, CONNECT_TIMEOUT)
    except OSError as exc:
        raise ServerUnreachable("cannot reach server %s: %s"
                                % (tunnel, net.describe(exc))) from exc


def client_handshake(config: Config, control: socket.socket, lines) -> Signal:
    """Read the tunnel signal, proving the shared key first if there is one."""
    signal = protocol.parse_signal(_first_line(config, lines, after_key=False))
    key = config.auth_key
    if not protocol.is_auth_challenge(signal):
        if key is not None:
            raise SessionError("server %s does not ask for the shared key; refusing it"
                               " (is it a NodePass v1.0 server, or an impostor?)"
                               % (config.tunnel,))
        return protocol.check_tunnel_signal(signal)
    if key is None:
        raise SessionError("server %s requires a shared key and this client has none: give"
                           " it the server's key, client://KEY@host:port/... or NODEPASS_KEY"
                           % (config.tunnel,))
    server_nonce, client_nonce = signal.query.get(protocol.FIELD_NONCE, ""), auth.new_nonce()
    if not auth.is_nonce(server_nonce):
        raise protocol.ProtocolError("bad authentication challenge")
    control.sendall(auth.client_response(key, server_nonce, client_nonce))
    answer = protocol.parse_signal(_first_line(config, lines, after_key=True))
    refusal = protocol.refusal_reason(answer)
    if refusal == protocol.REFUSED_BUSY:
        raise TunnelRefused("server %s already serves another client (a server takes one"
                            " client): stop the other client, or give this one a server of"
                            " its own; retrying" % (config.tunnel,), certain=True)
    if refusal == protocol.REFUSED_COOLDOWN:
        raise TunnelRefused("server %s is pausing after its last client left"
                            " (SERVICE_COOLDOWN); retrying" % (config.tunnel,), certain=True)
    if protocol.is_auth_rejection(answer):
        raise auth.AuthError("server %s rejected our shared key" % (config.tunnel,))
    if not auth.check_tunnel_signal(key, client_nonce, server_nonce, answer):
        raise auth.AuthError("server %s did not prove the shared key (wrong key, or a"
                             " tampered tunnel signal)" % (config.tunnel,))
    return protocol.check_tunnel_signal(answer)


def _first_line(config: Config, lines, after_key: bool) -> bytes:
    """The server's first line (or its answer to our key proof). A close before
    it is how a server without a key (ours or v1.0) turns a client away: it
    cannot tell a v1.0 client why without changing v1.0's bytes. So we guess."""
    try:
        return read_signal_line(lines)
    except TunnelClosed:
        pass
    raise TunnelRefused("server %s closed the tunnel %s: most likely it already serves"
                        " another client (a server takes one client), or still holds this"
                        " client's last tunnel; stop the other client, or give this one a"
                        " server of its own; retrying"
                        % (config.tunnel, "after the key handshake" if after_key
                           else "before sending its tunnel signal"), certain=False)


def read_signal_line(lines) -> bytes:
    """One signal line; ProtocolError (the rest skipped) if it is too long."""
    line = lines.readline(protocol.MAX_SIGNAL_LENGTH + 1)
    if not line:
        raise TunnelClosed("the server closed the tunnel")
    if not line.endswith(b"\n") and len(line) > protocol.MAX_SIGNAL_LENGTH:
        while line and not line.endswith(b"\n"):  # skip the rest of the long line
            line = lines.readline(protocol.MAX_SIGNAL_LENGTH + 1)
        raise protocol.ProtocolError("signal longer than %d bytes" % protocol.MAX_SIGNAL_LENGTH)
    return line
