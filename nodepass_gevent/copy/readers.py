"""Reading one message off a stream: the line, frame and fixed-size readers.

Each reads exactly one handshake line, key proof, connection id, UDP
datagram (v1.0) or flow frame, and nothing behind it that belongs to the
next reader (the copy engines in relay.py take the stream over afterwards).
What a wire's message says is the wire's: the v1.0 connection id, for
one, is checked in dataconn.py.
"""

import socket
import ssl
from typing import Optional

from nodepass_gevent.base import net
from nodepass_gevent.copy.udplink import FLOW_FRAME_HEADER


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes; ConnectionError if the peer closes first."""
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(received), size))
        received += chunk
    return received


def recv_line(sock: socket.socket, limit: int) -> bytes:
    """One line, newline included, read a byte at a time so nothing behind it
    is consumed; ConnectionError on EOF or a line longer than ``limit``.
    Only for the few short lines of a handshake."""
    line = b""
    while not line.endswith(b"\n"):
        if len(line) >= limit:
            raise ConnectionError("line longer than %d bytes" % limit)
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError("closed in the middle of a line")
        line += byte
    return line


def read_until_eof(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """Read up to ``limit`` bytes until the peer closes (or the timeout)."""
    sock.settimeout(timeout)
    parts, size = [], 0
    try:
        while size < limit:
            chunk = sock.recv(limit - size)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except socket.timeout:
        pass
    return b"".join(parts)


def read_burst(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """Read one message written in one go: wait for the first bytes, then take
    whatever has already arrived behind them.

    The peer may write a datagram as several TLS records or TCP segments
    (docs/protocol.md, "UDP over TLS cuts datagrams"), so one recv() is not
    enough, yet no length is sent.
    """
    sock.settimeout(timeout)
    first = sock.recv(limit)
    parts, size = [first], len(first)
    sock.settimeout(0)
    try:
        while first and size < limit and (_tls_pending(sock) or not net.is_idle(sock)):
            chunk = sock.recv(limit - size)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
        pass
    return b"".join(parts)


def _tls_pending(sock: socket.socket) -> int:
    # TLSStream (and SSLSocket): bytes read ahead. Looked up on the class: a
    # gevent socket's __getattr__ would raise and catch AttributeError twice.
    pending = getattr(type(sock), "pending", None)
    return pending(sock) if pending is not None else 0

def read_frame(reader, limit: int) -> Optional[bytes]:
    """The next datagram from a buffered reader; None at a clean end."""
    header = reader.read(FLOW_FRAME_HEADER.size)
    if not header:
        return None
    if len(header) < FLOW_FRAME_HEADER.size:
        raise ConnectionError("flow cut inside a frame header")
    (size,) = FLOW_FRAME_HEADER.unpack(header)
    if size > limit:
        raise ConnectionError("frame of %d bytes exceeds UDP_DATA_BUF_SIZE" % size)
    datagram = reader.read(size)
    if len(datagram) < size:
        raise ConnectionError("flow cut inside a frame")
    return datagram
