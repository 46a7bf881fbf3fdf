"""Zero-copy exchange between two plain TCP sockets: splice(2) through a pipe.

Bulk bytes go socket -> pipe -> socket inside the kernel and never reach
Python. Pipes are borrowed from a small shared pool only while bytes move and
returned empty, so an idle connection holds no descriptor beyond its two
sockets (Go's io.Copy keeps two pipes, four descriptors, per connection).

Small messages (requests, replies, keystrokes) are copied instead, through one
buffer shared by every connection: a read and a write per message (splice's two
calls cost the kernel more on a short message) in a callback that does nothing
else. Each direction adapts on its own: a read that fills the buffer means bulk,
and the next wake-up splices; a short fill that empties the socket means small
messages again.

Both directions are driven by event-loop callbacks rather than one greenlet
each: a waiting greenlet costs about 8 KB, a watcher a few hundred bytes, and
an idle tunnel may hold thousands of connections. Only the caller's greenlet
waits, for the end of the whole exchange.

splice(2) is reached through os.splice (Python 3.10+) or, on older Pythons,
through ctypes from libc with the same signature and the same exceptions, so
the engine below is one code path on every Python. engine() probes once per
process which of them the kernel accepts; where none does (a kernel or
sandbox that refuses splice) it returns None and relay.py copies through user
space instead.

With ``rate=`` each direction draws on a token bucket (ratelimit.py): every
splice is capped to the bytes granted, and a direction that gets no grant
stops its read watcher and queues at the bucket until its turn, so traffic
under the limit keeps the zero-copy path. Such a direction always splices: the
grants, not the messages, decide how much each read takes.
"""

import ctypes
import errno
import os
import select
import socket
from typing import Callable, List, Optional, Tuple

from gevent import get_hub
from gevent.event import Event

from nodepass_gevent.base import net
from nodepass_gevent.copy.pipes import PIPE_SIZE, Pipe, PipePool, pipes  # noqa: F401 (PipePool: tests)
from nodepass_gevent.edge.ratelimit import TokenBucket
from nodepass_gevent.log import log

FILLS_PER_WAKEUP = 16    # then yield to the loop, so one busy stream cannot starve others
SHORT_FILL = 16 * 1024   # a fill this small emptied the socket: wait for the next wakeup
COPY_SIZE = SHORT_FILL   # one copied read; a read that fills it is bulk: splice from then on
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_READ, _WRITE = 1, 2     # libev event masks


# The copy buffer of every direction in the process. Sharing it is safe: the
# directions run as callbacks of the one event loop, and a callback writes out
# what it read (or keeps the unsent rest as bytes of its own) before it returns.
_copy_buffer = memoryview(bytearray(COPY_SIZE))
_whole_buffer = [_copy_buffer]   # os.readv's list of buffers for a full-size read
_read_into, _write = os.readv, os.write  # one global lookup each on the hot path

# --------------------------------------------------------------------------
# splice(2) itself, and the choice of engine.

Splice = Callable[..., int]  # os.splice's signature: (src, dst, count, ..., flags=0) -> int
PROBE_BYTES = b"nodepass splice probe"
PROBE_WAIT = 2.0  # seconds for the probe's bytes to cross loopback


def libc_splice() -> Splice:
    """splice(2) from libc through ctypes, called and failing as os.splice does.

    Raises OSError (or AttributeError) when libc cannot be loaded or has no
    splice. The relay calls the C function itself (``splice.raw``): no Python
    frame per call for the EINTR retry, which its non-blocking calls rarely need.
    """
    function = ctypes.CDLL(None, use_errno=True).splice
    offset = ctypes.POINTER(ctypes.c_longlong)
    # ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out,
    #                size_t len, unsigned int flags);
    function.argtypes = (ctypes.c_int, offset, ctypes.c_int, offset, ctypes.c_size_t,
                         ctypes.c_uint)
    function.restype = ctypes.c_ssize_t

    def splice(src: int, dst: int, count: int, offset_src: Optional[int] = None,
               offset_dst: Optional[int] = None, flags: int = 0) -> int:
        offsets = [None if value is None else ctypes.pointer(ctypes.c_longlong(value))
                   for value in (offset_src, offset_dst)]
        while True:
            size = function(src, offsets[0], dst, offsets[1], count, flags)
            if size >= 0:
                return size
            if ctypes.get_errno() != errno.EINTR:  # retried, as os.splice does (PEP 475)
                raise_libc_error()

    splice.raw = function  # type: ignore
    return splice


