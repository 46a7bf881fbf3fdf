"""Zero-copy copying between plain TCP sockets: splice(2) through a pipe.

The bytes go socket -> pipe -> socket inside the kernel and never reach
Python. Pipes are borrowed from a small shared pool only while bytes move and
returned empty, so an idle connection holds no descriptor beyond its two
sockets (Go's io.Copy keeps two pipes, four descriptors, per connection).
Linux with Python 3.10+ only; elsewhere relay.py copies through user space.
"""

import fcntl
import os
import socket
from typing import Callable, List, Tuple

from gevent import get_hub

AVAILABLE = hasattr(os, "splice")
PIPE_SIZE = 256 * 1024   # bytes a pipe holds: fewer system calls per megabyte
IDLE_PIPES_KEPT = 32     # pipes kept open for the next burst; more are closed
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


def pump(source: socket.socket, sink: socket.socket, on_bytes: Callable[[int], None]) -> int:
    """Move bytes from ``source`` to ``sink`` until EOF; the count moved.

    Errors (reset, broken pipe) propagate as OSError, as from recv/send.
    """
    hub = get_hub()
    readable = hub.loop.io(source.fileno(), _READ)
    writable = hub.loop.io(sink.fileno(), _WRITE)
    moved = 0
    try:
        while True:
            hub.wait(readable)
            pipe, emptied = pipes.acquire(), False
            try:
                burst, at_eof = _move_burst(source.fileno(), sink.fileno(), pipe, hub, writable,
                                            on_bytes)
                emptied = True
            finally:
                (pipes.release if emptied else pipes.discard)(pipe)
            moved += burst
            if at_eof:
                return moved
    finally:
        readable.close()
        writable.close()


def _move_burst(source: int, sink: int, pipe: Pipe, hub, writable, on_bytes
                ) -> Tuple[int, bool]:
    """Splice what is waiting on ``source`` to ``sink``: (bytes moved, EOF seen)."""
    read_end, write_end = pipe
    moved = 0
    while True:
        try:
            size = os.splice(source, write_end, PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            return moved, False  # nothing more waiting: the pipe is empty again
        if size == 0:
            return moved, True
        while size:
            try:
                sent = os.splice(read_end, sink, size, flags=_FLAGS)
            except BlockingIOError:
                hub.wait(writable)  # the sink's buffer is full: wait for room
                continue
            size -= sent
            moved += sent
            on_bytes(sent)
