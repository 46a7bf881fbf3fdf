"""The data connection, both halves: TLS, the key proof, the id.

The client dials the server's data port ahead of time; the server wraps it
in TLS (tls=1 or 2), asks for the key proof if there is a shared key
(auth.py), and writes the connection's id (8 hex characters, protocol.py).
The connection then waits in a pool (pool.py) until a launch signal names
its id; from then on it carries one TCP connection, one v1 UDP datagram and
its reply, or one UDP flow. Under TLS it is a tlsstream.TLSStream (OpenSSL on
memory BIOs), which the TCP exchange copies with tlscopy.py's engine.

Without TLS and without a key the id is all there is to it, and neither
side spends a greenlet on it (v1.0 UDP uses a data connection per datagram):
the server writes the id from the accept callback (DataPort.handle_now), the
client dials and reads it from event-loop callbacks (PlainDial).

    client                                  server (data port)
      | ---- TCP connect ---------------------> |
      | <=== TLS handshake (tls=1, 2) =======> |
      | <--- nonce ---- / ---- MAC ---------->  |  only with a shared key
      | <--- "<id>" ---------------------------- |  then pooled on both sides
"""

import logging
import os
import socket
import ssl
from typing import Callable, Optional, Tuple

import gevent

from nodepass_gevent.base import health, net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import Address
from nodepass_gevent.copy import readers, tlsstream
from nodepass_gevent.wire.v1 import auth, protocol
from nodepass_gevent.wire.v1.protocol import AUTH_MAC_LENGTH, AUTH_NONCE_LENGTH, HANDSHAKE_TIMEOUT

CONNECT_TIMEOUT = 5.0
_READ = 1  # libev's EV_READ


# -- the server half ---------------------------------------------------------------

class DataPort:
    """Admits the connected client's data connections into the server's pool
    (the data listener's handler; the socket is filed, not closed, on success).

    With tls=0 and no key the whole handshake is the id, which the empty send
    buffer of a socket just accepted takes without waiting: the listener then
    tries ``handle_now`` in its accept callback, no greenlet per connection.
    Otherwise each handshake needs a greenlet of its own (``handle``).
    """

    def __init__(self, ssl_context: Optional[ssl.SSLContext], key: Optional[bytes],
                 pool, stats: Stats, log, current_session: Callable) -> None:
        # pool: the role's pool.ServerPool (tunnel/, above this layer), filled by add()
        self.ssl_context, self.key, self.pool = ssl_context, key, pool
        self.stats, self.log = stats, log
        self._current_session = current_session
        self.tls_streak = health.Streak()  # TLS handshakes failed since the last that worked

    def handle(self, sock: socket.socket, peer: tuple) -> None:
        session = self._session_of(sock, peer)
        if session is None:
            return
        connection_id = protocol.new_connection_id()
        sock = self._prove(sock, connection_id, peer)
        if sock is None:
            return
        if sock is False:
            self.stats.auth_failures += 1
            self.log.warning("Data: %s failed authentication", session.peer)
            return
        self._file(session, connection_id, sock)

    def handle_now(self, sock: socket.socket, peer: tuple) -> bool:
        """handle() in the accept callback, for a plain data port without a key:
        the id is all there is to write, and a fresh connection's empty send
        buffer takes it at once, so no greenlet is needed (v1.0 UDP makes a
        data connection per datagram). False: not such a port, or the id did
        not go out at once; handle() then runs as usual."""
        if self.ssl_context is not None or self.key is not None:
            return False
        session = self._session_of(sock, peer)
        if session is None:
            return True
        connection_id = protocol.new_connection_id()
        encoded = connection_id.encode("ascii")
        try:
            written = os.write(sock.fileno(), encoded)  # the socket underneath is non-blocking
        except BlockingIOError:
            return False  # nothing written: handle() can start afresh
        except OSError as exc:
            self.log.debug("Data: handshake with %s failed: %s", net.format_address(peer), exc)
            net.close_quietly(sock)
            return True
        if written < len(encoded):
            self.log.debug("Data: handshake with %s failed: id cut short",
                           net.format_address(peer))
            net.close_quietly(sock)
            return True
        self._file(session, connection_id, sock)
        return True

    def _session_of(self, sock: socket.socket, peer: tuple):
        """The session ``peer`` belongs to; None (``sock`` closed, logged) if none."""
        session = self._current_session()
        if session is None or peer[0] != session.peer_host:
            self.log.warning("Data: refused %s: not the connected tunnel client",
                             net.format_address(peer))
            net.close_quietly(sock)
            return None
        return session

    def _file(self, session, connection_id: str, sock: socket.socket) -> None:
        session.in_use = True
        if session.closed or not self.pool.add(connection_id, sock):
            net.close_quietly(sock)
            return
        if self.log.isEnabledFor(logging.DEBUG):  # once per data connection
            self.log.debug("Data: connection %s from %s pooled", connection_id, session.peer)

    def _prove(self, sock: socket.socket, connection_id: str, peer: tuple):
        """TLS, the key proof, the id: the ready socket; None if the handshake
        failed, False if the key was wrong (both closed)."""
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            if self.ssl_context is not None:
                sock = tlsstream.server_handshake(sock, self.ssl_context)
            if self.key is not None and not self._key_proven(sock):
                net.close_quietly(sock)
                return False
            net.send_message(sock, connection_id.encode("ascii"))
            sock.settimeout(None)
            if self.tls_streak.active and self.ssl_context is not None:
                self.log.info("Data: TLS handshakes with the client work again after %d"
                              " failures", self.tls_streak.end())
            return sock
        except (OSError, ValueError) as exc:
            self.log.debug("Data: handshake with %s failed: %s", net.format_address(peer), exc)
            if isinstance(exc, ssl.SSLError):
                self.stats.tls_failures += 1
                self._tls_failed(exc, peer)
            net.close_quietly(sock)  # the TLS stream, once made: it holds the descriptor
            return None

    def _tls_failed(self, exc: ssl.SSLError, peer: tuple) -> None:
        """A TLS handshake with the client failed: say so, at most every
        health.REPEAT s, with how the client can be made to trust us."""
        reason = health.describe_failure(exc)
        self.tls_streak.fail(reason)
        held = self.tls_streak.throttle.due()
        if held is None:
            return  # the debug line above said it
        hint = ""
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or \
                "CERTIFICATE_UNKNOWN" in reason:
            hint = ("; the client does not trust this server's certificate: give the client"
                    " the CA that signed crt= (SSL_CERT_FILE=/path/to/ca.pem on the client)")
        self.log.warning("Data: TLS handshake with client %s failed: %s (%d in a row"
                         "%s)%s", net.format_address(peer), reason, self.tls_streak.failures,
                         ", %d not logged" % held if held else "", hint)

    def _key_proven(self, sock: socket.socket) -> bool:
        nonce = auth.new_nonce()
        sock.sendall(nonce.encode("ascii"))
        response = readers.recv_exactly(sock, AUTH_MAC_LENGTH)
        return auth.check_data_response(self.key, nonce, response)


