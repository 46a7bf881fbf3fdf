"""wire=auto, the client side: a v1.0 server writes its first line at once, a v1.14
server waits for the GET, and our client tells them apart on the one connection.

Real processes against the reference peers (v1.0 and v1.14) and our own server; a
scripted listener for what no real server does on purpose (garbage first, a
v1.14 server replaced by a v1.0 one); the memory per server in-process.
"""

import logging
import socket
import threading
import time

import pytest

from reference_peer import ReferenceServer as ReferenceServerV1
from reference_peer_v114 import ReferenceServer as ReferenceServerV114
from support import HOST, echo_works, free_port, tcp_exchange, wait_until
from nodepass_gevent.config import WIRE_V1, WIRE_V114, Address
from nodepass_gevent.tunnel import wire_detect
from nodepass_gevent.wire.v114 import client_session, keys

V1_LINE = b"//1234#0\n"  # a tunnel signal; its data port is nobody's, it never matters here
GET = b"GET / HTTP/1.1\r\n"
AT_ONCE = 0.2  # well below the client's wait: the GET was not held back


class ScriptedServer:
    """A raw tunnel listener; the n-th accepted connection gets the n-th behaviour.
    ``seen``: per connection, (seconds from accept to the client's first bytes, or
    None, and those bytes)."""

    def __init__(self, *behaviours) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.seen = []
        self._thread = threading.Thread(target=self._run, args=(behaviours,), daemon=True)
        self._thread.start()

    def _run(self, behaviours) -> None:
        for behave in behaviours:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                behave(self, conn)

    def note_first_bytes(self, conn: socket.socket, timeout: float) -> None:
        accepted = time.monotonic()
        conn.settimeout(timeout)
        try:
            data = conn.recv(4096)
            self.seen.append((time.monotonic() - accepted, data))
        except socket.timeout:
            self.seen.append((None, b""))

    def close(self) -> None:
        self.listener.close()


def silent(server: ScriptedServer, conn: socket.socket) -> None:
    """A v1.14 server that never answers: note the GET (or nothing), then close."""
    server.note_first_bytes(conn, 1.0)


def answers_the_get_with_a_v1_line(server: ScriptedServer, conn: socket.socket) -> None:
    server.note_first_bytes(conn, 2.0)
    conn.sendall(V1_LINE)
    time.sleep(0.3)


def writes_at_once(first: bytes):
    def behave(server: ScriptedServer, conn: socket.socket) -> None:
        conn.sendall(first)
        time.sleep(1.0)
    return behave


@pytest.fixture
def scripted():
    """scripted(*behaviours): a ScriptedServer, closed after the test; also closes
    other servers handed to scripted.keep."""
    servers = []

    def start(*behaviours):
        return keep(ScriptedServer(*behaviours))

    def keep(server):
        servers.append(server)
        return server
    start.keep = keep
    yield start
    for server in servers:
        server.close()


def client_url(port: int, target: int = 9, query: str = "", key: str = "") -> str:
    return "client://%s%s:%d/%s:%d%s" % (key + "@" if key else "", HOST, port, HOST, target,
                                         "?" + query if query else "")


def wire_label(status_port: int) -> str:
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    with urllib.request.urlopen("http://%s:%d/metrics" % (HOST, status_port), timeout=5) as r:
        body = r.read().decode()
    return [s.labels["wire"] for family in text_string_to_metric_families(body)
            for s in family.samples if s.name == "nodepass_tunnel_info"][0]


# -- against real servers ----------------------------------------------------------

@pytest.mark.matrix
@pytest.mark.timeout(20)
def test_auto_finds_a_v1_reference_server_and_never_writes_to_it(nodepass, echo):
    server = ReferenceServerV1()
    try:
        client = nodepass(client_url(server.tunnel_port, echo.port), status=True)
        wait_until(lambda: echo_works(server.port), 10, what="traffic via the v1.0 server")
        client.wait_for_output("speaks the v1.0 wire (its first line came", timeout=5)
        status = client.wait_for_status(lambda s: s["state"] == "up", what="client up")
        assert status["wire"] == WIRE_V1 and wire_label(client.status_port) == WIRE_V1
        assert server.control_received == b""  # as a v1.0 client: not a byte on the tunnel
    finally:
        server.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("key", ["", "k3y"])  # a key: the first line is the challenge
def test_auto_finds_our_own_v1_server(nodepass, echo, key):
    tunnel_port, user_port = free_port(), free_port()
    nodepass("server://%s%s:%d/%s:%d" % (key + "@" if key else "", HOST, tunnel_port, HOST,
                                         user_port))
    client = nodepass(client_url(tunnel_port, echo.port, key=key))
    wait_until(lambda: echo_works(user_port), 10, what="traffic via our server")
    client.wait_for_output("speaks the v1.0 wire", timeout=5)
    assert "v1.14" not in client.output()


