"""The pipes splice(2) moves bytes through (zerocopy.py), pooled.

A pipe is borrowed only while bytes move and returned empty, so an idle
connection holds no descriptor beyond its two sockets.
"""

import fcntl
import os
from typing import List, Tuple

PIPE_SIZE = 256 * 1024   # bytes a pipe holds: fewer system calls per megabyte
IDLE_PIPES_KEPT = 32     # pipes kept open for the next burst; more are closed

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