# -- the client half ---------------------------------------------------------------

def read_id(sock: socket.socket) -> str:
    """Exactly ID_LENGTH bytes: the id the server filed this connection under."""
    return check_id(readers.recv_exactly(sock, protocol.ID_LENGTH))


def check_id(received: bytes) -> str:
    """The id in the ID_LENGTH bytes ``received``; ProtocolError if they are not one."""
    connection_id = received.decode("ascii", "replace")
    if not protocol.is_connection_id(connection_id):
        raise protocol.ProtocolError("bad data connection id %r" % received)
    return connection_id


class Dialer:
    """Dials one data connection of a session (the client pool's ``dial``).

    ``on_verified(certificate)``, if given, is called once, after the first
    handshake that verified the server's certificate (tls=2), with the
    certificate as ssl's getpeercert() gives it.
    """

    def __init__(self, tunnel: Address, sockaddr: tuple, context: Optional[ssl.SSLContext],
                 key: Optional[bytes], stats: Stats,
                 on_verified: Optional[Callable[[dict], None]] = None) -> None:
        self.tunnel, self.sockaddr, self.context, self.key = tunnel, sockaddr, context, key
        self.stats = stats
        self.on_verified = on_verified
        if context is None or context.verify_mode != ssl.CERT_REQUIRED:
            self.on_verified = None  # nothing verified, nothing to announce

    def remedy(self, exc: BaseException) -> str:
        """What the operator can do about a failed dial ("" if we cannot tell)."""
        if health.is_untrusted_certificate(exc):
            return health.trust_remedy(self.tunnel.dial_host)
        if isinstance(exc, (ConnectionRefusedError, socket.timeout, TimeoutError)):
            return ("the server's data port %d must be reachable from this client"
                    " (a firewall must let it through, as well as the tunnel port %d)"
                    % (self.sockaddr[1], self.tunnel.port))
        return ""

    def __call__(self) -> Tuple[str, socket.socket]:  # pool.DataConnection
        self.stats.data_dials += 1
        try:
            sock = self._connect()
        except OSError:
            self.stats.data_dial_failures += 1
            raise
        try:
            if self.context is not None:
                sock = tlsstream.client_handshake(sock, self.context, self.tunnel.dial_host)
                if self.on_verified is not None:
                    announce, self.on_verified = self.on_verified, None
                    announce(sock.getpeercert())
            if self.key is not None:
                nonce = readers.recv_exactly(sock, AUTH_NONCE_LENGTH).decode("ascii", "replace")
                sock.sendall(auth.data_response(self.key, nonce))
            connection_id = read_id(sock)
            sock.settimeout(None)
            return connection_id, sock
        except BaseException as exc:
            self.stats.data_dial_failures += 1
            if isinstance(exc, ssl.SSLError):
                self.stats.tls_failures += 1
            net.close_quietly(sock)  # the TLS stream, once made: it holds the descriptor
            raise

    def start(self, on_done: Callable) -> Optional["PlainDial"]:
        """Dial from event-loop callbacks when there is nothing to do but read
        the id (no TLS, no key): the dial under way, which calls
        ``on_done(dial, connection, error)`` once (one of the last two is
        None); OSError if it cannot even start. None: not such a session,
        call the dialer (in a greenlet) instead."""
        if self.context is not None or self.key is not None:
            return None
        self.stats.data_dials += 1
        try:
            return PlainDial(self.sockaddr, self.stats, on_done)
        except OSError:
            self.stats.data_dial_failures += 1
            raise

    def _connect(self) -> socket.socket:
        """The TCP connection, its handshake timeout set. Without TLS the server
        speaks first (the id, or the key's nonce), so the connect is not
        waited for on its own: the first read waits for both, within
        HANDSHAKE_TIMEOUT (one wake-up fewer per data connection, and v1.0
        UDP spends one per datagram)."""
        if self.context is None:
            sock = net.start_tcp_dial(self.sockaddr)
        else:
            sock = net.dial_tcp(self.tunnel, CONNECT_TIMEOUT, self.sockaddr)
        sock.settimeout(HANDSHAKE_TIMEOUT)
        return sock


