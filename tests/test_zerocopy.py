"""The TCP exchange on each engine: os.splice, splice(2) through ctypes, user space.

In-process, with real sockets: a 127.0.0.1 TCP connection on the user's side
and, on the target's side, a TCP connection or an AF_UNIX socketpair. The
relay under test sits in the middle:

    user end <-TCP-> left [relay.exchange] right <-TCP|socketpair-> target end

Every engine runs through relay.exchange itself (the engine is forced the way
zerocopy.engine() would have chosen it), so the user-space test is the real
fallback path of relay.py. The probe and the choice of engine are tested
against the kernel's splice and against a splice that refuses, as a sandbox's
seccomp filter would.
"""

import errno
import logging
import os
import socket
import struct

import gevent
import pytest
from gevent import socket as gsocket

from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import relay, zerocopy

import loopback  # scripts/loopback.py, on the path by conftest.py

pytestmark = pytest.mark.matrix  # the core suite: the ctypes engine exists for old Pythons

SIZE = 3 * 1024 * 1024  # bytes each way: many pipe fills of 256 KB
WAIT = 20.0             # seconds any one step may take


class CountingPool(zerocopy.PipePool):
    """The pipe pool, counting what the engine takes and gives back."""

    def __init__(self) -> None:
        super().__init__()
        self.acquired = self.released = self.discarded = 0

    def acquire(self):
        self.acquired += 1
        return super().acquire()

    def release(self, pipe) -> None:
        self.released += 1
        super().release(pipe)

    def discard(self, pipe) -> None:
        self.discarded += 1
        zerocopy.PipePool.discard(pipe)

    @property
    def outstanding(self) -> int:
        return self.acquired - self.released - self.discarded

    def kept(self):
        return list(self._idle)


def kept_pipes(pool) -> set:
    """fd_targets() of the pipes the splice pool keeps idle."""
    return {os.readlink("/proc/self/fd/%d" % end) for pair in pool.kept() for end in pair}


class Engine:
    def __init__(self, name, splice, pool) -> None:
        self.name, self.splice, self.pool = name, splice, pool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> set:
    """What each open descriptor points at ("socket:[inode]", "pipe:[inode]"):
    comparing these sets, not counts, keeps a descriptor that an earlier test's
    garbage closes meanwhile from hiding one this test opened."""
    targets = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink("/proc/self/fd/" + name))
        except OSError:  # the listing's own descriptor, gone already
            pass
    return targets


def tcp_pair():
    listener = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        near.connect(listener.getsockname())
        far = listener.accept()[0]
    finally:
        listener.close()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


def unix_pair():
    return gsocket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


@pytest.fixture(scope="module", autouse=True)
def warm_hub():
    """The hub and its descriptors exist before any test counts descriptors."""
    gevent.get_hub()
    near, far = tcp_pair()
    near.close()
    far.close()


@pytest.fixture(params=["os.splice", "ctypes", "user space"])
def engine(request, monkeypatch):
    if request.param == "os.splice":
        if not hasattr(os, "splice"):
            pytest.skip("os.splice is Python 3.10+")
        splice = os.splice
    elif request.param == "ctypes":
        splice = zerocopy.libc_splice()
    else:
        splice = None  # what engine() returns when the kernel refuses splice
    pool = CountingPool()
    monkeypatch.setattr(zerocopy, "_chosen", splice)
    monkeypatch.setattr(zerocopy, "pipes", pool)
    yield Engine(request.param, splice, pool)
    for pipe in pool.kept():
        zerocopy.PipePool.discard(pipe)


class Link:
    """The user's end, the target's end, and relay.exchange running between them."""

    def __init__(self, target_side: str) -> None:
        self.targets_before = fd_targets()
        self.user, left = tcp_pair()
        right, self.target = tcp_pair() if target_side == "tcp" else unix_pair()
        self.stats = Stats()
        self.relay = gevent.spawn(relay.exchange, left, right, self.stats)

    def moved(self):
        """(forward, backward) bytes as relay.exchange returned them."""
        return self.relay.get(timeout=WAIT)

    def close(self) -> None:
        self.relay.kill(block=True, timeout=WAIT)
        self.user.close()
        self.target.close()


