"""The copy contract (relay.py's module docstring), asserted on every engine.

In-process, with real sockets (127.0.0.1 TCP, AF_UNIX socketpairs, UDP on
127.0.0.1). One table of TCP engines:

    user end <-TCP-> left [engine] right <-TCP-> target end

where the engine is relay.exchange (user space, os.splice, ctypes splice)
or zerocopy.exchange called directly, or tlscopy.exchange, whose right side
(and so the target end) is then a TLS stream (tlsstream.TLSStream, tls=1);
and the two UDP flow engines, whose data connection is a socketpair and whose
UDP side is a real UDP socket:

    client_flow:  server end <-unix-> data [client_flow] target <-UDP-> echo
    ServerFlow:   user <-UDP-> listener [ServerFlow.run] data <-unix-> client end
"""

import os
import socket
import sys

import gevent
import pytest
from gevent import socket as gsocket

from nodepass_gevent import config
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import readers, relay, tls, tlscopy, udplink, zerocopy
from nodepass_gevent.copy.tlsstream import client_handshake, server_handshake
from nodepass_gevent.tunnel import udp

from test_zerocopy import read_to_eof, tcp_pair

pytestmark = pytest.mark.matrix

WAIT = 10.0   # seconds any one step may take
SIZE = 512 * 1024


def closed(sock) -> bool:
    return sock.fileno() == -1


def assert_ended(link, why: str, datagrams=None, replies=None) -> None:
    """The flow's engine returned; its owned sockets are closed; the counts, if given."""
    link.engine.join(timeout=WAIT)
    assert link.engine.ready(), why
    assert all(closed(sock) for sock in link.owned())
    if datagrams is not None:
        assert link.stats.udp_total == len(datagrams)
        assert link.stats.bytes_in == sum(len(d) for d in datagrams)
        assert link.stats.bytes_out == sum(len(r) for r in replies)


# --------------------------------------------------------------------------
# The TCP engines, one table.

def _relay(splice):
    def run(left, right, stats):
        zerocopy._chosen = splice
        return relay.exchange(left, right, stats)
    return run


def _zerocopy_direct(left, right, stats):
    return zerocopy.exchange(left, right, stats.counter(True), stats.counter(False),
                             zerocopy.libc_splice())


def _tlscopy_direct(left, right, stats):
    return tlscopy.exchange(left, right, stats.counter(True), stats.counter(False))


_tlscopy_direct.over_tls = True  # TcpLink: the right side speaks TLS


TCP_ENGINES = {
    "relay, user space": lambda: _relay(None),
    "relay, os.splice": lambda: _relay(os.splice) if hasattr(os, "splice") else None,
    "relay, ctypes splice": lambda: _relay(zerocopy.libc_splice()),
    "zerocopy.exchange": lambda: _zerocopy_direct,
    "tlscopy.exchange": lambda: _tlscopy_direct,
}


def tls_pair(pair=tcp_pair):
    """(server-side TLSStream, client-side TLSStream) over loopback TCP (or
    ``pair()``'s sockets), tls=1."""
    server_context = tls.server_context(
        config.parse_url("server://127.0.0.1:1/127.0.0.1:2?tls=1"))
    near, far = pair()
    for sock in (near, far):
        sock.settimeout(WAIT)
    client = gevent.spawn(client_handshake, near, tls.client_context(1), None)
    server = server_handshake(far, server_context)
    return server, client.get(timeout=WAIT)


@pytest.fixture(params=sorted(TCP_ENGINES))
def tcp_engine(request, monkeypatch):
    monkeypatch.setattr(zerocopy, "_chosen", zerocopy._chosen)  # restored after the test
    run = TCP_ENGINES[request.param]()
    if run is None:
        pytest.skip("os.splice is Python 3.10+")
    return run


class TcpLink:
    def __init__(self, run) -> None:
        self.user, self.left = tcp_pair()
        self.right, self.target = tls_pair() if getattr(run, "over_tls", False) else tcp_pair()
        self.stats = Stats()
        self.engine = gevent.spawn(run, self.left, self.right, self.stats)

    def close(self) -> None:
        self.engine.kill(block=True, timeout=WAIT)
        self.user.close()
        self.target.close()


@pytest.fixture
def tcp_link(tcp_engine):
    link = TcpLink(tcp_engine)
    yield link
    link.close()


@pytest.mark.timeout(30)
def test_tcp_engine_passes_eof_on_closes_both_and_counts_both_sides(tcp_link):
    request, answer = os.urandom(SIZE), os.urandom(SIZE + 7)
    tcp_link.user.sendall(request)
    tcp_link.user.shutdown(socket.SHUT_WR)
    # The half-close reaches the target, which still answers after it.
    assert read_to_eof(tcp_link.target) == request
    tcp_link.target.sendall(answer)
    tcp_link.target.shutdown(socket.SHUT_WR)
    assert read_to_eof(tcp_link.user) == answer
    moved = tcp_link.engine.get(timeout=WAIT)
    assert moved == (len(request), len(answer))
    assert (tcp_link.stats.bytes_in, tcp_link.stats.bytes_out) == moved
    assert closed(tcp_link.left) and closed(tcp_link.right)