def raise_libc_error() -> int:
    """After the C splice returned -1: raise what os.splice would (OSError(errno)
    is BlockingIOError for EAGAIN, and so on). EINTR is reported as EAGAIN: the
    relay's level-triggered watchers call again at once."""
    code = ctypes.get_errno()
    if code == errno.EINTR:
        code = errno.EAGAIN
    raise OSError(code, os.strerror(code))


def probe(splice: Splice) -> Optional[str]:
    """Splice a few bytes socket -> pipe -> socket over loopback TCP, as the relay does.

    Returns None when they arrive intact, else why not (the error, as text).
    """
    try:
        pair = _loopback_pair()
    except OSError as exc:
        return "no loopback socket pair for the probe: %s" % exc
    pipe = None
    try:
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        sender, receiver = pair
        sender.sendall(PROBE_BYTES)
        if not select.select([receiver], [], [], PROBE_WAIT)[0]:
            return "probe bytes did not arrive within %.0f s" % PROBE_WAIT
        size = splice(receiver.fileno(), pipe[1], len(PROBE_BYTES), flags=_FLAGS)
        if size != len(PROBE_BYTES):
            return "splice into a pipe moved %d of %d bytes" % (size, len(PROBE_BYTES))
        size = splice(pipe[0], receiver.fileno(), len(PROBE_BYTES), flags=_FLAGS)
        sender.settimeout(PROBE_WAIT)
        echoed = b""
        while len(echoed) < size:
            chunk = sender.recv(len(PROBE_BYTES))
            if not chunk:
                break
            echoed += chunk
        if echoed != PROBE_BYTES:
            return "splice out of a pipe delivered %r" % echoed
        return None
    except (OSError, ValueError) as exc:
        return "%s: %s" % (type(exc).__name__, exc)
    finally:
        for sock in pair:
            sock.close()
        if pipe is not None:
            PipePool.discard(pipe)


def _loopback_pair() -> Tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1 (the relay's kind, unlike socketpair's AF_UNIX,
    which old kernels cannot splice from although they splice TCP)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = socket.create_connection(listener.getsockname(), timeout=PROBE_WAIT)
        try:
            listener.settimeout(PROBE_WAIT)
            receiver = listener.accept()[0]
        except OSError:
            sender.close()
            raise
        return sender, receiver
    finally:
        listener.close()


def candidates() -> List[Tuple[str, Splice]]:
    """The ways to call splice(2) this Python has, best first."""
    found = []
    if hasattr(os, "splice"):
        found.append(("os.splice", os.splice))
    try:
        found.append(("splice(2) from libc through ctypes", libc_splice()))
    except (OSError, AttributeError) as exc:
        log.debug("Relay: no splice in libc through ctypes: %s", exc)
    return found


_UNDECIDED = object()
_chosen = _UNDECIDED  # type: object


def engine() -> Optional[Splice]:
    """The splice function the relay uses, or None: copy through user space.

    Decided by a probe at the first call and kept for the life of the process
    (the first TCP exchange: by then the log is set up, so the choice shows at
    debug level).
    """
    global _chosen
    if _chosen is _UNDECIDED:
        _chosen = choose()
    return _chosen  # type: ignore


def engine_if_known() -> Optional[Splice]:
    """engine() once probed, else None: an event-loop callback cannot probe."""
    return None if _chosen is _UNDECIDED else _chosen  # type: ignore


def choose() -> Optional[Splice]:
    """Probe each way to call splice(2); the first that works, or None."""
    refusals = []
    for name, splice in candidates():
        why_not = probe(splice)
        if why_not is None:
            log.debug("Relay: zero-copy engine, %s", name)
            return splice
        refusals.append("%s: %s" % (name, why_not))
    log.debug("Relay: copying through user space (splice refused: %s)",
              "; ".join(refusals) or "no splice on this Python or libc")
    return None


def exchange(left: socket.socket, right: socket.socket,
             count_forward: Callable[[int], None], count_backward: Callable[[int], None],
             splice: Splice, forward_bucket: Optional[TokenBucket] = None,
             backward_bucket: Optional[TokenBucket] = None) -> Tuple[int, int]:
    """Splice left->right and right->left until both end; bytes moved each way.

    ``splice`` is os.splice or libc_splice(): what engine() chose, or a test's pick.
    A bucket, if given, paces its direction (module docstring).

    Obeys the copy contract (relay.py's module docstring): EOF is passed on as
    a half-close, an error in either direction shuts down both sockets and ends
    the exchange, and both sockets are closed when it returns.
    """
    moved = []
    finished = Event()
    running = start_exchange(left, right, count_forward, count_backward, splice,
                             lambda *both: (moved.extend(both), finished.set()),
                             forward_bucket, backward_bucket)
    try:
        finished.wait()
    finally:
        running.end()  # killed while waiting: the watchers and sockets go all the same
    return moved[0], moved[1]


