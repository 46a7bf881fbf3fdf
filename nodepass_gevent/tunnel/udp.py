"""UDP users, both halves: v1.0's one data connection per datagram, and flows.

v1.0 (launch kind 2): the server sends each user datagram on a data
connection of its own and relays the one reply that comes back within
UDP_READ_TIMEOUT; the client sends it to the target and writes the reply.

    user --datagram--> server ==data connection: datagram / reply==> client --> target

Flows (an extension, launch kind 3): one data connection per user address,
not per datagram. The first datagram from a user address opens a data
connection that then carries every datagram of that address both ways,
framed:

    +----------------+------------------+
    | length (2, BE) | datagram bytes   |   repeated, in each direction
    +----------------+------------------+

A flow ends when nothing has passed for FLOW_IDLE_READ_TIMEOUTS x
UDP_READ_TIMEOUT (60 s by default; the server closes the data connection, the
client follows), or for one UDP_READ_TIMEOUT while its user has sent only one
datagram: a lone request (a DNS query, a probe, a user gone) gives its
descriptors back as soon as its v1.0 exchange would have. Any number of
replies per datagram pass, and none of them has to come within
UDP_READ_TIMEOUT. The header, the timeout and the launch
kind are protocol.py's. Offered by the server unless its URL pins ``udp=v1``,
advertised in the tunnel signal's query string, and used only after the
client acknowledges it on the tunnel (control.py), as ours does. A v1.0
client never acknowledges, so it keeps getting v1.0 datagrams.

Server side, datagrams are handled in the UDP listener's receive callback
(listeners.py), so that one slow user never holds up another's datagrams: a
datagram of an open flow is queued to it; one that needs a new data
connection starts a handler in the semaphore, or, while the semaphore is
full, waits in a short admission queue (then dropped, as UDP may).

Both count the same way (relay.py's copy contract, point 5): a user
datagram is one ``udp exchange`` and its bytes ``bytes in``; replies are
``bytes out``.

Sizes. Every UDP socket is read with room for the largest datagram
(RECEIVE_SIZE, 65535: more than the 65,507 bytes an IPv4 datagram can carry
or the 65,527 of IPv6), so no read ever cuts one. A flow's 2-byte frame
length says any of those sizes: flows carry every datagram whole, whatever
UDP_DATA_BUF_SIZE says. The v1.0 wire sends no length, and a v1.0 peer
reads a datagram (or a reply) with one read of its own UDP_DATA_BUF_SIZE
(8192 by default) and passes on what that read returned, cut. So on that
wire UDP_DATA_BUF_SIZE keeps its v1.0 meaning, the largest datagram or
reply, and one above it is dropped whole, on either side and in either
direction: counted (``udp_too_large_datagrams``, ``udp_too_large_replies``)
and said in a warning with the remedy, at most once per
TOO_LARGE_LOG_INTERVAL (udpdrops.py).
"""

import socket
import time
from collections import deque
from functools import partial
from typing import Callable, Dict, Optional

import gevent
from gevent.event import Event
from gevent.queue import Full, Queue

from nodepass_gevent.base import net
from nodepass_gevent.base.semaphore import UserSemaphore
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import readers, udplink
from nodepass_gevent.copy.udplink import FLOW_FRAME_HEADER
from nodepass_gevent.log import log
from nodepass_gevent.tunnel.udpdrops import TooLargeDrops
from nodepass_gevent.wire.v1 import protocol
from nodepass_gevent.wire.v1.protocol import FLOW_IDLE_READ_TIMEOUTS

FLOW_QUEUE_SIZE = 256     # datagrams waiting for the data connection; more are dropped
# ... and their bytes: 256 datagrams of 8192 bytes, as much as before flows
# carried datagrams above UDP_DATA_BUF_SIZE (256 of 65535 would be 16 MiB a flow).
FLOW_QUEUE_BYTES = 2 << 20
ADMISSION_QUEUE_SIZE = 1024  # datagrams waiting for a place in the semaphore
# Every read of a UDP socket (or of a v1.0 datagram off a data connection):
# room for any datagram, so that one too large is seen whole, never cut.
# (recvfrom(65535) costs what recvfrom(8192) does: the bytes are shrunk to fit.)
RECEIVE_SIZE = udplink.LARGEST_DATAGRAM


