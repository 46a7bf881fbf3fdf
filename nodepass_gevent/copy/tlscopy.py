"""Copying between a plain TCP socket and a TLS data connection, from event-loop callbacks.

The TLS twin of zerocopy.py: no greenlet per direction and no greenlet switch
per record. Four io watchers (plain readable/writable, TLS readable/writable)
call into one _Exchange; only the caller's greenlet waits, for the end. Its
code is three classes, one job each:

    _ToTLS      plain -> TLS: read, encrypt, send the records; FIN at the end
    _FromTLS    TLS -> plain: read, decrypt, send the clear bytes; FIN at the end
    _Exchange   both directions of one connection: the wiring (the calls a
                message makes, bound once; the four watchers; where each
                direction starts), the end of both, and a failure that cuts
                both at once

The directions are base classes of _Exchange, not objects of their own, and
_Exchange sets their state and starts them inline: making, starting and
stopping it takes 36.6k instructions (callgrind), on every connection a tls=1
tunnel carries; as three objects it took 44.9k, and with a method per
direction to set its state and one to start it 38.5k. Each direction names
the attributes it owns (STATE); _Exchange has the slots, all of them.

Towards TLS, per read: one recv of up to CHUNK_SIZE plaintext, one
SSLObject.write (OpenSSL cuts it into 16 KB records), one send of all the
records; a few reads per wake-up while the socket keeps filling them. From
TLS, per read: one recv of up to CHUNK_SIZE ciphertext into the incoming BIO,
every complete record in it decrypted into one buffer, one send of that
buffer; as many reads per wake-up. Where a send would block, the direction
keeps what is left, stops reading, and waits for room. The records OpenSSL
writes while decrypting (a key update's answer) go out the way towards TLS,
behind the records already waiting there.

The socket reads and decryption use two module-wide buffers: a callback never
yields, so the exchanges of a process can share them. A connection that has
never moved more than a few records at once holds almost no buffer; one that
has carried a bulk transfer keeps, until it closes, the room its two memory
BIOs grew to (about CHUNK_SIZE each: OpenSSL never shrinks them), plus what a
full sink leaves unsent, as a copy.

Obeys the copy contract (relay.py's module docstring): both sockets are owned
and closed; EOF from either side becomes a half-close of the other (towards
TLS a bare TCP FIN once every record is out, never close_notify); an error on
either side (reset, broken pipe, a bad record) shuts both down and ends the
exchange; bytes are counted as they are written.

Every small message runs through these callbacks, so their shape is measured
(callgrind, user-space instructions per round trip): the calls a message makes
are bound once into slots and taken as locals, the read loops iterate over
ranges made once, and no read is made that could only raise SSLWantReadError.
"""

import socket
import ssl
from typing import Callable, Tuple

from gevent import get_hub
from gevent.event import Event

from nodepass_gevent.base import net
from nodepass_gevent.copy.tlsstream import TLSStream
from nodepass_gevent.log import log

# 256 KB reads and sends: against 64 KB, a quarter of the system calls,
# wake-ups of the peer and passes through these callbacks per GB (tunnel CPU
# per GB 5-15% lower in scripts/bench tls=1 bulk, throughput within its noise).
CHUNK_SIZE = 262144      # plaintext read from the plain socket per recv (16 records)
CLEAR_SIZE = 262144      # decrypted bytes gathered into one send towards the plain socket
CIPHER_READS = 4         # recvs of CHUNK_SIZE from the TLS socket per wake-up at most
PLAIN_READS = 4          # recvs from the plain socket per wake-up at most (fairness)
_READ, _WRITE = 1, 2     # libev event masks
_PLAIN_TURNS, _CIPHER_TURNS = range(PLAIN_READS), range(CIPHER_READS)  # made once, not per wake-up
_ERRORS = (OSError, ValueError)  # ssl.SSLError is an OSError

_chunk = bytearray(CHUNK_SIZE)
_chunk_view = memoryview(_chunk)
_clear = bytearray(CLEAR_SIZE)
_clear_view = memoryview(_clear)
_NOTHING = memoryview(b"")  # what a direction holds once all is sent (no allocation per send)

Counter = Callable[[int], None]


def exchange(left, right, count_forward: Counter, count_backward: Counter) -> Tuple[int, int]:
    """Copy left->right and right->left until both end; bytes moved each way.

    One of the two is a TLSStream (handshake done), the other a plain TCP
    socket. Obeys the copy contract; left->right is counted by count_forward.
    """
    if isinstance(left, TLSStream):
        plain, stream, count_to_tls, count_from_tls = right, left, count_backward, count_forward
    else:
        plain, stream, count_to_tls, count_from_tls = left, right, count_forward, count_backward
    run = None
    try:
        run = _Exchange(plain, stream, count_to_tls, count_from_tls)
        run.start()
        run.finished.wait()
        if stream is left:
            return run.from_tls_moved, run.to_tls_moved
        return run.to_tls_moved, run.from_tls_moved
    finally:
        if run is not None:
            run.stop()  # the watchers go before the descriptors they watch
        net.close_quietly(plain)
        net.close_quietly(stream)


class _ToTLS:
    """Plain -> TLS: plaintext read, encrypted, its records sent; a bare FIN at the end.

    A base of _Exchange, whose ``stream``, ``outgoing``, ``_fail`` and
    ``_one_ended`` it uses. ``cipher`` holds the records a send did not take
    and ``cipher_carries`` the plaintext bytes in them (counted once they are
    all out); while it holds any, the plain socket is not read.
    """

    __slots__ = ()
    STATE = ("plain_recv_into", "encrypt", "take_records", "tls_send", "count_to_tls",
             "plain_readable", "tls_writable",
             "cipher", "cipher_carries", "plain_eof", "to_tls_ended", "to_tls_moved")

    def _on_plain_readable(self) -> None:
        # Only runs while nothing is left unsent towards TLS (the watcher is
        # stopped until then), so the records of this read are all there is.
        recv_into, encrypt, take_records = self.plain_recv_into, self.encrypt, self.take_records
        send, count = self.tls_send, self.count_to_tls
        try:
            for _ in _PLAIN_TURNS:
                try:
                    size = recv_into(_chunk)
                except (BlockingIOError, InterruptedError):
                    return
                if size == 0:
                    self._plain_ended()
                    return
                encrypt(_chunk_view[:size])
                records = take_records()
                try:
                    sent = send(records)
                except (BlockingIOError, InterruptedError):
                    self.cipher, self.cipher_carries = memoryview(records), size
                    self._wait_for_tls_room()
                    return
                if sent == len(records):  # the common case: counted at once
                    self.to_tls_moved += size
                    count(size)
                else:  # the rest goes as _send_cipher sends it, counted once all is out
                    self.cipher, self.cipher_carries = memoryview(records)[sent:], size
                    if not self._send_cipher():
                        self._wait_for_tls_room()
                        return
                if size < CHUNK_SIZE:
                    return  # the socket is empty; the watcher is level-triggered
        except _ERRORS as exc:
            self._fail("towards TLS", exc)

    def _wait_for_tls_room(self) -> None:
        self.plain_readable.stop()  # TLS has no room for the records kept: wait for it first
        self.tls_writable.start(self._on_tls_writable)

    def _send_cipher(self) -> bool:
        """Send the records kept and those OpenSSL has written since; False if the
        socket has no room. TLS -> plain calls it too, for OpenSSL's answers."""
        while True:
            if not self.cipher:
                if not self.outgoing.pending:
                    break
                records = self.outgoing.read()
                if self.to_tls_ended:
                    continue  # a key update answer after our FIN: nowhere to go
                self.cipher = memoryview(records)
            try:
                sent = self.tls_send(self.cipher)
            except (BlockingIOError, InterruptedError):
                return False
            self.cipher = self.cipher[sent:]
        if self.cipher_carries:
            self.to_tls_moved += self.cipher_carries
            self.count_to_tls(self.cipher_carries)
            self.cipher_carries = 0
        return True

    def _on_tls_writable(self) -> None:
        try:
            if not self._send_cipher():
                return
            self.tls_writable.stop()
            if self.plain_eof:
                self._end_to_tls()
            elif not self.to_tls_ended:
                self.plain_readable.start(self._on_plain_readable)
        except _ERRORS as exc:
            self._fail("towards TLS", exc)

    def _plain_ended(self) -> None:
        self.plain_readable.stop()
        self.plain_eof = True
        if not self.cipher and not self.outgoing.pending:
            self._end_to_tls()
        # else the TLS writable watcher sends the rest, then ends this direction

    def _end_to_tls(self) -> None:
        """EOF from the plain side, every record out: a bare FIN (relay.half_close)."""
        try:
            self.stream.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.to_tls_ended = True
        self._one_ended()


