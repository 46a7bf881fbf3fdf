"""The server's UDP sessions on the NodePass v1.14 wire: one pool connection per user address.

    user --datagram--> target port (udp.UdpUsers) --first of a new address--> RawFlow
    RawFlow: a pool connection (server_v114.hand_out sends udp {remote, id}), then
             each datagram written raw, each read of the connection one reply

v1.14 frames nothing: a datagram is one write, a reply one read of up to
READ_SIZE bytes [common.go:commonUDPOnce]. A session ends when nothing passed
either way for IDLE s (v1.14's NP_UDP_READ_TIMEOUT), or its connection closes.
"""

import socket
import time
from typing import Callable, Optional

import gevent

from nodepass_gevent.base import net
from nodepass_gevent.log import log
from nodepass_gevent.tunnel.udp import ServerFlow

READ_SIZE = 16384  # NP_UDP_DATA_BUF_SIZE: a longer reply is cut, as v1.14 cuts it
IDLE = 30.0        # NP_UDP_READ_TIMEOUT


class RawFlow(ServerFlow):
    """ServerFlow's queue, offer() and idle watchdog, without its length frames
    (and so without udplink's FrameLink, which frames); same constructor."""

    def __init__(self, listener: socket.socket, peer: tuple, stats, size_limit: int,
                 read_timeout: float, pass_reply: Optional[Callable[[int], bool]] = None) -> None:
        super().__init__(listener, peer, stats, READ_SIZE, read_timeout, pass_reply)
        # v1.14 ends a session after IDLE of silence, one datagram or many, whatever
        # the v1.0 wire's UDP settings say.
        self.lone_idle_timeout = self.flow_idle_timeout = IDLE

    def run(self, take_data: Callable[[], Optional[socket.socket]]) -> None:
        """Carry the session until idle or closed; owns and closes the pool connection."""
        data = self._data = take_data()
        if data is None:
            return
        writer = gevent.spawn(self._write_frames, data)
        try:
            self._read_replies(data)
        except OSError as exc:
            log.debug("v1.14 UDP session %s ended: %s", net.format_address(self.peer), exc)
        finally:
            writer.kill(block=True)
            net.close_quietly(data)

    def _write_frames(self, data: socket.socket) -> None:
        try:
            while True:
                datagram = self.queue.get()
                self.queued_bytes -= len(datagram)
                data.sendall(datagram)  # raw: the far end's one read is this datagram
                self.stats.udp_datagram(len(datagram))
        except OSError:
            net.abort(data)  # wakes the reader; run() owns the socket and closes it

    def _read_replies(self, data: socket.socket) -> None:
        watchdog = gevent.spawn(self._end_when_idle, data)
        try:
            while True:
                reply = data.recv(READ_SIZE)
                if not reply:
                    return
                self.last_active = time.monotonic()
                self._pass_back(reply)
        finally:
            watchdog.kill(block=False)

    def _pass_back(self, reply: bytes) -> None:
        if self.pass_reply is not None and not self.pass_reply(len(reply)):
            return  # over the server's rate=: dropped, as UDP may be
        self.listener.sendto(reply, self.peer)
        self.stats.udp_reply(len(reply))