class UdpUsers:
    """The server's UDP front end: the handler of the UDP listener.

    ``hand_out(kind, peer)`` gives an announced data connection or None;
    ``session_flows()``: the flow class of the connected client's session (ServerFlow,
    or udp_v114.RawFlow), None if it takes none (a v1.0 exchange per datagram).
    """

    def __init__(self, listener: socket.socket, users: UserSemaphore, hand_out,
                 session_flows: Callable[[], Optional[type]], stats: Stats, settings, owner,
                 edge=None) -> None:
        self.listener = listener  # the gevent socket: flows' replies are sent on it
        self.users, self.hand_out, self.stats, self.owner = users, hand_out, stats, owner
        # allow=/deny= and rate= (edge.Edge); None: every datagram and reply passes.
        self.edge = edge
        self.session_flows = session_flows
        # The largest datagram or reply on the v1.0 wire; flows carry any size.
        self.size, self.read_timeout = settings.udp_data_buf_size, settings.udp_read_timeout
        self.too_large = TooLargeDrops("server", self.size, stats, owner.log)
        self.flows = ServerFlows(stats)
        # What a reply must pass before it goes back to the user (rate=); None: nothing.
        self._reply_gate = None if edge is None else edge.pass_reply
        self._waiting = deque()  # (function, args) waiting for a place in the semaphore
        self._place_wanted = Event()

    def start(self) -> None:
        self.owner.spawn(self._admit_forever)

    def handle(self, datagram: bytes, peer: tuple) -> None:
        """One user datagram, in the receive callback: never blocks."""
        if self.edge is not None and not self.edge.admit_datagram(peer, len(datagram)):
            return  # refused by allow=/deny= or over rate=: dropped (counted, logged)
        flow = self.flows.get(peer)
        if flow is not None:
            flow.offer(datagram)
            return
        flow_class = self.session_flows()
        if flow_class is not None:
            flow = flow_class(self.listener, peer, self.stats, udplink.LARGEST_DATAGRAM,
                              self.read_timeout, self._reply_gate)
            flow.offer(datagram)
            self.flows.add(flow)  # now, so the next datagram finds it
            self._admit(self.flows.run, flow, partial(self.hand_out, protocol.KIND_UDP_FLOW,
                                                       peer))
        elif len(datagram) > self.size:  # a v1.0 client would cut it: dropped whole
            self.too_large.datagram(len(datagram), net.format_address(peer))
        else:
            self._admit(self._exchange_v1, datagram, peer)

    def close(self) -> None:
        """End every flow (UDP has nothing in flight worth a grace period)."""
        self._waiting.clear()
        self.flows.close()

    def _admit(self, function, *args) -> None:
        if self._waiting:
            self.users.count_wait()  # in line behind datagrams already waiting
        elif not self.users.full():  # full: the semaphore counted the wait
            self.users.spawn(function, *args)
            return
        if len(self._waiting) >= ADMISSION_QUEUE_SIZE:
            log.debug("Target: admission queue full; UDP datagram dropped")
            return
        self._waiting.append((function, args))
        self._place_wanted.set()

    def _admit_forever(self) -> None:
        while True:
            self._place_wanted.wait()
            self._place_wanted.clear()
            while self._waiting:
                function, args = self._waiting.popleft()
                self.users.spawn(function, *args)  # waits for a free place

    def _exchange_v1(self, datagram: bytes, peer: tuple) -> None:
        data = self.hand_out(protocol.KIND_UDP, peer)
        if data is None:
            return
        try:
            net.send_message(data, datagram)
            self.stats.udp_datagram(len(datagram))
            reply = readers.read_until_eof(data, RECEIVE_SIZE, self.read_timeout)
            if len(reply) > self.size:  # the client's UDP_DATA_BUF_SIZE is larger
                self.too_large.reply(len(reply), net.format_address(peer))
                return
            gate = self._reply_gate
            if reply and (gate is None or gate(len(reply))):
                self.listener.sendto(reply, peer)
                self.stats.udp_reply(len(reply))
        except OSError as exc:
            log.debug("Target: UDP exchange for %s failed: %s", peer, exc)
        finally:
            net.close_quietly(data)


def launch_v1(data: socket.socket, target: net.Target, stats: Stats, settings, log,
              connection_id: str, too_large: "TooLargeDrops") -> None:
    """The client's half of a v1.0 datagram: one datagram to the target, one reply back.
    Either above UDP_DATA_BUF_SIZE is dropped whole and told to ``too_large``."""
    sock = None
    size, timeout = settings.udp_data_buf_size, settings.udp_read_timeout
    try:
        datagram = readers.read_burst(data, RECEIVE_SIZE, timeout)
        if len(datagram) > size:  # the server's UDP_DATA_BUF_SIZE is larger
            too_large.datagram(len(datagram), str(target.address))
            return
        sock = target.connect(socket.SOCK_DGRAM, timeout)
        sock.send(datagram)
        stats.udp_datagram(len(datagram))
        reply = sock.recv(RECEIVE_SIZE)
        if len(reply) > size:  # a v1.0 server would cut it
            too_large.reply(len(reply), str(target.address))
            return
        net.send_message(data, reply)
        stats.udp_reply(len(reply))
    except socket.timeout:
        log.debug("Client: no UDP reply from %s within %.1fs", target.address, timeout)
    except (OSError, ValueError) as exc:
        log.debug("Client: UDP exchange on %s failed: %s", connection_id, net.describe(exc))
    finally:
        net.close_quietly(data)  # first: the server passes the reply on at this EOF
        net.close_quietly(sock)


