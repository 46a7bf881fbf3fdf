"""UDP flows over a plain data connection, driven from event-loop callbacks.

What zerocopy.py is to TCP, this is to UDP flows (udp.py): no greenlet per
direction and no switch per datagram. A FrameLink watches the data
connection; every frame that has arrived is cut out of one read and handed
on at once (to the user's address on the server, to the target on the
client), and datagrams going the other way are framed and written straight
from the callback that received them. Only when the data connection has no
room are frames buffered (up to LINK_BUFFER_LIMIT; more are dropped, as UDP
may) until it can be written again.

Per datagram, the path does what it must and little else: one system call
each way, reads into buffers made once per process (a callback is done with
them before it returns, and the hub runs one callback at a time), frames
handed on as views of those buffers rather than copies, and no read that is
expected to fail (its exception costs more than what it would save; see
TargetSide).

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
import struct
import time
from typing import Callable, Optional

import gevent
import gevent.socket
from gevent.event import Event

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.log import log

FLOW_FRAME_HEADER = struct.Struct("!H")  # a flow frame: the datagram's length, big-endian
READ_SIZE = 262144          # one read of the data connection: many frames at once
LINK_BUFFER_LIMIT = 1 << 20  # framed bytes waiting for room on the data connection
# What a frame's 2-byte length can say, and more than any UDP datagram holds
# (65,507 bytes over IPv4, 65,527 over IPv6): flows carry every datagram whole.
LARGEST_DATAGRAM = 65535
_HEADER = FLOW_FRAME_HEADER.size
_unpack_length = FLOW_FRAME_HEADER.unpack_from
_pack_length = FLOW_FRAME_HEADER.pack
_pack_length_into = FLOW_FRAME_HEADER.pack_into
_write = os.write
_READ, _WRITE = 1, 2

# The process's read buffers (see the module docstring): what FrameLinks read
# from their data connections, and a reply read off a target socket behind
# room for its frame header.
_frames_in = bytearray(READ_SIZE)
_frames_view = memoryview(_frames_in)
_reply_frame = bytearray(_HEADER + LARGEST_DATAGRAM)
_reply_view = memoryview(_reply_frame)
_reply_body = _reply_view[_HEADER:]


def usable(data: socket.socket) -> bool:
    """Plain TCP (a gevent socket, not TLS in any form): the link can drive it."""
    return isinstance(data, gevent.socket.socket) and not hasattr(data, "_sslobj")


class FrameLink:
    """One flow's data connection: ``on_datagram(view)`` for each frame that
    arrives (a memoryview of its datagram, valid only during the call: pass it
    on or copy it); ``send_frame(framed)`` writes one the other way.
    ``open`` is False once the link has ended, for whatever reason (``why``
    says it), and ``finished`` is set then, for a greenlet to wait on."""

    def __init__(self, data: socket.socket, size_limit: int,
                 on_datagram: Callable[[memoryview], None]) -> None:
        self.data, self.size_limit, self.on_datagram = data, size_limit, on_datagram
        self.fileno = data.fileno()
        self._recv_into = data._sock.recv_into  # non-blocking: gevent keeps its sockets so
        self.open = True  # what the callbacks check: an attribute, not Event.is_set()
        self.finished = Event()
        self.why = ""
        self.last_active = time.monotonic()
        self._incoming = b""  # the start of a frame that the last read cut
        self._outgoing = bytearray()
        loop = gevent.get_hub().loop
        self._readable = loop.io(self.fileno, _READ)
        self._writable = loop.io(self.fileno, _WRITE)

    def start(self) -> None:
        self._readable.start(self._on_readable)

    def send_frame(self, framed) -> bool:
        """Write one frame (``udp.frame(datagram)``, or a view of one) now if there
        is room, else buffer it; False if it was dropped (the link is this far
        behind, or ended)."""
        if not self.open:
            return False
        self.last_active = time.monotonic()
        if self._outgoing:
            if len(self._outgoing) >= LINK_BUFFER_LIMIT:
                return False
            self._outgoing += framed
            return True
        try:
            sent = _write(self.fileno, framed)
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
        if not self.open:
            return
        self.open = False
        self.why = why
        for watcher in (self._readable, self._writable):
            watcher.stop()
            watcher.close()
        if abort:
            net.abort(self.data)
        net.close_quietly(self.data)
        self.finished.set()

    def _on_readable(self) -> None:
        kept = len(self._incoming)
        try:
            if kept:
                _frames_in[:kept] = self._incoming
                received = self._recv_into(_frames_view[kept:])
            else:
                received = self._recv_into(_frames_in)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end("read failed: %s" % exc)
            return
        if not received:
            self.end("closed by the peer", abort=False)
            return
        self.last_active = time.monotonic()
        position, size = 0, kept + received
        while size - position >= _HEADER:
            length = _unpack_length(_frames_in, position)[0]
            if length > self.size_limit:
                self.end("a frame of %d bytes, above the %d-byte limit" % (length,
                                                                          self.size_limit))
                return
            start = position + _HEADER
            end = start + length
            if end > size:
                break
            self.on_datagram(_frames_view[start:end])
            position = end
            if not self.open:
                return
        self._incoming = _frames_in[position:size] if position < size else b""

    def _on_writable(self) -> None:
        try:
            sent = _write(self.fileno, self._outgoing)
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
    """The client's UDP socket to the target, read from a callback: a reply is
    framed onto the link in the callback that received it, whole (it is read
    into room for LARGEST_DATAGRAM, which no UDP datagram exceeds).

    One reply per callback: the loop's epoll is level-triggered, so a second
    one waiting wakes the next iteration, which costs less than the read that
    fails with EAGAIN after every reply (an exception) when, as in a
    request/reply flow, none is waiting."""

    def __init__(self, target: socket.socket, link: FrameLink, stats: Stats) -> None:
        self.target, self.link = target, link
        self.count_datagram = stats.udp_datagram
        self.count_reply = stats.udp_reply
        self._raw = target._sock  # non-blocking: gevent keeps its sockets so
        self._recv_into = self._raw.recv_into
        self._readable = gevent.get_hub().loop.io(target.fileno(), _READ)

    def start(self) -> None:
        self._readable.start(self._on_readable)

    def send(self, datagram: memoryview) -> None:
        """A datagram from the server (the link's ``on_datagram``), to the
        target, counted; dropped if it has no room."""
        try:
            self._raw.send(datagram)
        except (BlockingIOError, ConnectionRefusedError):
            pass  # no room, or an earlier ICMP port unreachable: UDP goes on
        except OSError as exc:
            self.link.end("target send failed: %s" % exc)
            return
        self.count_datagram(len(datagram))

    def close(self) -> None:
        self._readable.stop()
        self._readable.close()
        net.close_quietly(self.target)

    def _on_readable(self) -> None:
        try:
            size = self._recv_into(_reply_body)
        except (BlockingIOError, ConnectionRefusedError):
            return  # nothing after all, or ICMP port unreachable from the target: UDP goes on
        except OSError as exc:
            self.link.end("target receive failed: %s" % exc)
            return
        _pack_length_into(_reply_frame, 0, size)
        if self.link.send_frame(_reply_view[:_HEADER + size]):
            self.count_reply(size)
        elif self.link.open:
            log.debug("UDP flow to target: link backed up, reply dropped")


def reply_sender(listener: socket.socket, peer: tuple, count_reply: Callable[[int], None],
                 pass_reply: Optional[Callable[[int], bool]]) -> Callable[[memoryview], None]:
    """The server's ``on_datagram`` for one user: a reply sent to ``peer`` from
    the shared listener, without blocking (for use in callbacks), counted;
    ``pass_reply(size)`` False (over the server's rate=) drops it."""
    sendto = listener._sock.sendto

    def send_reply(reply: memoryview) -> None:
        size = len(reply)
        if pass_reply is not None and not pass_reply(size):
            return
        try:
            sendto(reply, peer)
        except OSError as exc:  # no room, or the user's ICMP error: UDP may drop it
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                log.debug("UDP flow %s: reply not sent: %s", peer, exc)
            return
        count_reply(size)

    return send_reply
