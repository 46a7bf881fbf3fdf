"""The v1.14 server's side of the tunnel port: the handshake, then pool connections.

    client                                          server (one tunnel port)
      | -- GET / + Bearer hex(HMAC(key, "")) ----->  |   read_request: one head, bounded
      | <- 405 / 404 / 401, close ----------------   |   refused: wait for the next one
      | <- 200 {"flow","max","tls","type"}\\n, close   |   passed: its IP owns the session
      |                                              |
      | -- TCP connect (+ TLS 1.3 at tls 1/2) ---->  |   accept_pool_connection
      | <- 4 bytes: the id -------------------------  |   the first: 00000000, the control

[contract (c), (d)]. The head is bounded by handshake.MAX_HEAD bytes and
HANDSHAKE_TIMEOUT seconds (Go waits longer; a real client sends its ~200 bytes
at once). What cannot be parsed gets Go's own 400 (or 431) and a close, as Go's
net/http does. The refusals are encoded by handshake.py, byte for byte.
"""

import socket
import ssl
import time
from typing import Callable, Container, Optional, Tuple

from nodepass_gevent.base import net
from nodepass_gevent.copy import tlsstream
from nodepass_gevent.wire.v114 import handshake, ids

HANDSHAKE_TIMEOUT = 5.0  # NP_HANDSHAKE_TIMEOUT
READ_SIZE = 4096
PROBE = "closed before a request"  # a connection that said nothing: a port probe
STATUS_TEXT = {
    handshake.METHOD_NOT_ALLOWED: "405 Method Not Allowed (not a GET)",
    handshake.NOT_FOUND: "404 Not Found (path is not /)",
    handshake.UNAUTHORIZED: "401 Unauthorized (wrong key: give both sides the same KEY@,"
                            " or none on both)",
}


class Answer:
    """How one handshake went: ``status`` (200 passed; None: no request came) and a
    line for the log."""

    __slots__ = ("status", "detail")

    def __init__(self, status: Optional[int], detail: str) -> None:
        self.status, self.detail = status, detail

    @property
    def passed(self) -> bool:
        return self.status == handshake.OK


def answer_handshake(sock: socket.socket, key: bytes, config: handshake.TunnelConfig,
                     timeout: float = HANDSHAKE_TIMEOUT) -> Answer:
    """Read one request on ``sock``, write v1.14's answer to it; never raises.

    The caller closes ``sock`` (every v1.14 reply says Connection: close).
    """
    try:
        head, complete = _read_head(sock, time.monotonic() + timeout)
        if not complete:
            if not head:
                return Answer(None, PROBE)
            return Answer(None, "closed after %d bytes that are not a request head: %r"
                          % (len(head), head[:40]))
        request = handshake.parse_request(head)
        status = handshake.judge_request(request, key)
        if status == handshake.OK:
            sock.sendall(handshake.encode_reply(config))
            return Answer(status, "passed")
        sock.sendall(handshake.encode_refusal(status))
        return Answer(status, STATUS_TEXT[status])
    except handshake.BadRequest as error:
        _send_quietly(sock, handshake.encode_bad_request(error))
        return Answer(error.status, "not a v1.14 handshake (%d): %s" % (error.status, error))
    except socket.timeout:
        return Answer(None, "no complete request within %.0fs" % timeout)
    except OSError as exc:
        return Answer(None, "handshake failed: %s" % net.describe(exc))


def _read_head(sock: socket.socket, deadline: float) -> Tuple[bytes, bool]:
    """(the request head through its empty line, True), or (what came, False) at
    EOF first; BadRequest (431) past MAX_HEAD bytes, socket.timeout past
    ``deadline`` (one for the whole head, as the client's reply has). Bytes
    after the head are dropped: a GET has no body."""
    buffer = b""
    while True:
        end = handshake.head_end(buffer)
        if end is not None:
            return buffer[:end], True
        data = net.recv_by(sock, deadline, READ_SIZE)
        if not data:
            return buffer, False
        buffer += data


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def accept_pool_connection(sock: socket.socket, context: Optional[ssl.SSLContext],
                           choose_id: Callable[[], Optional[bytes]]) -> Optional[socket.socket]:
    """TLS 1.3 at tls 1/2, then the 4-byte id ``choose_id()`` gives: the socket to
    pool (a TLSStream under TLS). The id is chosen after TLS, as v1.14 does: the
    first connection to finish its handshake is the control channel. None
    (``sock`` closed) if ``choose_id`` gives None (the pool is full); OSError or
    ssl.SSLError (closed too) if the client went away."""
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        if context is not None:
            sock = tlsstream.server_handshake(sock, context)
        raw_id = choose_id()
        if raw_id is None:
            net.close_quietly(sock)
            return None
        net.send_message(sock, raw_id)
        sock.settimeout(None)
        return sock
    except BaseException:
        net.close_quietly(sock)
        raise


def new_pool_id(taken: Container[str]) -> bytes:
    """A random id for a pool connection, never 00000000 nor one of ``taken`` (names)."""
    while True:
        raw = ids.new_id()
        if ids.id_name(raw) not in taken:
            return raw
