"""Zero-copy exchange between two plain TCP sockets: splice(2) through a pipe.

The bytes go socket -> pipe -> socket inside the kernel and never reach
Python. Pipes are borrowed from a small shared pool only while bytes move and
returned empty, so an idle connection holds no descriptor beyond its two
sockets (Go's io.Copy keeps two pipes, four descriptors, per connection).

Both directions are driven by event-loop callbacks rather than one greenlet
each: a waiting greenlet costs about 8 KB, a watcher a few hundred bytes, and
an idle tunnel may hold thousands of connections. Only the caller's greenlet
waits, for the end of the whole exchange.

Linux with Python 3.10+ only; elsewhere relay.py copies through user space.
"""

import fcntl
import os
import socket
from typing import Callable, List, Optional, Tuple

from gevent import get_hub
from gevent.event import Event

AVAILABLE = hasattr(os, "splice")
PIPE_SIZE = 256 * 1024   # bytes a pipe holds: fewer system calls per megabyte
IDLE_PIPES_KEPT = 32     # pipes kept open for the next burst; more are closed
FILLS_PER_WAKEUP = 16    # then yield to the loop, so one busy stream cannot starve others
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_READ, _WRITE = 1, 2     # libev event masks

Pipe = Tuple[int, int]


class PipePool:
    """Pipes for splice(); every pipe in the pool is empty."""

    def __init__(self, keep: int = IDLE_PIPES_KEPT) -> None:
        self._idle = []  # type: List[Pipe]
        self._keep = keep

    def acquire(self) -> Pipe:
        if self._idle:
            return self._idle.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        except OSError:
            pass  # over the per-user pipe budget: the default size still works
        return read_end, write_end

    def release(self, pipe: Pipe) -> None:
        """Take back an empty pipe."""
        if len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes."""
        for end in pipe:
            try:
                os.close(end)
            except OSError:
                pass


pipes = PipePool()


def exchange(left: socket.socket, right: socket.socket,
             count_forward: Callable[[int], None], count_backward: Callable[[int], None]
             ) -> Tuple[int, int]:
    """Splice left->right and right->left until both end; bytes moved each way.

    EOF is passed on as a half-close; an error in either direction shuts down
    both sockets and ends the exchange. The caller closes the sockets.
    """
    finished = Event()
    directions = [_Direction(left, right, count_forward, finished),
                  _Direction(right, left, count_backward, finished)]
    for direction in directions:
        direction.partner = directions[1 - directions.index(direction)]
    try:
        for direction in directions:
            direction.start()
        finished.wait()
        return directions[0].moved, directions[1].moved
    finally:
        for direction in directions:
            direction.stop()


class _Direction:
    """One way of an exchange: waits for bytes (or room) with a watcher, no greenlet."""

    def __init__(self, source: socket.socket, sink: socket.socket,
                 count: Callable[[int], None], finished: Event) -> None:
        loop = get_hub().loop
        self.source, self.sink = source, sink
        self._readable = loop.io(source.fileno(), _READ)
        self._writable = loop.io(sink.fileno(), _WRITE)
        self._count, self._finished = count, finished
        self._pipe = None  # type: Optional[Pipe]
        self._pending = 0  # bytes in the pipe, not yet in the sink
        self.partner = None  # type: Optional[_Direction]
        self.moved = 0
        self.ended = False

    def start(self) -> None:
        self._readable.start(self._on_readable)

    def stop(self) -> None:
        """Stop watching and give back (or drop) the pipe. Never raises."""
        self._readable.stop()
        self._writable.stop()
        self._readable.close()
        self._writable.close()
        self._drop_pipe()

    def _on_readable(self) -> None:
        try:
            for _ in range(FILLS_PER_WAKEUP):
                if self._pipe is None:
                    self._pipe = pipes.acquire()
                try:
                    size = os.splice(self.source.fileno(), self._pipe[1], PIPE_SIZE, flags=_FLAGS)
                except BlockingIOError:
                    self._drop_pipe()  # empty: back to the pool until bytes arrive
                    return
                if size == 0:
                    self._end()
                    return
                self._pending = size
                if not self._drain():
                    self._readable.stop()  # the sink is full: wait for room first
                    self._writable.start(self._on_writable)
                    return
        except OSError:
            self._fail()

    def _on_writable(self) -> None:
        try:
            if self._drain():
                self._writable.stop()
                self._readable.start(self._on_readable)
        except OSError:
            self._fail()

    def _drain(self) -> bool:
        """Move the pipe's bytes into the sink; False if the sink has no room."""
        while self._pending:
            try:
                sent = os.splice(self._pipe[0], self.sink.fileno(), self._pending, flags=_FLAGS)
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

    def _end(self) -> None:
        """EOF from the source: pass it on as a half-close."""
        self._readable.stop()
        self._drop_pipe()
        try:
            self.sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.ended = True
        if self.partner.ended:
            self._finished.set()

    def _fail(self) -> None:
        """Reset or broken pipe: end both directions at once."""
        for sock in (self.source, self.sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._finished.set()