def start_exchange(left: socket.socket, right: socket.socket,
                   count_forward: Callable[[int], None], count_backward: Callable[[int], None],
                   splice: Splice, on_done: Callable[[int, int], None],
                   forward_bucket: Optional[TokenBucket] = None,
                   backward_bucket: Optional[TokenBucket] = None) -> "Running":
    """exchange() with no greenlet waiting (issue 22: a churned connection need
    not cost one): ``on_done(forward, backward)`` runs in a loop callback once
    it has ended and both sockets are closed."""
    running = Running((left, right), on_done)
    try:
        running.directions = [
            _Direction(left, right, count_forward, running, splice, forward_bucket),
            _Direction(right, left, count_backward, running, splice, backward_bucket)]
    finally:
        if len(running.directions) < 2:
            running.directions = []
            running.end()
    forward, backward = running.directions
    forward.partner, backward.partner = backward, forward
    forward.start()
    backward.start()
    return running


class Running:
    """An exchange under way. Its directions call set() once it ended: torn
    down just after (as an Event wakes its waiter), so that no callback of a
    direction meets its watchers closed."""

    def __init__(self, sockets: Tuple[socket.socket, socket.socket], on_done) -> None:
        self.sockets, self._on_done, self.directions = sockets, on_done, []
        self._ended = False

    def set(self) -> None:
        get_hub().loop.run_callback(self.end)

    def abort(self) -> None:
        """Cut both ways at once (a stop that cannot wait). Never raises."""
        for sock in self.sockets:
            net.abort(sock)
        self.end()

    def end(self) -> None:
        """Stop both directions, close both sockets, then on_done, once."""
        if self._ended:
            return
        self._ended = True
        for direction in self.directions:
            direction.stop()  # the watchers go before the descriptors they watch
        for sock in self.sockets:
            net.close_quietly(sock)
        moved = [direction.moved for direction in self.directions] or [0, 0]
        self._on_done(*moved)