@pytest.mark.timeout(30)
def test_tcp_engine_aborts_both_sides_on_a_write_error_and_ends(tcp_link):
    # The target stops reading and resets: writes towards it fail.
    tcp_link.target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
    tcp_link.target.close()
    sender = gevent.spawn(_send_until_refused, tcp_link.user)
    tcp_link.engine.join(timeout=WAIT)
    assert tcp_link.engine.ready(), "the engine did not end after a reset"
    assert closed(tcp_link.left) and closed(tcp_link.right)
    # The user's side was torn down too: its writes fail, its reads end.
    sender.join(timeout=WAIT)
    assert sender.ready() and sender.value is True


def _send_until_refused(sock) -> bool:
    try:
        while True:
            sock.sendall(b"x" * 65536)
    except OSError:
        return True


# --------------------------------------------------------------------------
# The UDP flow engines.

def udp_socket():
    sock = gsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def udp_echo(sock) -> None:
    while True:
        datagram, peer = sock.recvfrom(65536)
        sock.sendto(b"re:" + datagram, peer)


def unix_pair():
    return gsocket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def tls_unix_pair():
    """A unix socket pair with TLS (tls=1) on both ends: TLSStreams, handshake done."""
    return tls_pair(unix_pair)


flow_pair = unix_pair  # the flow_engine fixture's choice: a flow's data connection and its peer


def read_frames(sock, count: int):
    reader = sock.makefile("rb")
    try:
        return [readers.read_frame(reader, 65535) for _ in range(count)]
    finally:
        reader.close()


class ClientFlowLink:
    def __init__(self) -> None:
        self.server_end, self.data = flow_pair()
        self.echo_socket = udp_socket()
        self.echo = gevent.spawn(udp_echo, self.echo_socket)
        self.target = udp_socket()
        self.target.connect(self.echo_socket.getsockname())
        self.stats = Stats()
        self.engine = gevent.spawn(udp.client_flow, self.data, self.target, self.stats,
                                   65535, 30.0)

    def owned(self):
        return self.data, self.target

    def close(self) -> None:
        self.engine.kill(block=True, timeout=WAIT)
        self.echo.kill(block=True, timeout=WAIT)
        for sock in (self.server_end, self.echo_socket, self.data, self.target):
            sock.close()


class ServerFlowLink:
    def __init__(self) -> None:
        self.data, self.client_end = flow_pair()
        self.listener = udp_socket()
        self.user = udp_socket()
        self.stats = Stats()
        self.flow = udp.ServerFlow(self.listener, self.user.getsockname(), self.stats,
                                       65535, 30.0)
        self.engine = gevent.spawn(self.flow.run, lambda: self.data)

    def owned(self):
        return (self.data,)  # the listener is the role's, borrowed

    def close(self) -> None:
        self.engine.kill(block=True, timeout=WAIT)
        for sock in (self.client_end, self.listener, self.user, self.data):
            sock.close()


@pytest.fixture(params=["callbacks", "callbacks over TLS", "greenlets"])
def flow_engine(request, monkeypatch):
    """Every flow engine: udplink's FrameLink (plain data connections), its
    TLSFrameLink (TLSStreams), and udp.py's greenlet pair (any other socket),
    forced here on a plain one."""
    if request.param == "greenlets":
        monkeypatch.setattr(udplink, "usable", lambda data: False)
    if request.param == "callbacks over TLS":
        monkeypatch.setattr(sys.modules[__name__], "flow_pair", tls_unix_pair)
    return request.param


@pytest.fixture
def client_flow(flow_engine):
    link = ClientFlowLink()
    yield link
    link.close()


@pytest.fixture
def server_flow(flow_engine):
    link = ServerFlowLink()
    yield link
    link.close()


@pytest.mark.timeout(30)
def test_client_flow_ends_on_eof_closes_both_and_counts_both_sides(client_flow):
    datagrams = [os.urandom(size) for size in (1, 100, 1400, 9000)]
    for datagram in datagrams:
        client_flow.server_end.sendall(udp.frame(datagram))
    replies = read_frames(client_flow.server_end, len(datagrams))
    assert sorted(replies) == sorted(b"re:" + d for d in datagrams)
    client_flow.server_end.shutdown(socket.SHUT_WR)  # the server ends the flow
    assert_ended(client_flow, "the flow did not end on EOF", datagrams, replies)


@pytest.mark.timeout(30)
def test_client_flow_aborts_both_sides_when_a_reply_cannot_be_written(client_flow):
    # The server's end stops reading: the reply's write fails (EPIPE), while
    # nothing ends the data connection's other direction.
    client_flow.server_end.shutdown(socket.SHUT_RD)
    client_flow.server_end.sendall(udp.frame(b"ping"))
    assert_ended(client_flow, "a failed write did not end the flow")