def launch_flow(data: socket.socket, target: net.Target, stats: Stats, settings, log,
                flows: set) -> None:
    """The client's half of a flow: a UDP socket to the target for its life.
    ``flows`` holds the data connections of open flows (aborted on stop)."""
    try:
        sock = target.connect(socket.SOCK_DGRAM, None)
    except OSError as exc:
        log.warning("Client: cannot reach UDP target %s: %s", target.address,
                    net.describe(exc))
        net.close_quietly(data)
        return
    flows.add(data)
    stats.udp_flows_active += 1
    try:
        client_flow(data, sock, stats, udplink.LARGEST_DATAGRAM, settings.udp_read_timeout)
    finally:
        stats.udp_flows_active -= 1
        flows.discard(data)


_pack_length = FLOW_FRAME_HEADER.pack


def frame(datagram: bytes) -> bytes:
    return _pack_length(len(datagram)) + datagram


class ServerFlow:
    """The datagrams of one user address on the server, over one data connection.
    ``size_limit``: the largest reply frame taken (udplink.LARGEST_DATAGRAM: any)."""

    def __init__(self, listener: socket.socket, peer: tuple, stats: Stats,
                 size_limit: int, read_timeout: float,
                 pass_reply: Optional[Callable[[int], bool]] = None) -> None:
        self.listener, self.peer, self.stats = listener, peer, stats
        # False: over the server's rate=, drop the reply; None: every reply passes.
        self.pass_reply = pass_reply
        self.size_limit = size_limit
        self.lone_idle_timeout = read_timeout  # until the user's second datagram
        self.flow_idle_timeout = read_timeout * FLOW_IDLE_READ_TIMEOUTS
        self.offered = 0  # datagrams from the user (dropped ones too: it came back)
        self.queue = Queue(FLOW_QUEUE_SIZE)  # until the data connection is there, or TLS
        self.queued_bytes = 0  # in the queue, up to FLOW_QUEUE_BYTES
        self.last_active = time.monotonic()
        self._data = None  # type: Optional[socket.socket]
        self._link = None  # type: Optional[udplink.FrameLink]

    def offer(self, datagram: bytes) -> None:
        """Pass a user datagram on (from the receive callback: never blocks);
        drop it if the flow is this far behind (UDP may)."""
        self.offered += 1
        link = self._link
        if link is not None:  # a link (plain or TLS): written from this callback
            # frame(datagram), without the call: this runs for every datagram
            if link.send_frame(_pack_length(len(datagram)) + datagram):
                self.stats.udp_datagram(len(datagram))
            else:
                log.debug("UDP flow %s: backed up, datagram dropped", self.peer)
            return
        if self.queued_bytes + len(datagram) > FLOW_QUEUE_BYTES:
            log.debug("UDP flow %s: queue full (bytes), datagram dropped", self.peer)
            return
        try:
            self.queue.put_nowait(datagram)
        except Full:
            log.debug("UDP flow %s: queue full, datagram dropped", self.peer)
            return
        self.queued_bytes += len(datagram)
        self.last_active = time.monotonic()

    def idle_timeout(self) -> float:
        """How long the flow may be silent both ways before it ends (protocol.py)."""
        return self.flow_idle_timeout if self.offered > 1 else self.lone_idle_timeout

    def run(self, take_data: Callable[[], Optional[socket.socket]]) -> None:
        """Open the flow and carry it until idle or broken.

        Obeys the copy contract (relay.py's module docstring): owns and closes
        the data connection; the user side is the shared UDP listener, borrowed.
        """
        data = self._data = take_data()
        if data is None:
            return
        if udplink.usable(data):
            self._run_link(data)
            return
        writer = gevent.spawn(self._write_frames, data)
        try:
            self._read_replies(data)
        except (OSError, ValueError) as exc:
            log.debug("UDP flow %s ended: %s", self.peer, exc)
        finally:
            writer.kill(block=True)
            net.close_quietly(data)

    def close(self) -> None:
        """Wake the flow's greenlets so that it ends (on shutdown). Never raises."""
        if self._link is not None:
            self._link.end("shut down")
        elif self._data is not None:
            net.abort(self._data)

    def _run_link(self, data: socket.socket) -> None:
        reply = udplink.reply_sender(self.listener, self.peer,
                                     self.stats.udp_reply, self.pass_reply)
        link = udplink.open_link(data, self.size_limit, reply)
        while not self.queue.empty():  # what came while the connection was taken
            datagram = self.queue.get_nowait()
            self.queued_bytes -= len(datagram)
            if link.send_frame(frame(datagram)):
                self.stats.udp_datagram(len(datagram))
        self._link = link
        link.start()
        try:
            udplink.wait_until_idle_or_ended(link, self.idle_timeout)
        finally:
            link.end("closed", abort=False)
            log.debug("UDP flow %s ended: %s", self.peer, link.why)

    def _write_frames(self, data: socket.socket) -> None:
        try:
            while True:
                datagram = self.queue.get()
                self.queued_bytes -= len(datagram)
                data.sendall(frame(datagram))
                self.stats.udp_datagram(len(datagram))
        except OSError:
            net.abort(data)  # wakes the reader; run() owns the socket and closes it

    def _read_replies(self, data: socket.socket) -> None:
        watchdog = gevent.spawn(self._end_when_idle, data)
        reader = data.makefile("rb")
        try:
            while True:
                reply = readers.read_frame(reader, self.size_limit)
                if reply is None:
                    return
                self.last_active = time.monotonic()
                if self.pass_reply is not None and not self.pass_reply(len(reply)):
                    continue
                self.listener.sendto(reply, self.peer)
                self.stats.udp_reply(len(reply))
        finally:
            watchdog.kill(block=False)
            reader.close()

    def _end_when_idle(self, data: socket.socket) -> None:
        """Abort the data connection once nothing has passed either way for the
        idle timeout. (Not a read timeout: a buffered reader whose read timed
        out refuses every later read, which ended flows that only sent.)"""
        while True:
            left = self.last_active + self.idle_timeout() - time.monotonic()
            if left <= 0:
                net.abort(data)  # the reader ends; run() owns the socket and closes it
                return
            gevent.sleep(left)


