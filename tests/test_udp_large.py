"""UDP datagrams of every size a socket carries.

Flows (the default: both sides ours, the server not pinned to udp=v1) carry every datagram whole: 65,507 bytes
over IPv4, 65,527 over IPv6. The v1.0 wire cannot (a v1.0 peer reads a
datagram or reply with one read of UDP_DATA_BUF_SIZE and passes on what it
got, cut), so there a larger one is dropped whole, on the side that finds
it: counted in /status and /metrics, and said in a rate-limited warning
with its size, the limit and the remedy. Never cut.
"""

import os
import re
import socket
import threading
import urllib.request

import pytest

from nodepass_gevent.base.stats import Stats
from nodepass_gevent.tunnel import udp
from reference_peer import ReferenceClient
from support import HOST, free_port, udp_exchange, wait_until
from test_proxy_protocol import has_ipv6_loopback

SIZES = (9000, 20000, 65507)  # all above UDP_DATA_BUF_SIZE's default, 8192
DROPPED = re.compile(r"UDP (datagram|reply) of \d+ bytes .* dropped whole")


class SizedReplies:
    """A UDP target in a thread: ``give N`` is answered with N bytes, anything
    else is echoed (so a datagram's size shows in its reply)."""

    def __init__(self, host: str = HOST) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)  # to see ``closed``: close() wakes no recvfrom()
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                datagram, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            asked = re.match(rb"give (\d+)$", datagram)
            try:
                self.sock.sendto(b"r" * int(asked.group(1)) if asked else datagram, peer)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def target():
    server = SizedReplies()
    yield server
    server.close()


def exchange(port: int, payload: bytes, host: str = HOST, timeout: float = 5.0) -> bytes:
    return udp_exchange(port, payload, host, timeout)


def no_reply(port: int, payload: bytes, host: str = HOST) -> bool:
    """True if nothing comes back within half a second (where a cut datagram
    or reply used to come back in milliseconds)."""
    try:
        exchange(port, payload, host, timeout=0.5)
    except socket.timeout:
        return True
    return False


def wait_for_udp(port: int, host: str = HOST) -> None:
    """Until a small datagram makes it there and back (the pool may be filling)."""
    def works() -> bool:
        try:
            return exchange(port, b"ready", host, timeout=1) == b"ready"
        except OSError:
            return False
    wait_until(works, 15, interval=0, what="UDP through the tunnel")


def user_gets_reply(user: socket.socket, address: tuple) -> bool:
    """One small datagram from this user socket there and back (one address:
    one flow); False if none came back (the pool may be filling)."""
    user.sendto(b"ready", address)
    try:
        return user.recvfrom(100)[0] == b"ready"
    except socket.timeout:
        return False


def dropped(process, key: str, count: int) -> dict:
    return process.wait_for_status(lambda status: status[key] == count, 10,
                                   what="%s == %d" % (key, count))


def udp_dropped_metric(process, role: str, direction: str) -> float:
    url = "http://%s:%d/metrics" % (HOST, process.status_port)
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode("utf-8")
    for line in text.splitlines():
        if (line.startswith("nodepass_udp_dropped_total{") and 'reason="too_large"' in line
                and 'role="%s"' % role in line and 'direction="%s"' % direction in line):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no nodepass_udp_dropped_total for %s %s in:\n%s"
                         % (role, direction, text))


def start_pair(nodepass, target_port: int, server_query: str = "", host: str = HOST,
               server_env=None, client_env=None, client: bool = True):
    """A server (its target port) and, if ``client``, our client to ``target_port``."""
    tunnel_port, port = free_port(host), free_port(host)
    bracketed = "[%s]" % host if ":" in host else host
    server = nodepass("server://%s:%d/%s:%d?log=debug%s" % (
        bracketed, tunnel_port, bracketed, port, server_query), server_env, status=True)
    if client:
        nodepass("client://%s:%d/%s:%d?log=debug" % (bracketed, tunnel_port, bracketed,
                                                    target_port), client_env, status=True)
    return server, tunnel_port, port