class PlainDial:
    """One plain data connection without a key, from event-loop callbacks:
    connect, read the id, hand it over; no greenlet (v1.0 UDP spends a data
    connection per datagram). Fails as Dialer does: OSError (a refused
    connect, a timeout) or ProtocolError (a bad id)."""

    def __init__(self, sockaddr: tuple, stats: Stats, on_done: Callable) -> None:
        self.stats, self.on_done = stats, on_done
        self.sock = net.start_tcp_dial(sockaddr)
        self._fileno = self.sock.fileno()
        self._received = b""
        loop = gevent.get_hub().loop
        self._readable = loop.io(self._fileno, _READ)
        self._deadline = loop.timer(HANDSHAKE_TIMEOUT)
        self._readable.start(self._on_readable)
        self._deadline.start(self._on_deadline)

    def cancel(self) -> None:
        """Stop and close, without a word to ``on_done`` (the pool is closing). Never raises."""
        self._stop()
        net.close_quietly(self.sock)

    def _on_readable(self) -> None:
        try:
            connection_id = self._read()
        except BlockingIOError:
            return
        except BaseException as exc:  # noqa: B902 - on_done tells failures from bugs
            self._fail(exc)
            return
        if connection_id is not None:
            self._stop()
            self.sock.settimeout(None)
            self.on_done(self, (connection_id, self.sock), None)

    def _read(self) -> Optional[str]:
        """The id once all of it is there, None before; raises as Dialer does
        (a failed connect is this read's error)."""
        chunk = os.read(self._fileno, protocol.ID_LENGTH - len(self._received))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes"
                                  % (len(self._received), protocol.ID_LENGTH))
        self._received += chunk
        if len(self._received) < protocol.ID_LENGTH:
            return None
        return check_id(self._received)

    def _on_deadline(self) -> None:
        self._fail(socket.timeout("timed out"))

    def _fail(self, error: BaseException) -> None:
        self.stats.data_dial_failures += 1
        self.cancel()
        self.on_done(self, None, error)

    def _stop(self) -> None:
        for watcher in (self._readable, self._deadline):
            watcher.stop()
            watcher.close()