@pytest.mark.timeout(20)
def test_auto_finds_a_v114_reference_server(nodepass, echo, scripted):
    server = scripted.keep(ReferenceServerV114(ping_interval=1.0))
    client = nodepass(client_url(server.tunnel_port, echo.port), status=True)
    assert tcp_exchange(server.user_port, b"hello via v1.14", timeout=10) == b"hello via v1.14"
    client.wait_for_output("speaks the v1.14 wire (no first line within", timeout=5)
    status = client.wait_for_status(lambda s: s["state"] == "up", what="client up")
    assert status["wire"] == WIRE_V114 and wire_label(client.status_port) == WIRE_V114
    assert server.statuses == [200]  # one GET, the one sent after the wait


# -- what real servers do not do on purpose -----------------------------------------

@pytest.mark.timeout(20)
def test_a_remembered_v114_server_gets_the_get_at_once_and_a_mismatch_forgets_it(
        nodepass, scripted):
    server = scripted(silent, answers_the_get_with_a_v1_line, writes_at_once(V1_LINE))
    client = nodepass(client_url(server.port))
    client.wait_for_output("speaks the v1.0 wire", timeout=10)
    (waited, first_get), (at_once, second_get) = server.seen[:2]
    assert first_get.startswith(GET) and waited >= wire_detect.CLIENT_FIRST_LINE_WAIT * 0.9
    assert second_get.startswith(GET) and at_once < AT_ONCE  # remembered: no wait
    output = client.output()
    assert "answered the v1.14 handshake with b'//1234#0\\n', not HTTP" in output
    assert "no longer answers as a v1.14 server" in output
    assert "Traceback" not in output


@pytest.mark.timeout(20)
def test_pinned_wires_skip_finding_out(nodepass, scripted):
    v114 = scripted(silent)
    nodepass(client_url(v114.port, query="wire=1.14"))
    v1 = scripted(silent)
    pinned_v1 = nodepass(client_url(v1.port, query="wire=1.0"))
    wait_until(lambda: v114.seen and v1.seen, 10, what="both clients dialed")
    delay, request = v114.seen[0]
    assert request.startswith(GET) and delay < AT_ONCE
    assert v1.seen == [(None, b"")]  # a v1.0 client waits for the server, sends nothing
    assert "speaks the" not in pinned_v1.output()


@pytest.mark.timeout(20)
def test_a_server_that_sends_garbage_first_gets_one_clear_line(nodepass, scripted):
    server = scripted(writes_at_once(b"SSH-2.0-OpenSSH_9.6\r\n"))
    client = nodepass(client_url(server.port))
    client.wait_for_output("sent b'SSH-2.0-OpenSSH_9.6\\r\\n' first: not a NodePass v1.0"
                           " line (//port#tls), and a v1.14 server sends nothing first",
                           timeout=10)
    assert "Traceback" not in client.output()


# -- the pieces ----------------------------------------------------------------------

@pytest.mark.matrix
@pytest.mark.timeout(5)
@pytest.mark.parametrize("first, wire", [
    (b"//4821#1\n", WIRE_V1), (b"//0?auth=ab#0\n", WIRE_V1), (b"/", WIRE_V1),
    (b"", WIRE_V1),  # a close without a byte: how a v1.0 server refuses
    (b"HTTP/1.1 200 OK\r\n", None), (b"\x16\x03\x01", None), (b"\n", None),
])
def test_first_bytes_are_judged(first, wire):
    server = Address(HOST, 1)
    if wire is None:
        with pytest.raises(wire_detect.WireError, match="not a NodePass v1.0 line"):
            wire_detect.judge_first_bytes(first, server)
    else:
        assert wire_detect.judge_first_bytes(first, server) == wire


@pytest.mark.matrix
@pytest.mark.timeout(10)
def test_the_memory_skips_the_wait_for_a_known_v114_server_until_forgotten(scripted):
    assert wire_detect.CLIENT_FIRST_LINE_WAIT >= 2 * wire_detect.SERVER_GET_WAIT
    server = scripted(silent, silent, writes_at_once(V1_LINE))
    address, memory, log = Address(HOST, server.port), wire_detect.WireMemory(), logging
    timings = []
    for _ in range(2):
        started = time.monotonic()
        wire, sock = memory.open(address, log)
        timings.append(time.monotonic() - started)
        sock.close()
        assert wire == WIRE_V114
    assert timings[0] >= wire_detect.CLIENT_FIRST_LINE_WAIT and timings[1] < AT_ONCE
    memory.forget(address, log)
    wire, sock = memory.open(address, log)
    with sock:
        assert wire == WIRE_V1
        assert sock.recv(64) == V1_LINE  # peeked, not taken: the v1.0 reader gets it all


@pytest.mark.timeout(10)
def test_a_v1_line_in_reply_to_the_get_is_a_wire_mismatch(scripted):
    server = scripted(answers_the_get_with_a_v1_line)
    address = Address(HOST, server.port)
    started = time.monotonic()
    with pytest.raises(client_session.WireMismatch, match="pin wire=1.0"):
        client_session.open_tunnel(address, keys.derive_key(None, str(server.port)))
    assert time.monotonic() - started < 1.0  # told at once, not after the 5 s timeout
