"""UDP flows (an extension): one data connection per user address, not per datagram.

v1.0 carries each UDP datagram on a data connection of its own, with one
reply, so every datagram costs a TCP connection and a launch signal. With
flows, the first datagram from a user address opens a data connection (launch
kind 3) that then carries every datagram of that address both ways, framed:

    +----------------+------------------+
    | length (2, BE) | datagram bytes   |   repeated, in each direction
    +----------------+------------------+

A flow ends when nothing has passed for FLOW_IDLE_READ_TIMEOUTS x
UDP_READ_TIMEOUT (60 s by default; the server closes the data connection, the
client follows). Any number of replies per datagram pass, and none of them
has to come within UDP_READ_TIMEOUT. The header, the timeout and the launch
kind are protocol.py's.

Switched on by the server (``udp=flow`` in its URL), advertised in the tunnel
signal's query string, and used only after the client acknowledges it on the
tunnel (protocol.ACK_UDP_FLOW). A v1.0 client never acknowledges, so it keeps
getting v1.0 datagrams.
"""

import socket
import time
from typing import Callable, Dict, Optional

import gevent
from gevent.queue import Full, Queue

from nodepass_gevent import net, readers
from nodepass_gevent.log import log
from nodepass_gevent.protocol import FLOW_FRAME_HEADER, FLOW_IDLE_READ_TIMEOUTS
from nodepass_gevent.stats import Stats

FLOW_QUEUE_SIZE = 256     # datagrams waiting for the data connection; more are dropped


def frame(datagram: bytes) -> bytes:
    return FLOW_FRAME_HEADER.pack(len(datagram)) + datagram


class ServerFlow:
    """The datagrams of one user address on the server, over one data connection."""

    def __init__(self, listener: socket.socket, peer: tuple, stats: Stats,
                 size_limit: int, read_timeout: float,
                 pass_reply: Callable[[int], bool] = lambda size: True) -> None:
        self.listener, self.peer, self.stats = listener, peer, stats
        self.pass_reply = pass_reply  # False: over the server's rate=, drop the reply
        self.size_limit = size_limit
        self.idle_timeout = read_timeout * FLOW_IDLE_READ_TIMEOUTS
        self.queue = Queue(FLOW_QUEUE_SIZE)
        self.last_active = time.monotonic()
        self._data = None  # type: Optional[socket.socket]

    def offer(self, datagram: bytes) -> None:
        """Queue a user datagram; drop it if the flow is this far behind (UDP may)."""
        try:
            self.queue.put_nowait(datagram)
            self.last_active = time.monotonic()
        except Full:
            log.debug("UDP flow %s: queue full, datagram dropped", self.peer)

    def run(self, take_data: Callable[[], Optional[socket.socket]]) -> None:
        """Open the flow and carry it until idle or broken.

        Obeys the copy contract (relay.py's module docstring): owns and closes
        the data connection; the user side is the shared UDP listener, borrowed.
        """
        data = self._data = take_data()
        if data is None:
            return
        writer = gevent.spawn(self._write_frames, data)
        try:
            self._read_replies(data)
        except (OSError, ValueError) as exc:
            log.debug("UDP flow %s ended: %s", self.peer, exc)
        finally:
            writer.kill(block=True)
            net.close_quietly(data)

    def end(self) -> None:
        """Wake the flow's greenlets so that it ends (on shutdown). Never raises."""
        if self._data is not None:
            net.abort(self._data)

    def _write_frames(self, data: socket.socket) -> None:
        try:
            while True:
                datagram = self.queue.get()
                data.sendall(frame(datagram))
                self.stats.udp_exchanged(len(datagram), 0)
        except OSError:
            net.abort(data)  # wakes the reader; run() owns the socket and closes it

    def _read_replies(self, data: socket.socket) -> None:
        reader = data.makefile("rb")
        try:
            while True:
                data.settimeout(max(0.1, self.last_active + self.idle_timeout - time.monotonic()))
                try:
                    reply = readers.read_frame(reader, self.size_limit)
                except socket.timeout:
                    if time.monotonic() - self.last_active >= self.idle_timeout:
                        return  # idle both ways: close the flow
                    continue
                if reply is None:
                    return
                self.last_active = time.monotonic()
                if not self.pass_reply(len(reply)):
                    continue
                self.listener.sendto(reply, self.peer)
                self.stats.count_bytes(len(reply), inbound=False)
        finally:
            reader.close()


class ServerFlows:
    """The open flows of a server, by user address."""

    def __init__(self) -> None:
        self._flows = {}  # type: Dict[tuple, ServerFlow]

    def get(self, peer: tuple) -> Optional[ServerFlow]:
        return self._flows.get(peer)

    def add(self, flow: ServerFlow) -> None:
        self._flows[flow.peer] = flow

    def end_all(self) -> None:
        for flow in list(self._flows.values()):
            flow.end()

    def run(self, flow: ServerFlow, take_data: Callable[[], Optional[socket.socket]]) -> None:
        """Run an added ``flow`` in the caller's greenlet; forget it when it ends."""
        try:
            flow.run(take_data)
        finally:
            if self._flows.get(flow.peer) is flow:
                del self._flows[flow.peer]


def client_flow(data: socket.socket, target: socket.socket, stats: Stats,
                size_limit: int, read_timeout: float) -> None:
    """Carry one flow on the client: frames from data -> target, replies back.

    Obeys the copy contract (relay.py's module docstring): owns and closes both
    sockets. Ends when the server closes the data connection, when either
    direction fails (a failed write aborts the data connection, which wakes
    the other), or when someone aborts it, as the client does when it stops.
    """
    replies = gevent.spawn(_send_replies, target, data, stats, size_limit)
    reader = data.makefile("rb")
    try:
        # The server closes an idle flow; this is only a backstop.
        data.settimeout(read_timeout * FLOW_IDLE_READ_TIMEOUTS * 2)
        while True:
            datagram = readers.read_frame(reader, size_limit)
            if datagram is None:
                return
            target.send(datagram)
            stats.udp_exchanged(len(datagram), 0)
    except (OSError, ValueError) as exc:
        log.debug("UDP flow to target ended: %s", exc)
    finally:
        reader.close()
        replies.kill(block=True)
        net.close_quietly(target)
        net.close_quietly(data)


def _send_replies(target: socket.socket, data: socket.socket, stats: Stats,
                  size_limit: int) -> None:
    while True:
        try:
            reply = target.recv(size_limit)
        except ConnectionRefusedError:
            continue  # ICMP port unreachable from the target: UDP goes on
        except OSError:
            net.abort(data)  # the target is gone (or the flow is closing): end both ways
            return
        try:
            data.sendall(frame(reply))
        except OSError:
            net.abort(data)  # wakes the reader; client_flow owns the socket and closes it
            return
        stats.count_bytes(len(reply), inbound=False)
