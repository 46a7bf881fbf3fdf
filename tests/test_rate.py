"""rate=: the tunnel's token buckets pace both TCP engines, and the splice engine keeps splicing.

In-process first (each engine, both directions at once, real loopback TCP),
then end to end through a real server and client. Bounds are loose (a shared
2-core machine); scripts/bench holds the precise 5% check.
"""

import os
import socket
import time

import gevent
import pytest

from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import relay, zerocopy
from nodepass_gevent.edge.ratelimit import TunnelRate

from support import HOST, EchoServer, sha256, tcp_exchange
from test_zerocopy import read_to_eof, tcp_pair

pytestmark = pytest.mark.matrix

RATE_MBIT = 8.0
SIZE = 1000 * 1000  # one second at 8 Mbit/s, plus the first burst


@pytest.fixture(scope="module")
def echo():
    """One echo target for the module (the per-test one costs a second at teardown)."""
    server = EchoServer()
    yield server
    server.close()


def counting(splice):
    """A splice that records each call's length (no .raw: the engine calls it)."""
    def wrapper(src, dst, count, *args):
        wrapper.lengths.append(count)
        return splice(src, dst, count, *args)
    wrapper.lengths = []
    return wrapper


def engines():
    found = [("user space", None)]
    if hasattr(os, "splice"):
        found.append(("os.splice", counting(os.splice)))
    found.append(("ctypes splice", counting(zerocopy.libc_splice())))
    return found


@pytest.mark.parametrize("name, splice", engines(), ids=[name for name, _ in engines()])
def test_rate_paces_both_directions_in_each_engine(monkeypatch, name, splice):
    monkeypatch.setattr(zerocopy, "_chosen", splice)
    user, left = tcp_pair()
    right, target = tcp_pair()
    rate = TunnelRate(RATE_MBIT)
    stats = Stats()
    upload, download = os.urandom(SIZE), os.urandom(SIZE)
    started = time.monotonic()
    engine = gevent.spawn(relay.exchange, left, right, stats, rate)

    def send(sock, payload):
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    senders = [gevent.spawn(send, user, upload), gevent.spawn(send, target, download)]
    at_target, at_user = gevent.spawn(read_to_eof, target), gevent.spawn(read_to_eof, user)
    gevent.joinall([at_target, at_user] + senders, timeout=20, raise_error=True)
    elapsed = time.monotonic() - started
    engine.join(timeout=5)
    for sock in (user, target):
        sock.close()
    assert sha256(at_target.value) == sha256(upload) and sha256(at_user.value) == sha256(download)
    assert engine.value == (SIZE, SIZE)
    # Each direction may move SIZE in (SIZE - burst) / rate seconds at the least.
    shortest = (SIZE - rate.inbound.burst) / rate.inbound.rate
    assert shortest * 0.95 <= elapsed <= shortest * 1.6 + 0.5, elapsed
    if splice is not None:
        # Still spliced, each call capped to a grant (at most one burst).
        assert splice.lengths and max(splice.lengths) <= rate.inbound.burst
        assert sum(splice.lengths) >= 2 * SIZE


@pytest.mark.parametrize("name, splice", engines()[:2], ids=[name for name, _ in engines()[:2]])
def test_rate_is_shared_fairly_by_a_tunnels_connections(monkeypatch, name, splice):
    """Four uploads at once on one tunnel's rate: they take turns at the bucket,
    so they finish together, not one after the other."""
    monkeypatch.setattr(zerocopy, "_chosen", splice)
    rate = TunnelRate(RATE_MBIT)
    rate.inbound.take(10 ** 9)  # the first burst would go to whoever starts first
    size = 250 * 1000
    finished = {}
    started = time.monotonic()

    def upload(index):
        user, left = tcp_pair()
        right, target = tcp_pair()
        engine = gevent.spawn(relay.exchange, left, right, None, rate)
        reader = gevent.spawn(read_to_eof, target)
        user.sendall(os.urandom(size))
        user.shutdown(socket.SHUT_WR)
        assert len(reader.get(timeout=20)) == size
        finished[index] = time.monotonic() - started
        target.close()
        read_to_eof(user)
        user.close()
        engine.join(timeout=5)

    gevent.joinall([gevent.spawn(upload, index) for index in range(4)], timeout=30,
                   raise_error=True)
    times = sorted(finished.values())
    shortest = 4 * size / rate.inbound.rate
    assert times[-1] >= shortest * 0.95  # the four together held the rate
    assert times[0] >= times[-1] * 0.75, times  # and nobody finished far ahead


def test_rate_end_to_end_8_mbit(make_tunnel):
    tunnel = make_tunnel(server_query="&rate=8")
    assert "rate=8Mbit/s" in tunnel.server.output()
    payload = os.urandom(2 * 1000 * 1000)
    started = time.monotonic()
    assert sha256(tcp_exchange(tunnel.port, payload, timeout=30)) == sha256(payload)
    elapsed = time.monotonic() - started
    # 2 MB each way at 1 MB/s: 1.9 s after the first burst; both directions
    # run at once (the echo answers while the upload still flows).
    mbit = len(payload) * 8 / 1e6 / elapsed
    assert 5.5 <= mbit <= 8.6, "%.2f Mbit/s in %.2fs" % (mbit, elapsed)


def test_no_rate_is_not_paced(make_tunnel):
    tunnel = make_tunnel()
    payload = os.urandom(3 * 1000 * 1000)
    started = time.monotonic()
    assert sha256(tcp_exchange(tunnel.port, payload, timeout=30)) == sha256(payload)
    assert time.monotonic() - started < 1.5  # hundreds of Mbit/s unpaced: far from 8


def test_rate_drops_udp_datagrams_over_the_rate(make_tunnel):
    tunnel = make_tunnel(server_query="&rate=0.1")  # 12.5 KB/s, a 64 KiB bucket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        replies = 0
        for _ in range(40):  # 40 x 8000 bytes at once: over the 64 KiB burst
            sock.sendto(b"x" * 8000, (HOST, tunnel.port))
        try:
            while True:
                sock.recvfrom(65535)
                replies += 1
        except socket.timeout:
            pass
    assert 1 <= replies <= 9, replies  # the echo's ping included
    tunnel.server.wait_for_output("udp_over_rate=", timeout=5)