@pytest.fixture(params=["tcp", "socketpair"])
def link(request, engine):
    made = Link(request.param)
    yield made
    made.close()


def send_all_then_eof(sock, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def read_to_eof(sock) -> bytes:
    return loopback.read_to_eof(sock, 262144)  # large reads: the transfers here are MBs


def read_exactly(sock, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = sock.recv(min(262144, size - got))
        assert chunk, "EOF after %d of %d bytes" % (got, size)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def joined(*greenlets):
    gevent.joinall(greenlets, timeout=WAIT, raise_error=True)
    assert all(g.ready() for g in greenlets), "not done within %.0f s" % WAIT
    return [g.value for g in greenlets]


# --------------------------------------------------------------------------
# The exchange, on every engine.


@pytest.mark.timeout(60)
def test_bytes_arrive_exact_both_ways_at_once_and_are_counted(link, engine):
    upload, download = os.urandom(SIZE), os.urandom(SIZE + 12345)
    uploaded, downloaded, _, _ = joined(
        gevent.spawn(read_to_eof, link.target),
        gevent.spawn(read_to_eof, link.user),
        gevent.spawn(send_all_then_eof, link.user, upload),
        gevent.spawn(send_all_then_eof, link.target, download),
    )
    assert uploaded == upload
    assert downloaded == download
    assert link.moved() == (len(upload), len(download))
    assert (link.stats.bytes_in, link.stats.bytes_out) == (len(upload), len(download))
    if engine.splice is None:
        assert engine.pool.acquired == 0  # the user-space path: no pipe at all
    else:
        assert engine.pool.acquired > 0
    assert engine.pool.outstanding == 0 and engine.pool.discarded == 0


@pytest.mark.timeout(60)
def test_eof_is_passed_on_as_a_half_close_and_the_answer_still_flows(link, engine):
    request, answer = os.urandom(SIZE // 3), os.urandom(SIZE)
    link.user.sendall(request)
    link.user.shutdown(socket.SHUT_WR)
    # The target sees the request end (EOF), and only then answers.
    assert joined(gevent.spawn(read_to_eof, link.target)) == [request]
    writer = gevent.spawn(send_all_then_eof, link.target, answer)
    assert joined(gevent.spawn(read_to_eof, link.user), writer)[0] == answer
    assert link.moved() == (len(request), len(answer))
    assert engine.pool.outstanding == 0


@pytest.mark.timeout(60)
def test_a_reset_aborts_both_sides_and_ends_the_exchange(link, engine):
    """The user resets (SO_LINGER 0) while the target streams: the target's writes
    fail or it sees EOF, and relay.exchange returns instead of waiting forever."""
    def stream_until_cut():
        chunk = os.urandom(65536)
        try:
            while True:
                link.target.sendall(chunk)
        except OSError as exc:
            return exc.errno

    def drain_until_cut():
        try:
            return read_to_eof(link.target)
        except OSError:
            return b""

    link.user.sendall(b"hello")
    assert read_exactly(link.target, 5) == b"hello"
    streamer = gevent.spawn(stream_until_cut)
    read_exactly(link.user, 512 * 1024)
    link.user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    link.user.close()
    link.moved()  # returns: the exchange ended
    # The traffic counters (what the tunnel reports) hold what moved before the cut.
    assert link.stats.bytes_in == 5 and link.stats.bytes_out >= 512 * 1024
    assert joined(streamer)[0] in (errno.EPIPE, errno.ECONNRESET)
    assert joined(gevent.spawn(drain_until_cut)) == [b""]  # shut down, not just silent
    assert engine.pool.outstanding == 0


@pytest.mark.timeout(60)
def test_no_descriptor_is_left_and_pipes_go_back_to_the_pool(link, engine):
    payload = os.urandom(SIZE)
    assert joined(gevent.spawn(read_to_eof, link.target),
                  gevent.spawn(send_all_then_eof, link.user, payload))[0] == payload
    link.target.shutdown(socket.SHUT_WR)
    assert read_to_eof(link.user) == b""
    link.moved()
    link.close()
    kept = engine.pool.kept()
    assert engine.pool.outstanding == 0
    # Only the pool's pipes remain of what this test opened.
    assert fd_targets() - link.targets_before <= kept_pipes(engine.pool)
    for read_end, _ in kept:  # and they are empty
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)


@pytest.mark.timeout(60)
def test_an_idle_connection_holds_only_its_two_sockets(link, engine):
    """After a burst each way, the relay gives its pipes back: while the
    connection is idle it costs two descriptors (left, right), as on 3.11."""
    for source, sink in ((link.user, link.target), (link.target, link.user)):
        source.sendall(b"x" * 1000000)
        assert read_exactly(sink, 1000000) == b"x" * 1000000
    gevent.sleep(0.05)
    opened = fd_targets() - link.targets_before
    pipes = {target for target in opened if target.startswith("pipe:")}
    sockets = [target for target in opened if target.startswith("socket:")]
    assert pipes <= kept_pipes(engine.pool)  # no pipe held but the pool's idle ones
    assert len(sockets) == 4  # the two ends here, left and right in the relay
    assert engine.pool.outstanding == 0
    link.user.shutdown(socket.SHUT_WR)
    link.target.shutdown(socket.SHUT_WR)
    assert link.moved() == (1000000, 1000000)


def counting(function, calls, name):
    def counted(*args):
        calls.append(name)
        return function(*args)
    return counted


def ping_pong(made, rounds: int) -> None:
    for _ in range(rounds):
        made.user.sendall(b"ping")
        assert read_exactly(made.target, 4) == b"ping"
        made.target.sendall(b"pong")
        assert read_exactly(made.user, 4) == b"pong"


@pytest.mark.timeout(60)
def test_small_messages_are_copied_and_bulk_is_spliced(monkeypatch, engine):
    """A small message costs a read and a write per hop, no pipe and no third call
    that would only say EAGAIN; bulk in between is spliced, and small messages
    after it are copied again."""
    if engine.splice is None:
        pytest.skip("the user-space path makes no splice")
    calls = []
    monkeypatch.setattr(zerocopy, "_chosen", counting(engine.splice, calls, "splice"))
    monkeypatch.setattr(zerocopy, "_read_into", counting(os.readv, calls, "read"))
    monkeypatch.setattr(zerocopy, "_write", counting(os.write, calls, "write"))
    made = Link("tcp")
    try:
        ping_pong(made, 3)
        assert calls == ["read", "write"] * 3 * 2  # 3 round trips, 2 directions
        assert engine.pool.acquired == 0
        bulk = os.urandom(SIZE)
        made.user.sendall(bulk)
        assert read_exactly(made.target, SIZE) == bulk
        assert calls.count("splice") >= 2 and engine.pool.acquired > 0
        ping_pong(made, 1)  # may still be spliced: the bulk's last fill was no short one
        del calls[:]
        ping_pong(made, 2)
        assert calls == ["read", "write"] * 2 * 2
        assert engine.pool.outstanding == 0
    finally:
        made.close()


@pytest.mark.timeout(60)
def test_a_copy_the_sink_has_no_room_for_waits_and_reading_stops(monkeypatch, engine):
    """Small messages, one at a time, to a target that reads nothing: once the
    relay's write finds the sink full, the rest waits and the relay reads no
    more; when the target reads, every byte arrives in order, counted once."""
    if engine.splice is None:
        pytest.skip("the user-space path has its own writes")
    calls, short_writes = [], []

    def write(fd, data):
        calls.append("write")
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
            short_writes.append(len(data))
            raise
        if sent < len(data):
            short_writes.append(len(data))
        return sent

    monkeypatch.setattr(zerocopy, "_read_into", counting(os.readv, calls, "read"))
    monkeypatch.setattr(zerocopy, "_write", write)
    user, left = tcp_pair()
    right, target = tcp_pair()
    right.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stats = Stats()
    exchange = gevent.spawn(relay.exchange, left, right, stats)
    try:
        message, sent = os.urandom(4000), 0
        while stats.bytes_in == sent:  # until the relay holds bytes it could not write
            assert sent < 64 * 1024 * 1024, "the sink never ran out of room"
            user.sendall(message)
            sent += len(message)
            for _ in range(50):  # one message per read: each is a small copy
                gevent.sleep(0.001)
                if stats.bytes_in == sent:
                    break
        assert short_writes
        assert "splice" not in calls
        reads = calls.count("read")
        user.sendall(message * 3)  # waits at the relay's source: reading has stopped
        sent += 3 * len(message)
        gevent.sleep(0.05)
        assert calls.count("read") == reads
        user.shutdown(socket.SHUT_WR)
        assert read_to_eof(target) == message * (sent // len(message))
        target.shutdown(socket.SHUT_WR)
        assert exchange.get(timeout=WAIT)[0] == sent == stats.bytes_in
    finally:
        exchange.kill(block=True, timeout=WAIT)
        user.close()
        target.close()


# --------------------------------------------------------------------------
# splice(2) through ctypes behaves as os.splice.


def test_libc_splice_raises_what_os_splice_raises():
    splice = zerocopy.libc_splice()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    near, far = socket.socketpair()
    try:
        far.setblocking(False)
        cases = {
            "nothing to read (EAGAIN)": (far.fileno(), write_end),
            "bad descriptor (EBADF)": (1000000, write_end),
            "no pipe on either side (EINVAL)": (far.fileno(), near.fileno()),
        }
        for name, (src, dst) in cases.items():
            with pytest.raises(OSError) as ctypes_error:
                splice(src, dst, 100, flags=zerocopy._FLAGS)
            if hasattr(os, "splice"):
                with pytest.raises(OSError) as os_error:
                    os.splice(src, dst, 100, flags=zerocopy._FLAGS)
                assert type(ctypes_error.value) is type(os_error.value), name
                assert ctypes_error.value.errno == os_error.value.errno, name
        with pytest.raises(BlockingIOError):
            splice(far.fileno(), write_end, 100, flags=zerocopy._FLAGS)
        near.sendall(b"abc")
        assert splice(far.fileno(), write_end, 100, None, None, zerocopy._FLAGS) == 3
        assert os.read(read_end, 100) == b"abc"
    finally:
        near.close()
        far.close()
        zerocopy.PipePool.discard((read_end, write_end))


# --------------------------------------------------------------------------
# The probe and the choice, made once.


def refusing(code):
    def splice(src, dst, count, offset_src=None, offset_dst=None, flags=0):
        raise OSError(code, os.strerror(code))
    return splice


@pytest.fixture
def debug_log():
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("nodepass")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_probe_accepts_the_kernels_splice_on_every_way_to_call_it():
    names = [name for name, _ in zerocopy.candidates()]
    assert "splice(2) from libc through ctypes" in names
    assert ("os.splice" in names) == hasattr(os, "splice")
    fds = open_fds()
    for name, splice in zerocopy.candidates():
        assert zerocopy.probe(splice) is None, name
    assert open_fds() == fds  # the probe closes its sockets and pipe


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM, errno.EINVAL])
def test_probe_reports_a_refusal(code):
    fds = open_fds()
    why_not = zerocopy.probe(refusing(code))
    assert why_not is not None and os.strerror(code) in why_not
    assert open_fds() == fds


def test_a_refused_splice_means_user_space_logged_at_debug(monkeypatch, debug_log):
    monkeypatch.setattr(zerocopy, "candidates",
                        lambda: [("os.splice", refusing(errno.EPERM)),
                                 ("ctypes", refusing(errno.ENOSYS))])
    assert zerocopy.choose() is None
    assert [r.levelno for r in debug_log] == [logging.DEBUG]
    message = debug_log[0].getMessage()
    assert "user space" in message and os.strerror(errno.ENOSYS) in message


def test_the_kernels_splice_is_chosen_logged_at_debug(debug_log):
    chosen = zerocopy.choose()
    if hasattr(os, "splice"):
        assert chosen is os.splice
        assert "os.splice" in debug_log[-1].getMessage()
    else:
        assert chosen is not None and chosen.__name__ == "splice"
        assert "ctypes" in debug_log[-1].getMessage()
    assert debug_log[-1].levelno == logging.DEBUG


def test_the_engine_is_chosen_once(monkeypatch):
    calls = []
    monkeypatch.setattr(zerocopy, "_chosen", zerocopy._UNDECIDED)
    monkeypatch.setattr(zerocopy, "choose", lambda: calls.append(1) or os.read)
    assert zerocopy.engine() is os.read
    assert zerocopy.engine() is os.read
    assert calls == [1]
