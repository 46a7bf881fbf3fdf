"""The v1.14 client's handshake: one GET on a fresh TCP connection to the tunnel port.

    client                                          server
      | -- TCP connect --------------------------->  |
      | -- GET / + Bearer hex(HMAC(key, "")) ----->  |   handshake.encode_request
      | <- 200 {"flow","max","tls","type"}\\n ------  |   or 401 (wrong key), 404, 405
      |    both close; pool connections follow        |

[contract (c)]. The request is plaintext at every tls level. Only the TCP pool
(type "0") is served here; a refusal is a one-line error for the reconnect loop.
"""

import socket
import time

from nodepass_gevent.base import net
from nodepass_gevent.config import Address
from nodepass_gevent.wire.v114 import handshake
from nodepass_gevent.wire.v114.keys import derive_key

HANDSHAKE_TIMEOUT = 5.0  # NP_HANDSHAKE_TIMEOUT
READ_SIZE = 4096
HTTP_START = b"HTTP/"  # how every reply begins; a v1.0 server's line begins "//"


class V114Error(Exception):
    """A v1.14 session that could not open or went on no longer; one line, no traceback."""


class KeyRefused(V114Error):
    """The server answered 401: its key and ours differ."""


class WireMismatch(V114Error):
    """The server answered the GET with something that is not HTTP: another wire."""


def key_for(auth_key, port: int) -> bytes:
    """The v1.14 key: the URL's KEY@ if given, else FNV-1a-32 of the port [contract (b)]."""
    return auth_key if auth_key else derive_key(None, str(port))


def open_tunnel(address: Address, key: bytes, sni: str = "",
                timeout: float = HANDSHAKE_TIMEOUT, sock=None) -> handshake.TunnelConfig:
    """Handshake with the server at ``address`` (on ``sock`` if already dialed);
    its TunnelConfig, or V114Error/OSError."""
    if sock is None:
        sock = net.dial_tcp(address, timeout)
    try:
        sock.settimeout(timeout)
        sock.sendall(handshake.encode_request(key, handshake.server_name(address.host, sni)))
        reply = _read_reply(sock, address, time.monotonic() + timeout)
    except handshake.HandshakeError as exc:
        raise V114Error("tunnel to %s: bad handshake reply: %s" % (address, exc)) from None
    except socket.timeout:
        raise V114Error("tunnel to %s: no complete handshake reply within %.0fs"
                        % (address, timeout)) from None
    finally:
        net.close_quietly(sock)
    return _judge(address, reply)


def _read_reply(sock: socket.socket, address: Address,
                deadline: float) -> handshake.HandshakeReply:
    """The whole reply by ``deadline`` (socket.timeout after it), not each read by a
    timeout: a server that dribbles a byte a second would hold a read timeout off
    for hours (parse_reply bounds the bytes, this the time)."""
    buffer, reply = b"", None
    while reply is None:
        data = net.recv_by(sock, deadline, READ_SIZE)
        buffer += data
        if not HTTP_START.startswith(buffer[:len(HTTP_START)]):  # no need to wait for more
            raise WireMismatch("tunnel to %s: the server answered the v1.14 handshake with"
                               " %r, not HTTP (a NodePass v1.0 server? pin wire=1.0)"
                               % (address, buffer[:40]))
        reply = handshake.parse_reply(buffer, eof=not data)
    return reply


def _judge(address: Address, reply: handshake.HandshakeReply) -> handshake.TunnelConfig:
    if reply.status == handshake.UNAUTHORIZED:
        raise KeyRefused("tunnel to %s: the server refused the key (401 Unauthorized): give"
                         " both sides the same KEY@ (or none on both)" % address)
    if reply.status != handshake.OK:
        raise V114Error("tunnel to %s: handshake refused with %d %s"
                        % (address, reply.status, reply.reason))
    try:
        config = handshake.parse_config(reply.body)
    except handshake.HandshakeError as exc:
        raise V114Error("tunnel to %s: %s" % (address, exc)) from None
    if config.type != handshake.POOL_TYPE_TCP:
        raise V114Error("tunnel to %s: the server uses pool type=%s; only type=0 (TCP) is"
                        " supported" % (address, config.type))
    if config.flow != handshake.FLOW_REVERSE:
        raise V114Error("tunnel to %s: the server runs in forward mode (flow +); only"
                        " reverse mode (flow -) is supported by this client" % address)
    return config