class ServerFlows:
    """The open flows of a server, by user address."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._flows = {}  # type: Dict[tuple, ServerFlow]
        # get(peer): the open flow of a user address, or None. The dict's own
        # method: it runs for every datagram.
        self.get = self._flows.get  # type: Callable[[tuple], Optional[ServerFlow]]

    def add(self, flow: ServerFlow) -> None:
        self._flows[flow.peer] = flow

    def close(self) -> None:
        for flow in list(self._flows.values()):
            flow.close()

    def run(self, flow: ServerFlow, take_data: Callable[[], Optional[socket.socket]]) -> None:
        """Run an added ``flow`` in the caller's greenlet; forget it when it ends."""
        self.stats.udp_flows_active += 1
        try:
            flow.run(take_data)
        finally:
            self.stats.udp_flows_active -= 1
            if self._flows.get(flow.peer) is flow:
                del self._flows[flow.peer]


def client_flow(data: socket.socket, target: socket.socket, stats: Stats,
                size_limit: int, read_timeout: float) -> None:
    """Carry one flow on the client: frames from data -> target, replies back.
    ``size_limit``: the largest frame taken (udplink.LARGEST_DATAGRAM: any);
    replies are read whole, whatever their size.

    Obeys the copy contract (relay.py's module docstring): owns and closes both
    sockets. Ends when the server closes the data connection, when either
    direction fails (a failed write aborts the data connection, which wakes
    the other), or when someone aborts it, as the client does when it stops.
    """
    if udplink.usable(data):
        _client_link(data, target, stats, size_limit, read_timeout)
        return
    replies = gevent.spawn(_send_replies, target, data, stats)
    reader = data.makefile("rb")
    try:
        # The server closes an idle flow; this is only a backstop.
        data.settimeout(read_timeout * FLOW_IDLE_READ_TIMEOUTS * 2)
        while True:
            datagram = readers.read_frame(reader, size_limit)
            if datagram is None:
                return
            target.send(datagram)
            stats.udp_datagram(len(datagram))
    except (OSError, ValueError) as exc:
        log.debug("UDP flow to target ended: %s", exc)
    finally:
        reader.close()
        replies.kill(block=True)
        net.close_quietly(target)
        net.close_quietly(data)


def _client_link(data: socket.socket, target: socket.socket, stats: Stats,
                 size_limit: int, read_timeout: float) -> None:
    """client_flow over a link (plain or TLS): udplink's callbacks both ways."""
    link = udplink.open_link(data, size_limit, None)
    target_side = udplink.TargetSide(target, link, stats)
    link.on_datagram = target_side.send
    link.start()
    target_side.start()
    try:
        # The server closes an idle flow; this is only a backstop.
        backstop = read_timeout * FLOW_IDLE_READ_TIMEOUTS * 2
        udplink.wait_until_idle_or_ended(link, lambda: backstop)
    finally:
        link.end("closed", abort=False)
        target_side.close()
        log.debug("UDP flow to target ended: %s", link.why)


def _send_replies(target: socket.socket, data: socket.socket, stats: Stats) -> None:
    while True:
        try:
            reply = target.recv(RECEIVE_SIZE)
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
        stats.udp_reply(len(reply))