@pytest.mark.timeout(30)
def test_server_flow_ends_on_eof_closes_its_data_and_counts_both_sides(server_flow,
                                                                      flow_engine):
    datagrams = [os.urandom(size) for size in (1, 100, 1400, 9000)]
    for datagram in datagrams:
        server_flow.flow.offer(datagram)
    assert read_frames(server_flow.client_end, len(datagrams)) == datagrams
    engine = {"callbacks": udplink.FrameLink, "callbacks over TLS": udplink.TLSFrameLink,
              "greenlets": type(None)}[flow_engine]
    assert type(server_flow.flow._link) is engine
    replies = [b"re:" + d for d in datagrams]
    for reply in replies:
        server_flow.client_end.sendall(udp.frame(reply))
    server_flow.user.settimeout(WAIT)
    received = [server_flow.user.recv(65536) for _ in replies]
    assert received == replies
    server_flow.client_end.shutdown(socket.SHUT_WR)  # the client ends the flow
    assert_ended(server_flow, "the flow did not end on EOF", datagrams, replies)
    assert not closed(server_flow.listener)  # borrowed: the role's shared UDP listener


@pytest.mark.timeout(30)
def test_server_flow_aborts_both_sides_when_a_datagram_cannot_be_written(server_flow):
    server_flow.client_end.shutdown(socket.SHUT_RD)
    gevent.sleep(0.05)  # the flow has taken its data connection
    server_flow.flow.offer(b"ping")
    assert_ended(server_flow, "a failed write did not end the flow")


@pytest.mark.timeout(30)
def test_server_flow_lives_while_only_the_user_sends_and_ends_when_idle(flow_engine):
    # Regression (greenlet engine): its reader's first timeout ended a flow that
    # carried datagrams one way only.
    data, client_end = flow_pair()
    listener, user, stats = udp_socket(), udp_socket(), Stats()
    flow = udp.ServerFlow(listener, user.getsockname(), stats, 65535, 0.05)  # idle: 0.6 s
    engine = gevent.spawn(flow.run, lambda: data)
    try:
        flow.offer(b"one-way")  # two at once: a flow, not a lone request (0.05 s)
        for _ in range(7):  # 1.4 s of datagrams, none answered
            flow.offer(b"one-way")
            gevent.sleep(0.2)
        assert not engine.dead, "the flow ended while datagrams still came"
        assert read_frames(client_end, 8) == [b"one-way"] * 8
        engine.join(timeout=WAIT)  # now idle both ways
        assert engine.dead and closed(data)
        assert stats.udp_total == 8
    finally:
        engine.kill(block=True, timeout=WAIT)
        for sock in (client_end, listener, user, data):
            sock.close()


@pytest.mark.timeout(30)
def test_server_flow_of_a_lone_datagram_ends_after_one_read_timeout(flow_engine):
    # A user that sent one datagram (a request, a probe, a user gone) holds its
    # data connection for one UDP_READ_TIMEOUT, as v1.0's exchange would; one
    # that sent a second keeps its flow for FLOW_IDLE_READ_TIMEOUTS of them.
    listener, user, stats = udp_socket(), udp_socket(), Stats()
    flows = []
    try:
        for datagrams in (1, 2):
            data, client_end = flow_pair()
            flow = udp.ServerFlow(listener, user.getsockname(), stats, 65535, 0.05)
            for _ in range(datagrams):
                flow.offer(b"ask")
            flows.append((gevent.spawn(flow.run, lambda data=data: data), data, client_end))
        (lone, lone_data, _), (kept, kept_data, _) = flows
        lone.join(timeout=0.4)  # 0.05 s idle, and the 0.05 s wake-up granularity
        assert lone.dead and closed(lone_data)
        assert not kept.dead  # 0.6 s
        kept.join(timeout=WAIT)
        assert kept.dead and closed(kept_data)
    finally:
        for engine, data, client_end in flows:
            engine.kill(block=True, timeout=WAIT)
            data.close()
            client_end.close()
        listener.close()
        user.close()


@pytest.mark.timeout(30)
def test_client_flows_keep_the_frames_their_reads_cut_apart(flow_engine):
    # udplink's links read into one buffer of the process: a frame that one
    # link's read cut (in its header, then in its datagram) must come out
    # whole although another link reads in between.
    first, second = ClientFlowLink(), ClientFlowLink()
    try:
        cut, whole = os.urandom(3000), os.urandom(2000)
        framed = udp.frame(cut)
        for part in (framed[:1], framed[1:1000], framed[1000:]):
            first.server_end.sendall(part)
            gevent.sleep(0.05)  # first's link has read the part
            second.server_end.sendall(udp.frame(whole))
            assert read_frames(second.server_end, 1) == [b"re:" + whole]
        assert read_frames(first.server_end, 1) == [b"re:" + cut]
        assert first.stats.udp_total == 1 and second.stats.udp_total == 3
    finally:
        first.close()
        second.close()
