"""allow=/deny=/per_user= on a real server: refused users cost nothing and flood no log.

Our server with the v1.0 reference client (tests/reference_peer.py) in front
of the echo target: the reference client records every line the server
writes on the tunnel, so "no signal sent for a refused user" is checked on
the wire. Users come from 127.0.0.1, 127.0.0.2, ... (all loopback) and ::1.
"""

import re
import socket
import time

import pytest

from reference_peer import LAUNCH_SIGNAL, ReferenceClient
from support import HOST, EchoServer, free_port, run_nodepass, wait_until
from test_proxy_protocol import free_port6, has_ipv6_loopback

REFUSED = "127.0.0.2"


@pytest.fixture(scope="module")
def echo():
    """One echo target for the module (the per-test one costs a second at teardown)."""
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def guarded(nodepass, echo):
    """``guarded(query, host=HOST)`` -> (server process, port, reference client)."""
    clients = []

    def start(query: str, host: str = HOST):
        tunnel_port = free_port()
        port = free_port6() if ":" in host else free_port()
        target = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        server = nodepass("server://%s:%d/%s?log=debug&%s" % (HOST, tunnel_port, target, query))
        wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
        client = ReferenceClient(tunnel_port, echo.port)
        clients.append(client)
        # Data connections pooled: from here a refusal can only be the gate's.
        wait_until(lambda: len(client.pool) >= 2, 15, what="the reference client's pool")
        return server, port, client
    yield start
    for client in clients:
        client.close()


def launches(client) -> int:
    return sum(1 for line in client.lines if LAUNCH_SIGNAL.match(line))


def tcp_user(port: int, source: str, host: str = HOST, payload: bytes = b"hello"):
    """Connect from ``source`` and echo ``payload``; the bytes back, or None if refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        try:
            sock.connect((host, port))  # a reset may even beat connect()'s return
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
        return received or None


def udp_user(port: int, source: str, host: str = HOST, timeout: float = 0.5):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.sendto(b"datagram", (host, port))
        try:
            return sock.recvfrom(65535)[0]
        except socket.timeout:
            return None


def test_allow_admits_listed_tcp_users_and_refuses_others_at_once(guarded):
    server, port, client = guarded("allow=127.0.0.1,10.0.0.0/8")
    before = launches(client)
    assert tcp_user(port, HOST) == b"hello"
    started = time.monotonic()
    for _ in range(20):
        assert tcp_user(port, REFUSED) is None
    assert time.monotonic() - started < 3  # closed at once, not after POOL_WAIT
    time.sleep(0.3)
    assert launches(client) == before + 1  # no launch signal for any refused user
    server.wait_for_output("refused tcp=20 ", timeout=5)
    assert server.output().count("Target: refused %s" % REFUSED) == 1  # logged once
    assert tcp_user(port, HOST) == b"hello"


def test_deny_drops_udp_datagrams_and_refuses_tcp(guarded):
    server, port, client = guarded("deny=127.0.0.2/32")
    assert udp_user(port, HOST, timeout=5) == b"datagram"
    before = launches(client)
    for _ in range(5):
        assert udp_user(port, REFUSED, timeout=0.1) is None
    assert tcp_user(port, REFUSED) is None
    assert tcp_user(port, "127.0.0.3") == b"hello"  # not in deny
    time.sleep(0.3)
    assert launches(client) == before + 1
    server.wait_for_output("refused tcp=1 over_cap=0 udp=5 ", timeout=5)
    assert server.output().count("Target: refused %s" % REFUSED) == 1


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")
def test_ipv6_allow_and_deny(guarded):
    server, port, _ = guarded("allow=::1/128", host="::1")
    assert tcp_user(port, "::1", host="::1") == b"hello"
    assert udp_user(port, "::1", host="::1", timeout=5) == b"datagram"
    server, port, _ = guarded("deny=::/0", host="::1")
    assert tcp_user(port, "::1", host="::1") is None
    assert udp_user(port, "::1", host="::1") is None
    server.wait_for_output("Target: refused ::1", timeout=5)


def test_per_user_caps_concurrent_connections_from_one_address(guarded):
    server, port, _ = guarded("per_user=2")
    held = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind((REFUSED, 0))
        sock.connect((HOST, port))
        sock.sendall(b"held")
        sock.settimeout(5)
        assert sock.recv(4) == b"held"  # through the tunnel: counted as open
        held.append(sock)
    try:
        for _ in range(5):
            assert tcp_user(port, REFUSED) is None  # a third from the same address
        assert tcp_user(port, "127.0.0.3") == b"hello"  # another address: its own count
        held.pop().close()
        wait_until(lambda: tcp_user(port, REFUSED) == b"hello", 5, what="a place freed")
    finally:
        for sock in held:
            sock.close()
    server.wait_for_output("over_cap=", timeout=5)
    # Five refusals (one more if the retry above raced the close): one log line.
    counts = [int(n) for n in re.findall(r"over_cap=(\d+)", server.output())]
    assert 5 <= counts[-1] <= 7
    assert server.output().count("per_user=2)") == 1
    assert ("Target: refused %s: 2 TCP connections from this address are open already, the"
            " most allowed (per_user=2)" % REFUSED) in server.output()


@pytest.mark.parametrize("query, entry", [
    ("allow=127.0.0.1,10.0.0.1/8", "10.0.0.1/8"),
    ("deny=fe80::/129", "fe80::/129"),
    ("allow=localhost", "localhost"),
])
def test_bad_list_is_a_startup_error_naming_the_entry(query, entry):
    url = "server://%s:%d/%s:%d?%s" % (HOST, free_port(), HOST, free_port(), query)
    # --check, and (for one of them: a process start costs a second) a real start.
    for args in (["--check", url], [url])[:2 if "10.0.0.1/8" in query else 1]:
        result = run_nodepass(args, timeout=20)
        assert result.returncode == 2
        assert entry in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr
