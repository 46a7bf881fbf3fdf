"""UDP flows over a plain data connection, driven from event-loop callbacks.

What zerocopy.py is to TCP, this is to UDP flows (udp.py): no greenlet per
direction and no switch per datagram. A FrameLink watches the data
connection; every frame that has arrived is cut out of one read and handed
on at once (to the user's address on the server, to the target on the
client), and datagrams going the other way are framed and written straight
from the callback that received them. Only when the data connection has no
room are frames buffered (up to LINK_BUFFER_LIMIT; more are dropped, as UDP
may) until it can be written again.

The frames and their limits are udp.py's (and protocol.py's); the copy
contract is relay.py's: the link owns and closes the data connection (the
client's flow also its target socket), ends on EOF, aborts on any error,
ends when idle, and counts every datagram as it is passed on.

TLS data connections keep udp.py's greenlet path: TLS records need the SSL
object, not the socket.
"""

import errno
import os
import socket
import time
from typing import Callable, Optional

import gevent
import gevent.socket
from gevent.event import Event

from nodepass_gevent import net
from nodepass_gevent.log import log
from nodepass_gevent.protocol import FLOW_FRAME_HEADER

READ_SIZE = 262144          # one read of the data connection: many frames at once
TARGET_READS_PER_WAKEUP = 64  # replies taken off the target socket per callback
LINK_BUFFER_LIMIT = 1 << 20  # framed bytes waiting for room on the data connection
_HEADER = FLOW_FRAME_HEADER.size
_unpack_length = FLOW_FRAME_HEADER.unpack_from
_pack_length = FLOW_FRAME_HEADER.pack
_READ, _WRITE = 1, 2


def usable(data: socket.socket) -> bool:
    """Plain TCP (a gevent socket, not TLS in any form): the link can drive it."""
    return isinstance(data, gevent.socket.socket) and not hasattr(data, "_sslobj")


class FrameLink:
    """One flow's data connection: ``on_datagram(bytes)`` for each frame that
    arrives; ``send(datagram)`` frames one the other way. ``finished`` is set
    when the link has ended, for whatever reason (``why`` says it)."""

    def __init__(self, data: socket.socket, size_limit: int,
                 on_datagram: Callable[[bytes], None]) -> None:
        self.data, self.size_limit, self.on_datagram = data, size_limit, on_datagram
        self.fileno = data.fileno()
        self.finished = Event()
        self.why = ""
        self.last_active = time.monotonic()
        self._incoming = b""
        self._outgoing = bytearray()
        loop = gevent.get_hub().loop
        self._readable = loop.io(self.fileno, _READ)
        self._writable = loop.io(self.fileno, _WRITE)

    def start(self) -> None:
        self._readable.start(self._on_readable)

    def send(self, datagram: bytes) -> bool:
        """Frame and write ``datagram`` now if there is room, else buffer it;
        False if it was dropped (the link is this far behind, or ended)."""
        if self.finished.is_set():
            return False
        self.last_active = time.monotonic()
        framed = _pack_length(len(datagram)) + datagram
        if self._outgoing:
            if len(self._outgoing) >= LINK_BUFFER_LIMIT:
                return False
            self._outgoing += framed
            return True
        try:
            sent = os.write(self.fileno, framed)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.end("write failed: %s" % exc)
            return False
        if sent < len(framed):
            self._outgoing += framed[sent:]
            self._writable.start(self._on_writable)
        return True

    def end(self, why: str, abort: bool = True) -> None:
        """Stop both directions and close the data connection. Never raises."""
        if self.finished.is_set():
            return
        self.why = why
        for watcher in (self._readable, self._writable):
            watcher.stop()
            watcher.close()
        if abort:
            net.abort(self.data)
        net.close_quietly(self.data)
        self.finished.set()

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self.fileno, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end("read failed: %s" % exc)
            return
        if not chunk:
            self.end("closed by the peer", abort=False)
            return
        self.last_active = time.monotonic()
        buffer = self._incoming + chunk if self._incoming else chunk
        position, size = 0, len(buffer)
        while size - position >= _HEADER:
            length = _unpack_length(buffer, position)[0]
            if length > self.size_limit:
                self.end("a frame of %d bytes, above the %d-byte limit" % (length,
                                                                          self.size_limit))
                return
            start = position + _HEADER
            if size - start < length:
                break
            self.on_datagram(buffer[start:start + length])
            position = start + length
            if self.finished.is_set():
                return
        self._incoming = buffer[position:]

    def _on_writable(self) -> None:
        try:
            sent = os.write(self.fileno, self._outgoing)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end("write failed: %s" % exc)
            return
        del self._outgoing[:sent]
        if not self._outgoing:
            self._writable.stop()


def wait_until_idle_or_ended(link: FrameLink, idle_timeout: float) -> None:
    """Block the calling greenlet until the link ends, or ends it once nothing
    has passed either way for ``idle_timeout``."""
    while not link.finished.wait(max(0.05, link.last_active + idle_timeout
                                     - time.monotonic())):
        if time.monotonic() - link.last_active >= idle_timeout:
            link.end("idle", abort=False)


class TargetSide:
    """The client's UDP socket to the target, read from a callback: every reply
    waiting is framed onto the link in the same callback."""

    def __init__(self, target: socket.socket, link: FrameLink, size_limit: int,
                 count_reply: Callable[[int], None]) -> None:
        self.target, self.link, self.size_limit = target, link, size_limit
        self.count_reply = count_reply
        self._raw = target._sock  # non-blocking: gevent keeps its sockets so
        self._readable = gevent.get_hub().loop.io(target.fileno(), _READ)

    def start(self) -> None:
        self._readable.start(self._on_readable)

    def send(self, datagram: bytes) -> None:
        """A datagram from the server, to the target; dropped if it has no room."""
        try:
            self._raw.send(datagram)
        except (BlockingIOError, ConnectionRefusedError):
            pass  # no room, or an earlier ICMP port unreachable: UDP goes on
        except OSError as exc:
            self.link.end("target send failed: %s" % exc)

    def close(self) -> None:
        self._readable.stop()
        self._readable.close()
        net.close_quietly(self.target)

    def _on_readable(self) -> None:
        for _ in range(TARGET_READS_PER_WAKEUP):
            try:
                reply = self._raw.recv(self.size_limit)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                continue  # ICMP port unreachable from the target: UDP goes on
            except OSError as exc:
                self.link.end("target receive failed: %s" % exc)
                return
            if not self.link.send(reply):
                if self.link.finished.is_set():
                    return
                log.debug("UDP flow to target: link backed up, reply dropped")
                continue
            self.count_reply(len(reply))


def raw_sendto(listener: socket.socket) -> Optional[Callable]:
    """The listener's sendto that never blocks (for use in callbacks)."""
    raw = listener._sock

    def sendto(datagram: bytes, peer: tuple) -> None:
        try:
            raw.sendto(datagram, peer)
        except OSError as exc:  # no room, or the user's ICMP error: UDP may drop it
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                log.debug("UDP flow %s: reply not sent: %s", peer, exc)

    return sendto