# -- flows: every datagram whole -------------------------------------------------------

def check_flow_carries_every_size(nodepass, target_port: int, host: str, sizes,
                                  tls: int = 0) -> None:
    server, _, port = start_pair(nodepass, target_port, "&udp=flow&tls=%d" % tls, host)
    server.wait_for_output("uses UDP flows", timeout=15)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as user:
        user.settimeout(1)
        wait_until(lambda: user_gets_reply(user, (host, port)), 15, interval=0,
                   what="UDP through the flow")
        user.settimeout(5)
        for size in sizes:
            payload = os.urandom(size)
            user.sendto(payload, (host, port))  # user -> service, echoed back
            assert user.recvfrom(65535)[0] == payload, size
            user.sendto(b"give %d" % size, (host, port))  # service -> user only
            assert user.recvfrom(65535)[0] == b"r" * size, size
    status = server.status()
    assert (status["udp_too_large_datagrams"], status["udp_too_large_replies"]) == (0, 0)
    assert server.output().count("udp flow user") == 1  # every size through one flow
    assert not DROPPED.search(server.output())


@pytest.mark.matrix
def test_flow_carries_large_datagrams_whole_both_ways(nodepass, target):
    check_flow_carries_every_size(nodepass, target.port, HOST, (1, 8192, 8193) + SIZES)


def test_flow_over_tls_carries_large_datagrams_whole_both_ways(nodepass, target):
    # TLS data connections take udplink's TLSFrameLink: records cut across reads.
    check_flow_carries_every_size(nodepass, target.port, HOST, SIZES, tls=1)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")
def test_flow_carries_the_largest_ipv6_datagram_whole(nodepass):
    target6 = SizedReplies("::1")
    try:
        check_flow_carries_every_size(nodepass, target6.port, "::1", (65527,))
    finally:
        target6.close()


# -- the v1.0 wire: dropped whole, counted, said once ----------------------------------

def test_v1_wire_drops_large_datagrams_whole_counts_and_logs_once(nodepass, target):
    server, _, port = start_pair(nodepass, target.port, "&udp=v1")
    wait_for_udp(port)
    assert exchange(port, b"x" * 8192) == b"x" * 8192  # the limit itself passes
    assert no_reply(port, os.urandom(9000))  # not cut to 8192 and passed on: dropped
    status = dropped(server, "udp_too_large_datagrams", 1)
    assert status["udp_datagrams"] == 2  # "ready" and the 8192 bytes; not the 9000
    lines = [line for line in server.output().splitlines() if DROPPED.search(line)]
    assert len(lines) == 1, lines
    assert re.search(r"WARN .*UDP datagram of 9000 bytes from 127\.0\.0\.1:\d+ dropped"
                     r" whole: above UDP_DATA_BUF_SIZE=8192.* udp=v1", lines[0]), lines[0]
    for size in SIZES[1:]:
        assert no_reply(port, os.urandom(size))
    dropped(server, "udp_too_large_datagrams", 3)
    assert udp_dropped_metric(server, "server", "to_target") == 3.0
    assert udp_dropped_metric(server, "server", "to_user") == 0.0
    # Said once: the next line waits out TOO_LARGE_LOG_INTERVAL (10 s).
    assert len([line for line in server.output().splitlines() if DROPPED.search(line)]) == 1
    assert exchange(port, b"small still passes") == b"small still passes"


def test_v1_wire_drops_a_large_reply_at_the_client(nodepass, target):
    server, tunnel_port, port = start_pair(nodepass, target.port, "&udp=v1", client=False)
    client = nodepass("client://%s:%d/%s:%d" % (HOST, tunnel_port, HOST, target.port),
                      status=True)
    wait_for_udp(port)
    assert no_reply(port, b"give 9000")
    dropped(client, "udp_too_large_replies", 1)
    assert re.search(r"WARN .*UDP reply of 9000 bytes from target 127\.0\.0\.1:%d dropped"
                     r" whole: above UDP_DATA_BUF_SIZE=8192" % target.port, client.output())
    assert udp_dropped_metric(client, "client", "to_user") == 1.0
    assert exchange(port, b"give 8192") == b"r" * 8192


def test_v1_wire_limits_differ_the_side_with_the_smaller_one_drops(nodepass, target):
    # A server allowing 16384 passes 9000 bytes; our client, at 8192, drops them
    # (a v1.0 client would cut them) and says that the server's limit is larger.
    server, tunnel_port, port = start_pair(nodepass, target.port, "&udp=v1", client=False,
                                           server_env={"UDP_DATA_BUF_SIZE": "16384"})
    client = nodepass("client://%s:%d/%s:%d" % (HOST, tunnel_port, HOST, target.port),
                      status=True)
    wait_for_udp(port)
    assert no_reply(port, os.urandom(9000))
    dropped(client, "udp_too_large_datagrams", 1)
    assert "UDP datagram of 9000 bytes for target" in client.output()
    assert "the server's is larger" in client.output()
    assert no_reply(port, os.urandom(20000))  # above the server's own limit: its drop
    dropped(server, "udp_too_large_datagrams", 1)
    assert client.status()["udp_too_large_datagrams"] == 1


def test_v1_reference_client_with_a_larger_buffer_has_its_reply_dropped(nodepass, target):
    # What a v1.0 (Go) client does: one read of its own UDP_DATA_BUF_SIZE, here
    # 65535, so it sends back a 9000-byte reply that our 8192 server drops whole.
    server, tunnel_port, port = start_pair(nodepass, target.port, client=False)
    wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
    client = ReferenceClient(tunnel_port, target.port, udp_buffer=65535)
    try:
        wait_for_udp(port)
        assert no_reply(port, b"give 9000")
        dropped(server, "udp_too_large_replies", 1)
        assert re.search(r"UDP reply of 9000 bytes for 127\.0\.0\.1:\d+ dropped whole: above"
                         r" UDP_DATA_BUF_SIZE=8192 here, the client's is larger",
                         server.output())
        assert exchange(port, b"give 100") == b"r" * 100
    finally:
        client.close()


# -- the rate-limited warning, in process ------------------------------------------------

@pytest.mark.matrix
def test_too_large_warning_first_at_once_then_once_per_interval_with_the_count():
    lines, now = [], [100.0]

    class Log:
        @staticmethod
        def warning(text, *args):
            lines.append(text % args)

    stats = Stats()
    drops = udp.TooLargeDrops("server", 8192, stats, Log, interval=10.0, clock=lambda: now[0])
    drops.datagram(9000, "192.0.2.1:5000")
    assert len(lines) == 1
    assert lines[0].startswith("Target: UDP datagram of 9000 bytes from 192.0.2.1:5000"
                               " dropped whole: above UDP_DATA_BUF_SIZE=8192")
    assert "raise UDP_DATA_BUF_SIZE on both sides" in lines[0] and "udp=v1" in lines[0]
    assert "more since" not in lines[0]
    for size in (9001, 9002, 9003):
        now[0] += 3.0
        drops.datagram(size, "192.0.2.1:5000")
    drops.reply(9004, "192.0.2.1:5000")  # the other direction has a line of its own
    assert len(lines) == 2 and "UDP reply of 9004 bytes" in lines[1]
    now[0] += 1.0  # 10 s after the first line
    drops.datagram(20000, "192.0.2.2:6000")
    assert len(lines) == 3
    assert "UDP datagram of 20000 bytes from 192.0.2.2:6000" in lines[2]
    assert lines[2].endswith(" (and 3 more since the last line)")
    assert (stats.udp_too_large_datagrams, stats.udp_too_large_replies) == (5, 1)
    assert stats.figures()["udp_too_large_datagrams"] == 5
    assert "udp too large: datagrams=5 replies=1" in stats.line("idle=0")