class _FromTLS:
    """TLS -> plain: ciphertext into the incoming BIO, decrypted, sent; a FIN at the end.

    A base of _Exchange, whose ``plain``, ``stream``, ``incoming``,
    ``outgoing``, ``_fail`` and ``_one_ended`` it uses, and _ToTLS's
    ``_send_cipher`` for the records OpenSSL writes while decrypting.
    ``clear`` holds the decrypted bytes the plain socket had no room for;
    while it holds any, the TLS socket is not read.
    """

    __slots__ = ()
    STATE = ("tls_recv_into", "give_records", "decrypt", "plain_send", "count_from_tls",
             "tls_readable", "plain_writable",
             "clear", "tls_eof", "from_tls_ended", "from_tls_moved")

    def _on_tls_readable(self) -> None:
        # Only runs while nothing decrypted waits for the plain side (the watcher
        # is stopped until then) and before the end of the TLS side.
        recv_into, give_records = self.tls_recv_into, self.give_records
        try:
            for _ in _CIPHER_TURNS:
                # One recv into the incoming BIO, decrypted before the next, so the
                # BIO never holds much more than CHUNK_SIZE.
                try:
                    size = recv_into(_chunk)
                except (BlockingIOError, InterruptedError):
                    return  # every complete record before this was decrypted and sent
                if size:
                    give_records(_chunk_view[:size])
                else:
                    self.stream.eof = True
                    self.incoming.write_eof()
                if not self._send_clear():
                    self._wait_for_plain_room()
                    return
                if size < CHUNK_SIZE or self.tls_eof:
                    break  # the socket is empty, or the stream ended (close_notify)
            if self.tls_eof:
                self._end_from_tls()
        except _ERRORS as exc:
            self._fail("from TLS", exc)

    def _wait_for_plain_room(self) -> None:
        self.tls_readable.stop()  # the plain side has no room: wait for it
        self.plain_writable.start(self._on_plain_writable)

    def _send_clear(self) -> bool:
        """Decrypt what the incoming BIO holds and send it, one send per CLEAR_SIZE;
        False if the plain socket has no room (the rest is kept in ``clear``)."""
        if self.clear and not self._send_plain(self.clear):
            return False
        while not self.tls_eof:
            size = self._decrypt()
            if self.outgoing.pending and not self._send_cipher():  # OpenSSL's answer
                self._wait_for_tls_room()
            if size and not self._send_plain(_clear_view[:size]):
                return False
            if size < CLEAR_SIZE:
                break  # the BIO has no complete record left
        return True

    def _decrypt(self) -> int:
        """Decrypt complete records into the shared clear buffer; the bytes written."""
        size = 0
        read, incoming = self.decrypt, self.incoming
        while size < CLEAR_SIZE:
            try:
                got = read(CLEAR_SIZE - size, _clear_view[size:] if size else _clear)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.tls_eof = True
                break
            if not got:
                self.tls_eof = True
                break
            size += got
            if not incoming.pending:
                # Nothing left to decrypt (a record only partly read fills the
                # buffer, which ends the loop anyway): skip the read that would
                # only raise SSLWantReadError, an exception per small message.
                break
        if self.stream.eof and size < CLEAR_SIZE:
            self.tls_eof = True  # no more bytes will come (an incomplete record is dropped)
        return size

    def _send_plain(self, data: memoryview) -> bool:
        """Send ``data`` (counted as sent); keep a copy of what does not fit."""
        try:
            sent = self.plain_send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent:
            self.from_tls_moved += sent
            self.count_from_tls(sent)
        if sent == len(data):
            self.clear = _NOTHING
            return True
        # The shared buffer is reused by the next wake-up: keep a copy.
        rest = data[sent:]
        self.clear = rest if rest.obj is not _clear else memoryview(bytes(rest))
        return False

    def _on_plain_writable(self) -> None:
        try:
            if not self._send_clear():
                return
            self.plain_writable.stop()
            if self.tls_eof:
                self._end_from_tls()
            else:
                self.tls_readable.start(self._on_tls_readable)
        except _ERRORS as exc:
            self._fail("from TLS", exc)

    def _end_from_tls(self) -> None:
        """EOF from the TLS side, every decrypted byte out: a FIN to the plain side."""
        self.tls_readable.stop()
        if self.from_tls_ended:
            return
        try:
            self.plain.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.from_tls_ended = True
        self._one_ended()


