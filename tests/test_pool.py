"""The pools, in-process with gevent and real socket pairs (no network to mock)."""

import gevent
import gevent.event
import gevent.socket
import pytest

from nodepass_gevent.base.lifecycle import Supervisor
from nodepass_gevent.tunnel import pool as pool_module
from nodepass_gevent.tunnel.pool import ClientPool, ServerPool
from nodepass_gevent.wire.v1.protocol import new_connection_id

pytestmark = pytest.mark.matrix  # the core suite, run on every Python


class Dialer:
    """Hands out real connected socket pairs, each under a fresh id."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.peers, self.dialed = delay, [], 0

    def __call__(self):
        if self.delay:
            gevent.sleep(self.delay)
        ours, theirs = gevent.socket.socketpair()
        self.peers.append(theirs)
        self.dialed += 1
        return new_connection_id(), ours

    def close(self):
        for sock in self.peers:
            sock.close()


@pytest.fixture
def dialer():
    dialer = Dialer()
    yield dialer
    dialer.close()


@pytest.fixture
def supervisor():
    """The pools' owner: a test fails if a pool's manager crashed under it."""
    owner = Supervisor("Test")
    yield owner
    owner.kill()
    assert not owner.failed.is_set(), "a pool manager crashed"


def wait_for(predicate, timeout=5.0):
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.01)


def test_client_pool_fills_to_capacity_and_refills_at_once_when_used(dialer, supervisor):
    pool = ClientPool(dialer, min_capacity=8, max_capacity=64, supervisor=supervisor)
    pool.start()
    try:
        wait_for(lambda: pool.idle == 8)
        some_id = next(iter(pool._idle))
        assert pool.take(some_id) is not None
        wait_for(lambda: pool.idle == 8, timeout=0.5)  # no waiting for a 1 s round
        assert dialer.dialed == 9
    finally:
        pool.close()


def test_client_pool_keeps_refilling_while_each_connection_is_taken_as_it_arrives(supervisor):
    """A busy server hands each connection out as soon as it is pooled: a take
    right as a dial files its connection must not cost that dial's refill (the
    pool would shrink until the next 1 s round, every user waiting meanwhile)."""
    dialer = Dialer(delay=0.002)
    pool = ClientPool(dialer, min_capacity=4, max_capacity=4, supervisor=supervisor)
    pool.start()
    try:
        wait_for(lambda: pool.idle == 4)
        taken = 0
        with gevent.Timeout(0.8):  # within one capacity round (ADJUST_INTERVAL)
            while taken < 40:
                for connection_id in list(pool._idle):
                    taken += pool.take(connection_id) is not None
                gevent.sleep(0.001)
        wait_for(lambda: pool.idle == 4, timeout=0.3)
    finally:
        pool.close()
        dialer.close()


def test_capacity_rule_grows_above_80_percent_and_shrinks_below_20(dialer, supervisor):
    pool = ClientPool(dialer, min_capacity=10, max_capacity=12, supervisor=supervisor)
    # (connections that had to be created in a round, capacity after the round)
    rounds = [(9, 11),   # 90% of 10: grow by one
              (12, 12),  # grow again
              (12, 12),  # held at MAX_POOL_CAPACITY
              (1, 11),   # under 20%: shrink by one
              (0, 10),
              (0, 10),   # held at MIN_POOL_CAPACITY
              (5, 10)]   # between 20% and 80%: unchanged
    for created, capacity in rounds:
        pool._created = created
        pool._adjust()
        assert pool.capacity == capacity, (created, capacity)
    pool.close()


def test_launch_waits_for_an_id_still_being_read(dialer, supervisor):
    # The server may signal an id before the client has read it off the wire
    # (docs/protocol.md, "Signal before id"): the launch must wait for it.
    release = gevent.event.Event()

    def slow_dial():
        release.wait()
        return "0a0b0c0d", dialer()[1]

    pool = ClientPool(slow_dial, min_capacity=1, max_capacity=1, supervisor=supervisor)
    pool.start()
    try:
        gevent.sleep(0.05)  # the dial is under way, its id not read yet
        launch = gevent.spawn(pool.take, "0a0b0c0d")
        gevent.sleep(0.2)
        assert not launch.ready()
        release.set()
        assert launch.get(timeout=3) is not None
    finally:
        pool.close()


@pytest.fixture
def full_pool(dialer, supervisor, monkeypatch):
    """A started pool of 9, full; a launch for an unknown id gives up at once."""
    monkeypatch.setattr(pool_module, "ID_ARRIVAL_WAIT", 0.05)
    pool = ClientPool(dialer, min_capacity=9, max_capacity=9, supervisor=supervisor)
    pool.start()
    wait_for(lambda: pool.idle == 9)
    yield pool
    pool.close()


def assert_a_burst_of_misses_flushes(pool):
    stale = set(pool._idle)
    for _ in range(4):  # more than a third of capacity
        assert pool.take("00000000") is None
    wait_for(lambda: pool.idle == 9 and not (set(pool._idle) & stale))


def test_many_unknown_ids_flush_the_pool(full_pool):
    assert_a_burst_of_misses_flushes(full_pool)


def test_unknown_ids_spread_over_time_do_not_flush_the_pool(full_pool, dialer, monkeypatch):
    # A long-lived client meets a stray id now and then: that is no reason to
    # throw its pool away. Only a burst within MISS_WINDOW is.
    monkeypatch.setattr(pool_module, "MISS_WINDOW", 0.2)
    kept = set(full_pool._idle)
    for _ in range(8):  # twice the burst that flushes, one every window and a bit
        assert full_pool.take("00000000") is None
        gevent.sleep(0.25)
    assert set(full_pool._idle) == kept and dialer.dialed == 9
    assert_a_burst_of_misses_flushes(full_pool)  # the same misses at once still do


def test_server_pool_is_fifo_and_skips_dead_or_chatty_connections():
    pairs = [gevent.socket.socketpair() for _ in range(4)]
    pool = ServerPool(capacity=3)
    for index, (ours, _) in enumerate(pairs[:3]):
        assert pool.add("id%d" % index, ours)
    assert not pool.add("id3", pairs[3][0])  # full
    pairs[0][1].close()              # the client closed the oldest one
    pairs[1][1].sendall(b"garbage")  # the next one talks out of turn
    taken = pool.take(timeout=1)
    assert taken is not None and taken[0] == "id2"
    assert pool.take(timeout=0.1) is None
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_one_slow_dial_does_not_hold_up_the_refill(supervisor):
    """On a lossy link one dial in a batch may wait a second for a lost SYN: the
    others' connections are pooled as they come, and used ones replaced, while
    it is still under way (refilled per dial, not per batch)."""
    stuck = gevent.event.Event()
    fast = Dialer()
    dials = []

    def dial():
        dials.append(None)
        if len(dials) == 1:
            stuck.wait()  # the first dial hangs until the end of the test
        return fast()

    pool = ClientPool(dial, min_capacity=4, max_capacity=4, supervisor=supervisor)
    pool.start()
    try:
        wait_for(lambda: pool.idle == 3, timeout=1)
        for _ in range(5):  # use one, see it replaced, five times over
            assert pool.take(next(iter(pool._idle))) is not None
            wait_for(lambda: pool.idle == 3, timeout=0.5)
        assert len(dials) == 4 + 5
    finally:
        stuck.set()
        pool.close()
        fast.close()


def test_a_connection_whose_launch_gave_up_is_closed_not_pooled(supervisor, monkeypatch):
    """Its id came too late: the server gave it to a user already, so it must be
    closed (ending that user), never pooled for a later launch."""
    monkeypatch.setattr(pool_module, "ID_ARRIVAL_WAIT", 0.05)
    release = gevent.event.Event()
    late = Dialer()

    def slow_dial():
        release.wait()
        connection_id, sock = late()
        return ("0a0b0c0d" if late.dialed == 1 else connection_id), sock

    pool = ClientPool(slow_dial, min_capacity=1, max_capacity=1, supervisor=supervisor)
    pool.start()
    try:
        gevent.sleep(0.02)
        assert pool.take("0a0b0c0d") is None  # gave up waiting
        release.set()
        wait_for(lambda: pool.idle == 1)  # the next dial's connection is pooled...
        assert "0a0b0c0d" not in pool._idle  # ...the late one is not
        late.peers[0].settimeout(1)
        assert late.peers[0].recv(1) == b""  # closed: the server's side sees the end
    finally:
        release.set()
        pool.close()
        late.close()


def test_client_pool_says_what_its_figures_are_and_why_idle_can_exceed_the_target(
        dialer, supervisor):
    pool = ClientPool(dialer, min_capacity=2, max_capacity=8, supervisor=supervisor)
    pool.capacity = 4
    pool.start()
    try:
        wait_for(lambda: pool.idle == 4)
        assert pool.describe() == "idle=4 target=4 (adapts within 2..8)"
        pool._created = 0  # a quiet round: the target shrinks, the open connections stay
        pool._adjust()
        surplus = pool.idle - pool.capacity
        assert surplus >= 1
        assert pool.describe() == ("idle=4 target=%d (adapts within 2..8; %d over target after"
                                   " it shrank, kept until used)" % (pool.capacity, surplus))
    finally:
        pool.close()


def test_server_pool_says_the_client_fills_it_and_how_much_room_it_has():
    pool = ServerPool(capacity=1024)
    assert pool.describe() == "idle=0 (dialed in by the client; room for 1024)"
