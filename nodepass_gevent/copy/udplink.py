"""UDP flows over a data connection (plain or TLS), driven from event-loop callbacks.

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

A TLS data connection (a tlsstream.TLSStream) gets a TLSFrameLink, the
same link with OpenSSL's memory BIOs between the socket and the frames, as
tlscopy.py does for TCP: ciphertext read in one recv goes into the incoming
BIO and every record in it is decrypted into the frame buffer at once; a
frame going out is one SSLObject.write (one record) and one send. So a TLS
flow costs what a plain one does plus the cipher, not a greenlet switch and
a buffered reader per datagram.
"""

import errno
import os
import socket
import ssl
import struct
import time
from typing import Callable, Optional

import gevent
import gevent.socket
from gevent.event import Event

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy.tlsstream import TLSStream
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
_cipher_in = bytearray(READ_SIZE)  # TLSFrameLink: ciphertext, before the incoming BIO
_cipher_view = memoryview(_cipher_in)


def usable(data: socket.socket) -> bool:
    """Plain TCP (a gevent socket, not an SSLSocket) or a TLSStream: a link can drive it."""
    return isinstance(data, TLSStream) or (isinstance(data, gevent.socket.socket)
                                           and not hasattr(data, "_sslobj"))


def open_link(data, size_limit: int,
              on_datagram: Optional[Callable[[memoryview], None]]) -> "FrameLink":
    """The link for a ``usable`` data connection: TLSFrameLink under TLS."""
    kind = TLSFrameLink if isinstance(data, TLSStream) else FrameLink
    return kind(data, size_limit, on_datagram)


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
        # non-blocking: gevent keeps its sockets so, a TLSStream its ``raw`` one
        raw = data.raw if isinstance(data, TLSStream) else data._sock
        self._recv_into = raw.recv_into
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
        self._write_or_keep(framed)
        return self.open

    def _write_or_keep(self, data) -> None:
        """Write as much of ``data`` as there is room for; keep the rest for
        _on_writable (nothing may be kept already)."""
        try:
            sent = _write(self.fileno, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.end("write failed: %s" % exc)
            return
        if sent < len(data):
            self._outgoing += data[sent:]
            self._writable.start(self._on_writable)

    def _receive(self, into) -> int:
        """One read of the data connection into ``into``: the bytes read, 0 at
        EOF, -1 if there was nothing after all or the read failed (then ended)."""
        try:
            return self._recv_into(into)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self.end("read failed: %s" % exc)
            return -1

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
        if kept:
            _frames_in[:kept] = self._incoming
            received = self._receive(_frames_view[kept:])
        else:
            received = self._receive(_frames_in)
        if received < 0:
            return
        if not received:
            self.end("closed by the peer", abort=False)
            return
        self.last_active = time.monotonic()
        self._deliver(kept + received)

    def _deliver(self, size: int) -> None:
        """Hand on every whole frame in _frames_in[:size]; keep the cut one's start."""
        position = 0
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


class TLSFrameLink(FrameLink):
    """A FrameLink over a TLSStream whose handshake is done (see the module
    docstring). The stream's own watchers and buffers rest: the link moves
    the records between the socket and its BIOs from here on."""

    def __init__(self, data: TLSStream, size_limit: int,
                 on_datagram: Callable[[memoryview], None]) -> None:
        super().__init__(data, size_limit, on_datagram)
        self._tls, self._to_tls, self._from_tls = data.tls, data.incoming, data.outgoing
        self._outgoing += data.unsent  # records the stream had not sent yet (none, usually)
        data.unsent = b""

    def start(self) -> None:
        super().start()
        if self._outgoing:
            self._writable.start(self._on_writable)
        if self.data.pending():  # read along with the launch, before the link was there
            gevent.get_hub().loop.run_callback(self._decrypt)

    def send_frame(self, framed) -> bool:
        """As FrameLink's, as one TLS record."""
        if not self.open or len(self._outgoing) >= LINK_BUFFER_LIMIT:
            return False
        self.last_active = time.monotonic()
        try:
            self._tls.write(framed)  # a memory BIO takes it all
        except (OSError, ValueError) as exc:
            self.end("TLS write failed: %s" % exc)
            return False
        self._send_records()
        return self.open

    def _send_records(self) -> None:
        records = self._from_tls.read()
        if self._outgoing:
            self._outgoing += records
        else:
            self._write_or_keep(records)

    def _on_readable(self) -> None:
        received = self._receive(_cipher_in)
        if received < 0:
            return
        if received:
            self._to_tls.write(_cipher_view[:received])
        else:
            self._to_tls.write_eof()
            self._readable.stop()  # EOF stays readable: once is enough
        self._decrypt()

    def _decrypt(self) -> None:
        """Every record that has arrived, decrypted into _frames_in and handed on;
        the link ends at the stream's end (close_notify or a bare FIN)."""
        pending, incoming = self._tls.pending, self._to_tls
        while self.open:
            kept = len(self._incoming)
            if kept:
                _frames_in[:kept] = self._incoming
            size, got = kept, 1
            while size < READ_SIZE:
                got = self._read_clear(size)
                if got <= 0:
                    break
                size += got
                if not incoming.pending and not pending():
                    # Nothing left to decrypt: skip the read that would only
                    # raise SSLWantReadError, an exception per datagram.
                    break
            if not self.open:  # a bad record
                return
            if self._from_tls.pending:  # OpenSSL answered something (a key update)
                self._send_records()
            if size > kept:
                self.last_active = time.monotonic()
                self._deliver(size)
            if got == 0:
                self.end("closed by the peer", abort=False)
            if size < READ_SIZE:  # else more may wait in OpenSSL: another round
                return

    def _read_clear(self, size: int) -> int:
        """One SSLObject.read into _frames_in[size:]: the bytes, 0 at the stream's
        end, -1 if no whole record is there (or a bad one ended the link)."""
        try:
            return self._tls.read(READ_SIZE - size, _frames_view[size:] if size else _frames_in)
        except ssl.SSLWantReadError:
            return -1
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0
        except (OSError, ValueError) as exc:
            self.end("TLS read failed: %s" % exc)
            return -1


def wait_until_idle_or_ended(link: FrameLink, idle_timeout: Callable[[], float]) -> None:
    """Block the calling greenlet until the link ends, or ends it once nothing
    has passed either way for ``idle_timeout()`` seconds (asked at each wake-up:
    a server's flow lives longer once its user has sent a second datagram)."""
    while not link.finished.wait(max(0.05, link.last_active + idle_timeout()
                                     - time.monotonic())):
        if time.monotonic() - link.last_active >= idle_timeout():
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
