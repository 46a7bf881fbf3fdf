"""The edge's pure parts (issue 13), table-style: PROXY headers, parameters, gates, buckets.

End-to-end tests with real consumers are test_proxy_protocol.py, test_access.py
and test_rate.py.
"""

import ipaddress

import pytest

from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import ConfigError, parse_url
from nodepass_gevent.edge import proxyheader
from nodepass_gevent.edge.access import Gate, RefusalLog
from nodepass_gevent.edge.ratelimit import TokenBucket

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")

# -- PROXY protocol headers: the spec's exact bytes ---------------------------------

PROXY_CASES = [
    # (version, source, destination, expected bytes)
    (1, ("192.0.2.10", 56324), ("203.0.113.5", 443),
     b"PROXY TCP4 192.0.2.10 203.0.113.5 56324 443\r\n"),
    (1, ("2001:db8::1", 1), ("2001:db8:0:0:0:0:0:2", 65535),
     b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"),
    # An IPv4 user on a dual-stack listener: written as the IPv4 it is.
    (1, ("::ffff:192.0.2.10", 5000, 0, 0), ("::ffff:127.0.0.1", 80, 0, 0),
     b"PROXY TCP4 192.0.2.10 127.0.0.1 5000 80\r\n"),
    (1, ("fe80::1%lo", 7, 0, 1), ("fe80::2%lo", 8, 0, 1),
     b"PROXY TCP6 fe80::1 fe80::2 7 8\r\n"),
    (1, None, ("127.0.0.1", 80), b"PROXY UNKNOWN\r\n"),
    (1, ("127.0.0.1", 5), ("::1", 80), b"PROXY UNKNOWN\r\n"),  # mixed families
    # HAProxy's own v2 output for 172.19.0.1:42578 -> 172.19.0.3:80.
    (2, ("172.19.0.1", 42578), ("172.19.0.3", 80),
     SIG + bytes.fromhex("2111000c" "ac130001" "ac130003" "a652" "0050")),
    (2, ("2001:db8::1", 443), ("::1", 8080),
     SIG + bytes.fromhex("21210024" "20010db8000000000000000000000001"
                         "00000000000000000000000000000001" "01bb" "1f90")),
    (2, ("::ffff:10.0.0.1", 1), ("::ffff:10.0.0.2", 2),
     SIG + bytes.fromhex("2111000c" "0a000001" "0a000002" "0001" "0002")),
    (2, None, None, SIG + bytes.fromhex("20000000")),                  # LOCAL, UNSPEC
    (2, ("10.0.0.1", 1), ("::1", 2), SIG + bytes.fromhex("20000000")),  # mixed families
]


@pytest.mark.parametrize("version, source, destination, expected", PROXY_CASES)
def test_proxy_header_bytes(version, source, destination, expected):
    assert proxyheader.encode(version, source, destination) == expected


def test_proxy_v1_longest_header_fits_the_spec_bound():
    longest = proxyheader.encode(1, ("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "fffe", 65535))
    assert len(longest) <= proxyheader.V1_MAX_LENGTH


def test_proxy_v2_length_field_counts_the_address_block():
    header = proxyheader.encode(2, ("1.2.3.4", 5), ("6.7.8.9", 10))
    assert int.from_bytes(header[14:16], "big") == len(header) - 16 == 12


def test_proxy_bad_version():
    with pytest.raises(ValueError):
        proxyheader.encode(3, ("1.2.3.4", 5), ("6.7.8.9", 10))


# -- URL parameters -----------------------------------------------------------------

def edge(query):
    return parse_url("server://127.0.0.1:10101/127.0.0.1:8080?" + query)


def test_edge_defaults_are_off():
    config = edge("log=info")
    assert (config.proxy_version, config.allow, config.deny, config.rate_mbit,
            config.per_user) == (0, (), (), None, None)
    assert config.edge_summary() == ""


GOOD_EDGE = [
    ("proxy=1", "proxy=1"),
    ("proxy=2", "proxy=2"),
    ("allow=127.0.0.1,10.0.0.0/8, ::1 ,[fd00::]/8", "allow=127.0.0.1,10.0.0.0/8,::1,fd00::/8"),
    ("deny=0.0.0.0/0,::/0", "deny=0.0.0.0/0,::/0"),
    ("rate=8", "rate=8Mbit/s"),
    ("rate=0.5", "rate=0.5Mbit/s"),
    ("per_user=3", "per_user=3"),
]


@pytest.mark.parametrize("query, summary", GOOD_EDGE)
def test_edge_good(query, summary):
    assert edge(query).edge_summary() == summary


BAD_EDGE = [
    ("proxy=0", "bad proxy value '0'"),
    ("proxy=v2", "bad proxy value 'v2'"),
    ("allow=", "allow= is empty"),
    ("deny=10.0.0.0/8,,::1", "an empty entry"),
    ("allow=10.0.0.1/8", "bad allow entry '10.0.0.1/8': host bits set"),
    ("allow=10.0.0.0/33", "bad allow entry '10.0.0.0/33'"),
    ("deny=::/129", "bad deny entry '::/129'"),
    ("deny=10.0.0.0/x", "bad deny entry '10.0.0.0/x'"),
    ("allow=1.2.3.4,example.com", "bad allow entry 'example.com'"),
    ("allow=010.0.0.1", "bad allow entry '010.0.0.1'"),
    ("allow=300.0.0.1", "bad allow entry '300.0.0.1'"),
    ("allow=fe80::1%25eth0", "bad allow entry 'fe80::1%eth0'"),
    ("rate=0", "bad rate value '0'"),
    ("rate=-1", "bad rate value '-1'"),
    ("rate=8M", "bad rate value '8M'"),
    ("rate=1e9", "bad rate value '1e9'"),
    ("per_user=0", "bad per_user value '0'"),
    ("per_user=2.5", "bad per_user value '2.5'"),
]


@pytest.mark.parametrize("query, message", BAD_EDGE)
def test_edge_bad(query, message):
    with pytest.raises(ConfigError) as caught:
        edge(query)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["proxy=1", "allow=::1", "deny=::1", "rate=1", "per_user=1"])
def test_edge_parameters_are_server_only(name):
    with pytest.raises(ConfigError, match="unknown URL parameter"):
        parse_url("client://127.0.0.1:10101/127.0.0.1:8080?" + name)


# -- the gate: allow/deny, per_user, the refusal log --------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_gate(allow="", deny="", per_user=None, clock=None, max_sources=4096):
    lines = []
    refusals = RefusalLog(lambda *args: lines.append(args[0] % args[1:]), interval=10,
                          max_sources=max_sources, clock=clock or Clock())
    networks = {name: edge("%s=%s" % (name, text)).__dict__[name] if text else ()
                for name, text in (("allow", allow), ("deny", deny))}
    stats = Stats()
    return Gate(networks["allow"], networks["deny"], per_user, stats, refusals), stats, lines


GATE_CASES = [
    # allow, deny, source, admitted
    ("", "", "203.0.113.9", True),
    ("127.0.0.0/8", "", "127.0.0.5", True),
    ("127.0.0.0/8", "", "10.0.0.1", False),
    ("127.0.0.0/8", "", "::ffff:127.0.0.5", True),   # dual-stack listener, IPv4 user
    ("127.0.0.0/8", "", "::1", False),
    ("::1", "", "::1", True),
    ("fd00::/8", "", "fd12:3456::1", True),
    ("", "10.0.0.0/8", "10.1.2.3", False),
    ("", "10.0.0.0/8", "::ffff:10.1.2.3", False),
    ("", "10.0.0.0/8", "11.0.0.1", True),
    ("10.0.0.0/8", "10.9.0.0/16", "10.9.1.1", False),  # deny wins
    ("10.0.0.0/8", "10.9.0.0/16", "10.8.1.1", True),
    ("", "::/0", "127.0.0.1", True),                   # an IPv6 rule does not catch IPv4
]


@pytest.mark.parametrize("allow, deny, source, admitted", GATE_CASES)
def test_gate_allow_deny(allow, deny, source, admitted):
    gate, stats, lines = make_gate(allow, deny)
    assert (gate.open_tcp((source, 1234)) is not None) == admitted
    assert gate.admits_datagram((source, 1234)) == admitted
    assert (stats.users_refused, stats.datagrams_refused) == ((0, 0) if admitted else (1, 1))
    assert len(lines) == (0 if admitted else 1)  # the datagram's refusal fell in the interval


def test_gate_per_user_counts_concurrent_connections_per_address():
    gate, stats, lines = make_gate(per_user=2)
    first, second = gate.open_tcp(("10.0.0.1", 1)), gate.open_tcp(("::ffff:10.0.0.1", 2))
    assert first is not None and second is not None
    assert gate.open_tcp(("10.0.0.1", 3)) is None
    assert gate.open_tcp(("10.0.0.2", 4)) is not None  # another address has its own count
    assert stats.users_over_cap == 1 and stats.users_refused == 0
    assert "per_user=2" in lines[0]
    gate.close_tcp(first)
    assert gate.open_count("10.0.0.1") == 1
    assert gate.open_tcp(("10.0.0.1", 5)) is not None
    assert gate.admits_datagram(("10.0.0.1", 6))  # UDP is not capped


def test_gate_forgets_addresses_with_no_connection():
    gate, _, _ = make_gate(per_user=1)
    for port in range(100):
        gate.close_tcp(gate.open_tcp(("10.0.%d.%d" % (port // 250, port % 250), port)))
    assert gate._open == {}


def test_refusal_log_once_per_source_per_interval():
    clock = Clock()
    gate, stats, lines = make_gate(allow="127.0.0.1", clock=clock)
    for _ in range(1000):
        gate.open_tcp(("10.0.0.1", 1))
    gate.open_tcp(("10.0.0.2", 1))
    assert stats.users_refused == 1001
    assert len(lines) == 2 and "10.0.0.1" in lines[0] and "10.0.0.2" in lines[1]
    clock.now += 10
    gate.open_tcp(("10.0.0.1", 1))
    assert len(lines) == 3 and "999 more" in lines[2]


def test_refusal_log_memory_is_bounded_in_a_flood_from_many_sources():
    clock = Clock()
    gate, stats, lines = make_gate(allow="127.0.0.1", clock=clock, max_sources=50)
    for index in range(5000):
        gate.admits_datagram(("10.%d.%d.1" % (index // 256, index % 256), 53))
    assert stats.datagrams_refused == 5000
    assert len(gate.refusals._sources) == 50
    assert len(lines) == 51 and "more than 50 sources" in lines[-1]
    clock.now += 11  # the old sources expire: new ones are logged again
    gate.admits_datagram(("192.0.2.1", 53))
    assert "192.0.2.1" in lines[-1]


# -- the token bucket ------------------------------------------------------------------

class Timers:
    """A fake schedule(delay, callback) for the bucket, run by the test's Clock."""

    def __init__(self, clock):
        self.clock, self.pending = clock, []

    def __call__(self, delay, callback):
        self.pending.append((self.clock.now + delay, callback))

    def run_due(self, advance):
        self.clock.now += advance
        due = [entry for entry in self.pending if entry[0] <= self.clock.now + 1e-9]
        self.pending = [entry for entry in self.pending if entry not in due]
        for _, callback in due:
            callback()


def bucket_and_timers(rate=1000000):
    clock = Clock()
    timers = Timers(clock)
    return TokenBucket(rate, clock=clock, schedule=timers), clock, timers


def test_bucket_starts_full_and_grants_at_most_its_burst():
    bucket, _, _ = bucket_and_timers()  # 8 Mbit/s
    assert bucket.burst == 100000
    assert bucket.take(10 ** 9) == 100000
    assert bucket.take(10 ** 9) == 0
    assert bucket.delay() == pytest.approx(bucket.min_grant / 1e6)


def test_bucket_refills_at_its_rate_and_never_beyond_the_burst():
    bucket, clock, _ = bucket_and_timers()
    bucket.take(10 ** 9)
    clock.now += 0.05
    assert bucket.take(10 ** 9) == pytest.approx(50000, abs=1)
    clock.now += 100
    assert bucket.take(10 ** 9) == bucket.burst


def test_bucket_small_remainders_wait_for_a_whole_grant():
    bucket, _, _ = bucket_and_timers()
    bucket.take(bucket.burst - 100)
    assert bucket.take(1000) == 0
    bucket.give_back(bucket.min_grant)
    assert bucket.take(10 ** 9) == pytest.approx(bucket.min_grant + 100, abs=1)


def test_bucket_queue_serves_waiters_in_turn_and_refuses_queue_jumpers():
    bucket, _, timers = bucket_and_timers()
    bucket.take(10 ** 9)
    grants = []
    for name in "abc":
        bucket.wait(10 ** 9, lambda grant, name=name: grants.append((name, grant)))
    assert len(timers.pending) == 1  # one timer per bucket, whatever the queue
    assert bucket.take(10 ** 9) == 0  # a newcomer may not jump the queue
    for _ in range(6):
        timers.run_due(bucket.min_grant / bucket.rate)
        if len(grants) == 3:
            break
    assert [name for name, _ in grants] == ["a", "b", "c"]
    assert all(grant <= 16384 for _, grant in grants)  # a turn is short
    assert bucket.waiting() == 0 and timers.pending == []


def test_bucket_round_robin_shares_the_rate():
    """Three always-busy readers: each re-queues after its turn; equal shares."""
    bucket, _, timers = bucket_and_timers()
    bucket.take(10 ** 9)
    moved = {name: 0 for name in "abc"}

    def reader(name):
        def on_grant(grant):
            moved[name] += grant
            bucket.wait(10 ** 9, on_grant)
        return on_grant
    for name in "abc":
        bucket.wait(10 ** 9, reader(name))
    for _ in range(3000):
        timers.run_due(0.001)
    total = sum(moved.values())
    assert total == pytest.approx(3 * 1e6, rel=0.02)  # 3 s at 1 MB/s
    assert max(moved.values()) - min(moved.values()) <= 16384


def test_bucket_cancel_leaves_the_queue():
    bucket, _, timers = bucket_and_timers()
    bucket.take(10 ** 9)
    grants = []
    bucket.wait(1000, grants.append)
    bucket.cancel(grants.append)
    timers.run_due(1.0)
    assert grants == [] and bucket.waiting() == 0


def test_bucket_datagrams_all_or_nothing():
    bucket, clock, _ = bucket_and_timers(125000)  # 1 Mbit/s
    assert bucket.burst == 65536
    sent = sum(bucket.try_spend(1400) for _ in range(100))
    assert sent == 65536 // 1400
    clock.now += 1.0
    assert sum(bucket.try_spend(1400) for _ in range(1000)) == 65536 // 1400  # burst-bound


def test_bucket_long_run_rate_is_exact():
    bucket, clock, _ = bucket_and_timers()
    moved = 0
    for _ in range(10000):  # a reader polling every millisecond for 10 s
        clock.now += 0.001
        moved += bucket.take(65536)
    assert moved == pytest.approx(10 * 1000000 + bucket.burst, rel=0.01)


def test_network_is_ipaddress():
    assert edge("allow=::1").allow == (ipaddress.ip_network("::1"),)