class _Direction:
    """One way of an exchange: waits for bytes (or room) with a watcher, no greenlet.
    It copies small messages (_on_message) and splices bulk (_on_burst)."""

    def __init__(self, source: socket.socket, sink: socket.socket,
                 count: Callable[[int], None], finished: "Running", splice: Splice,
                 bucket: Optional[TokenBucket] = None) -> None:
        loop = self._loop = get_hub().loop
        self.source, self.sink = source, sink
        self._readable = loop.io(source.fileno(), _READ)
        self._writable = loop.io(sink.fileno(), _WRITE)
        self._count, self._finished = count, finished
        # File descriptors read once: the watchers above hold the same numbers,
        # and the sockets stay open until the exchange has stopped them.
        self._source_fd, self._sink_fd = source.fileno(), sink.fileno()
        self._splice = splice
        self._raw = getattr(splice, "raw", None)  # the C function, when through ctypes
        # Small messages are copied until a read fills what it asked for. Not with
        # rate=: there every read is capped to a grant, the grants decide the sizes,
        # and the direction splices as it always has.
        self._copying = bucket is None
        self._unsent = None    # type: Optional[bytes]  # copied bytes the sink had no room for
        self._pipe = None  # type: Optional[Pipe]
        self._pending = 0  # bytes in the pipe, not yet in the sink
        self._bucket = bucket
        self._granted = 0      # a grant the bucket handed over while this direction queued
        self._queued = False   # waiting in the bucket's queue
        self.partner = None  # type: Optional[_Direction]
        self.moved = 0
        self.at_eof = False

    def start(self) -> None:
        self._readable.start(self._on_message if self._copying else self._on_burst)

    def stop(self) -> None:
        """Stop watching and give back (or drop) the pipe. Never raises."""
        self._readable.stop()
        self._writable.stop()
        self._readable.close()
        self._writable.close()
        if self._queued:
            self._bucket.cancel(self._on_granted)
        if self._granted:
            self._bucket.give_back(self._granted)
            self._granted = 0
        self._drop_pipe()
        self._unsent = None

    def _on_message(self) -> None:
        """Small messages: one read, its write, back to the loop. A ping's whole
        cost here, so nothing else runs (no fill loop, no bucket, no pipe): the
        read that takes less than it asked for emptied the socket, and libev's
        level-triggered watcher calls again if more arrives."""
        try:
            size = _read_into(self._source_fd, _whole_buffer)
            if not size:
                self._pass_eof_on()
                return
            try:
                sent = _write(self._sink_fd, _copy_buffer[:size])
            except BlockingIOError:
                sent = 0
        except BlockingIOError:
            return
        except OSError:
            self._fail()
            return
        self.moved += sent
        self._count(sent)
        if sent < size:  # the buffer is the next read's: keep the rest apart
            self._unsent = _copy_buffer[sent:size].tobytes()
            self._wait_for_room()
        elif size == COPY_SIZE:  # a full read: bulk, splice from the next wake-up on
            self._copying = False
            self._readable.callback = self._on_burst

    def _on_burst(self) -> None:
        """Bulk (or rate=): splice through a pipe, up to FILLS_PER_WAKEUP fills."""
        try:
            for _ in range(FILLS_PER_WAKEUP):
                want = PIPE_SIZE
                if self._bucket is not None:
                    want, self._granted = self._granted or self._bucket.take(PIPE_SIZE), 0
                    if not want:
                        self._queue()
                        return
                try:
                    size = self._fill_pipe(want)
                except BlockingIOError:
                    if self._bucket is not None:
                        self._bucket.give_back(want)
                    self._drop_pipe()  # empty: back to the pool until bytes arrive
                    return
                if self._bucket is not None:
                    self._bucket.give_back(want - size)
                if size == 0:
                    self._pass_eof_on()
                    return
                if not self._drain():
                    self._wait_for_room()
                    return
                if size < want and size < SHORT_FILL:
                    # Little, and the socket had no more: small messages again (not
                    # under rate=, whose grants decide the sizes); no third call for EAGAIN.
                    if self._bucket is None:
                        self._copying = True
                        self._readable.callback = self._on_message
                    self._drop_pipe()
                    return
            # Enough for one wake-up; the pipe is empty (drained above) and goes back.
            self._drop_pipe()
        except OSError:
            self._fail()

    def _fill_pipe(self, want: int) -> int:
        """Splice up to ``want`` bytes from the source into this direction's pipe."""
        if self._pipe is None:
            self._pipe = pipes.acquire()
        self._pending = self._splice_call(self._source_fd, self._pipe[1], want)
        return self._pending

    def _splice_call(self, source_fd: int, sink_fd: int, count: int) -> int:
        if self._raw is None:
            return self._splice(source_fd, sink_fd, count, None, None, _FLAGS)
        size = self._raw(source_fd, None, sink_fd, None, count, _FLAGS)
        return raise_libc_error() if size < 0 else size

    def _wait_for_room(self) -> None:
        """The sink is full: stop reading until what waits for it is written."""
        self._readable.stop()
        self._writable.start(self._on_writable)

    def _send_unsent(self) -> bool:
        """Write what the sink had no room for; False while some of it still waits."""
        try:
            sent = _write(self._sink_fd, self._unsent)
        except BlockingIOError:
            return False
        self.moved += sent
        self._count(sent)
        self._unsent = self._unsent[sent:] or None
        return self._unsent is None

    def _queue(self) -> None:
        """No grant: stop reading and wait for this direction's turn at the bucket."""
        self._readable.stop()
        self._drop_pipe()
        self._queued = True
        self._bucket.wait(PIPE_SIZE, self._on_granted)

    def _on_granted(self, grant: int) -> None:
        self._queued = False
        self._granted = grant
        self._readable.start(self._on_burst)  # level-triggered: the bytes still wait

    def _on_writable(self) -> None:
        try:
            if self._send_unsent() if self._unsent is not None else self._drain():
                self._writable.stop()
                self._drop_pipe()  # empty now, and the source may have no more for a while
                self.start()
        except OSError:
            self._fail()

    def _drain(self) -> bool:
        """Move the pipe's bytes into the sink; False if the sink has no room."""
        while self._pending:
            try:
                sent = self._splice_call(self._pipe[0], self._sink_fd, self._pending)
            except BlockingIOError:
                return False
            self._pending -= sent
            self.moved += sent
            self._count(sent)
        return True

    def _drop_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            (pipes.discard if self._pending else pipes.release)(pipe)
            self._pending = 0

    def _pass_eof_on(self) -> None:
        """EOF from the source: pass it on as a half-close of the sink."""
        self._readable.stop()
        self._drop_pipe()
        try:
            self.sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.at_eof = True
        if self.partner.at_eof:
            self._finished.set()

    def _fail(self) -> None:
        """Reset or broken pipe: end both directions at once."""
        for sock in (self.source, self.sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._finished.set()
