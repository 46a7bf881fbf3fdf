"""The server's session: one connected client's tunnel connection (control.py).

It writes the signals: send() from a greenlet, under a lock so that lines
never interleave; send_now() from an event-loop callback, where the server
serves a user without a greenlet (tunnel/tcp.CallbackUsers, issue 22).
"""

import os
import socket
import ssl
import time
from typing import Optional

import gevent
from gevent.lock import Semaphore

from nodepass_gevent.base import net
from nodepass_gevent.wire.v1 import protocol

ALWAYS_ALLOWED = frozenset((protocol.KIND_TCP, protocol.KIND_UDP))
WITH_UDP_FLOWS = ALWAYS_ALLOWED | {protocol.KIND_UDP_FLOW}


class ServerSession:
    """One connected client: its tunnel connection and a lock for writing signals."""

    def __init__(self, control: socket.socket, peer: tuple, log) -> None:
        self.control = control
        self.peer_host = peer[0]
        self.peer = net.format_address(peer)
        self.log = log
        self.in_use = False   # set once the client opens a data connection
        self.started = time.monotonic()
        self.connected_at = time.time()  # for the log of a refused second client
        self.launch_kinds = ALWAYS_ALLOWED  # which launch signals the client takes
        self.last_heartbeat = None  # type: Optional[float]
        self.closed = False
        self._write_lock = Semaphore()
        # send_now() writes here without blocking: a plain socket under gevent is
        # non-blocking underneath. None (TLS, a blocking socket): it cannot.
        fd = control.fileno()
        self._fd = None if isinstance(control, ssl.SSLSocket) or os.get_blocking(fd) else fd

    @property
    def udp_flow(self) -> bool:
        return protocol.KIND_UDP_FLOW in self.launch_kinds

    def send(self, signal: bytes) -> bool:
        """Write one signal line; on failure close the session and return False."""
        if self.closed:
            return False
        with self._write_lock:  # signal lines must never interleave
            return self._write(signal)

    def can_send_now(self) -> bool:
        """Whether send_now() can write at once: a plain socket, no send() under way."""
        return self._fd is not None and not self._write_lock.locked()

    def send_now(self, signal: bytes) -> bool:
        """send() from an event-loop callback, which must not block (once
        can_send_now()): True once the line is the next out; what the send
        buffer did not take (or an error) goes on from a greenlet, as send()."""
        if self.closed or not self._write_lock.acquire(blocking=False):
            return False
        try:
            sent = os.write(self._fd, signal)
        except OSError:  # EAGAIN, or an error the greenlet's send() meets again
            sent = 0
        if sent == len(signal):
            self._write_lock.release()
        else:
            gevent.spawn(self._write_then_release, signal[sent:])
        return True

    def _write_then_release(self, rest: bytes) -> None:
        try:
            self._write(rest)
        finally:
            self._write_lock.release()

    def _write(self, data: bytes) -> bool:
        """Under the lock: write; on failure close the session, False."""
        try:
            net.send_message(self.control, data)
            return True
        except OSError as exc:
            self.log.warning("Tunnel: write to client %s failed: %s", self.peer, exc)
        self.close()
        return False

    def heartbeat(self) -> None:
        if self.send(protocol.HEARTBEAT):
            self.last_heartbeat = time.monotonic()

    def alive(self) -> bool:
        return not self.closed and net.is_idle(self.control)

    def close(self) -> None:
        """Close the tunnel connection (wakes its reader). Never raises."""
        self.closed = True
        net.abort(self.control)
        net.close_quietly(self.control)