class _Exchange(_ToTLS, _FromTLS):
    """Both directions between ``plain`` and ``stream``; see the module docstring."""

    # Slots: more than about 30 attributes in an instance dict lose the shared
    # key layout CPython 3.11+ reads each one in a few instructions, and the
    # callbacks read a dozen of them per message.
    __slots__ = ("plain", "plain_raw", "stream", "incoming", "outgoing", "watchers",
                 "finished") + _ToTLS.STATE + _FromTLS.STATE

    def __init__(self, plain: socket.socket, stream: TLSStream,
                 count_to_tls: Counter, count_from_tls: Counter) -> None:
        loop = get_hub().loop
        self.plain, self.stream = plain, stream
        self.plain_raw = getattr(plain, "_sock", plain)  # gevent's non-blocking socket inside
        self.incoming, self.outgoing = stream.incoming, stream.outgoing
        plain_fd, tls_fd = plain.fileno(), stream.fileno()
        plain_readable, plain_writable = loop.io(plain_fd, _READ), loop.io(plain_fd, _WRITE)
        tls_readable, tls_writable = loop.io(tls_fd, _READ), loop.io(tls_fd, _WRITE)
        self.watchers = (plain_readable, plain_writable, tls_readable, tls_writable)
        self.finished = Event()
        # The C object under ssl.SSLObject: its read and write are all the
        # Python wrappers do, one Python frame per record saved.
        tls = stream.tls._sslobj
        # The calls a small message makes, bound once: each callback takes them
        # as locals instead of looking up object and method per message.
        # _ToTLS's state:
        self.plain_recv_into, self.tls_send = self.plain_raw.recv_into, stream.raw.send
        self.encrypt, self.take_records = tls.write, self.outgoing.read
        self.count_to_tls = count_to_tls
        self.plain_readable, self.tls_writable = plain_readable, tls_writable
        self.cipher = memoryview(stream.unsent)  # what the stream's own sends left
        self.cipher_carries = 0
        self.plain_eof = False  # the plain side ended: FIN towards TLS once flushed
        self.to_tls_ended = False
        self.to_tls_moved = 0
        # _FromTLS's state:
        self.tls_recv_into, self.give_records = stream.raw.recv_into, self.incoming.write
        self.decrypt, self.plain_send = tls.read, self.plain_raw.send
        self.count_from_tls = count_from_tls
        self.tls_readable, self.plain_writable = tls_readable, plain_writable
        self.clear = _NOTHING
        self.tls_eof = False  # close_notify or FIN from the TLS side
        self.from_tls_ended = False
        self.from_tls_moved = 0

    def start(self) -> None:
        if self.plain_raw is self.plain:
            self.plain.setblocking(False)  # a socket gevent did not make
        if (self.cipher or self.outgoing.pending) and not self._send_cipher():
            self.tls_writable.start(self._on_tls_writable)  # the stream left records unsent
        else:
            self.plain_readable.start(self._on_plain_readable)
        if self.stream.pending() or self.stream.eof:
            # Bytes the stream already took off the socket (behind the id, say):
            # the socket will not announce them again. They go as soon as the
            # plain side has room, as decrypted bytes a full sink held back do.
            self.plain_writable.start(self._on_plain_writable)
        else:
            self.tls_readable.start(self._on_tls_readable)

    def stop(self) -> None:
        """Stop and release the watchers. Never raises."""
        for watcher in self.watchers:
            watcher.stop()
            watcher.close()

    def _one_ended(self) -> None:
        """A direction has half-closed its sink; once both have, the exchange is over."""
        if self.to_tls_ended and self.from_tls_ended:
            self.finished.set()

    def _fail(self, direction: str, exc: BaseException) -> None:
        """Reset, broken pipe or a bad record: end both directions at once."""
        log.debug("Relay: TLS exchange ended %s by %r", direction, exc)
        for watcher in self.watchers:
            watcher.stop()
        for sock in (self.plain, self.stream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.finished.set()
