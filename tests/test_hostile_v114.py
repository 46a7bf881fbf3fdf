"""Our client on the v1.14 wire (wire=1.14), a real process, against a hostile v1.14 server.

The client dials one port, ``TunnelPort``. Each connection to it goes to the
next of the hostile plays queued there (a function that writes what a broken
or malicious server would on the handshake), and once they run out through a
relay to a good server behind it: the reference v1.14 server
(reference_peer_v114.py). The attacks on the control channel are lines that
reference server writes where it should write signals. After every attack the
client process is alive, has said what happened in one line (no traceback), has
not buffered what it was flooded with, and serves a user again through the
good server:

    client --> TunnelPort (plays, in order) --relay--> ReferenceServer (good)
                                                          ^ users
"""

import socket
import threading
import time
from typing import Callable, List, Optional

import pytest

from reference_peer import HOST, _listener, _relay, _thread
from reference_peer_v114 import ReferenceServer
from support import FAST_ENV, EchoServer, NodepassProcess, tcp_exchange, wait_until
from nodepass_gevent.wire.v114 import handshake, keys, signals

FAST_PING = 1.0       # the good server's ping (v1.14: 5 s); its own verify follows one
FLOOD = 32 * 1024 * 1024  # what an endless header or line offers: far past any bound
RSS_SLACK_KB = 8 * 1024   # the client may grow by this much while flooded, not by FLOOD
OPEN = "(v1.14 wire, tls=%s"
CLIENT_ENV = dict(FAST_ENV, SERVICE_COOLDOWN="100ms")  # eight refusals in a row take 1 s

Play = Callable[[socket.socket], None]


class TunnelPort:
    """The port the client dials: hostile plays first, then a good server behind it.

    A server added by good_server() takes over at the next handshake (a GET), not
    at once: until then the pool connections of the session still running go on
    to the server it runs with, as they would if one server replaced another.
    """

    def __init__(self) -> None:
        self.listener = _listener()
        self.port = self.listener.getsockname()[1]
        self.key = keys.derive_key(None, str(self.port))  # the key a keyless client uses
        self.plays = []  # type: List[Play]
        self.servers = []  # type: List[ReferenceServer]  (the last one takes over)
        self._behind = None  # type: Optional[ReferenceServer]
        self._lock = threading.Lock()
        _thread(self._accept_forever)

    def good_server(self, tls: str = "0", ping_interval: float = FAST_PING) -> ReferenceServer:
        server = ReferenceServer(tls=tls, key=self.key, ping_interval=ping_interval)
        self.servers.append(server)
        return server

    def close(self) -> None:
        self.listener.close()
        for server in self.servers:
            close_server(server)

    def _accept_forever(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            _thread(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            play = self.plays.pop(0) if self.plays else None
        if play is not None:
            with conn:
                return play(conn)
        if self.servers and self._behind is not self.servers[-1] and is_handshake(conn):
            self._behind = self.servers[-1]
        if self._behind is None:
            return conn.close()
        _relay(conn, socket.create_connection((HOST, self._behind.tunnel_port), timeout=5))


def is_handshake(conn: socket.socket) -> bool:
    """Whether the client's first bytes are its GET (a pool connection waits silently
    for its id at tls=0 and starts TLS at tls=1)."""
    conn.settimeout(0.5)
    try:
        return conn.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL) == b"GET "
    except OSError:
        return False
    finally:
        conn.settimeout(None)


def close_server(server: ReferenceServer) -> None:
    """close() leaves its tunnel listener open (the one the relay dials): close it too."""
    server.close()
    server.tunnel.close()


@pytest.fixture
def tunnel_port():
    port = TunnelPort()
    yield port
    port.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def clients():
    started = []

    def start(port: TunnelPort, echo: EchoServer) -> NodepassProcess:
        # log=debug: an ignored unknown action is a debug line.
        process = NodepassProcess("client://%s:%d/%s:%d?wire=1.14&log=debug"
                                  % (HOST, port.port, HOST, echo.port), env=CLIENT_ENV)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop_quietly()


# -- what a hostile server writes ----------------------------------------------------


def read_request(conn: socket.socket) -> bytes:
    """The client's GET, so that what follows is its reply."""
    conn.settimeout(5)
    request = b""
    while handshake.head_end(request) is None:
        chunk = conn.recv(4096)
        if not chunk:
            break
        request += chunk
    return request


def replying(reply: bytes) -> Play:
    def play(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(reply)
    return play


def flooding(head: bytes, filler: bytes, sent: List[int]) -> Play:
    """``head``, then ``filler`` over and over up to FLOOD bytes, until the client hangs up;
    ``sent`` gets how many bytes went out."""
    def play(conn: socket.socket) -> None:
        read_request(conn)
        sent.append(send_flood(conn, head, filler))
    return play


def send_flood(conn: socket.socket, head: bytes, filler: bytes) -> int:
    chunk = filler * (65536 // len(filler))
    total = 0
    try:
        conn.sendall(head)
        while total < FLOOD:
            conn.sendall(chunk)
            total += len(chunk)
    except OSError:
        pass  # the client cut it off: what this attack wants to see
    return total


def dribbling(reply: bytes, gap: float) -> Play:
    """A byte every ``gap`` seconds: each read gets something, the reply never ends."""
    def play(conn: socket.socket) -> None:
        read_request(conn)
        try:
            for at in range(len(reply)):
                conn.sendall(reply[at:at + 1])
                time.sleep(gap)
        except OSError:
            pass  # the client gave up on it
    return play


def ok_reply(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body


UNENDED = b"\x16\x03\x01\x00\xa5garbage without an end\xff"
SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n"
GOOD_BODY = handshake.TunnelConfig("-", 4, "0").body()


def line_of(document: bytes, key: bytes) -> bytes:
    """A control line carrying any bytes as its JSON, XOR-ed and base64 as v1.14 does."""
    import base64
    return base64.b64encode(signals.xor(document, key)) + signals.LINE_END


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def assert_one_line_each(client: NodepassProcess, messages: List[str]) -> None:
    """Each message logged, on one line that is all of it, and no traceback anywhere."""
    output = client.output()
    for message in messages:
        assert message in output, "%r not logged:\n%s" % (message, client.tail(30))
    assert "Traceback" not in output, output
    assert client.alive()


def assert_served(server: ReferenceServer, payload: bytes = b"served again") -> None:
    got = tcp_exchange(server.user_port, payload, timeout=10)
    assert got == payload, (server.failures, server.refused_lines, server.received[-5:])


# -- the handshake ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_garbage_wrong_status_bad_json_and_endless_headers_on_the_handshake(
        tunnel_port, echo, clients):
    cut_off = []  # bytes of the endless head that went out before the client hung up
    tunnel_port.plays = [
        replying(SSH_BANNER),
        replying(UNENDED),  # then the close
        replying(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
        replying(ok_reply(b"{not json")),
        replying(ok_reply(b'{"flow":"-","max":-3,"tls":"0","type":"0"}')),
        replying(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
        flooding(b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"a" * 100 + b"\r\n", cut_off),
        flooding(b"HTTP/1.1 200 OK\r\nX-Endless: ", b"b", cut_off),
    ]
    server = tunnel_port.good_server()
    client = clients(tunnel_port, echo)
    client.wait_for_output(OPEN % "0", timeout=20)
    assert_served(server)
    bad = "Client: tunnel to %s:%d: " % (HOST, tunnel_port.port)
    assert_one_line_each(client, [
        # Bytes that cannot start "HTTP/" are a wire mismatch, said before the head ends.
        bad + "the server answered the v1.14 handshake with %r, not HTTP" % SSH_BANNER,
        bad + "the server answered the v1.14 handshake with %r, not HTTP" % UNENDED,
        bad + "handshake refused with 500 Internal Server Error",
        bad + "handshake reply body is not JSON: b'{not json'",
        bad + "handshake reply max -3 is not a positive integer",
        bad + "bad handshake reply: reply Content-Length '99999999999' is not 0 to 4096",
        bad + "bad handshake reply: reply head longer than 8192 bytes",
    ])
    assert client.output().count("reply head longer than 8192 bytes") == 2
    assert len(cut_off) == 2 and all(sent < FLOOD for sent in cut_off), cut_off


@pytest.mark.timeout(30)
def test_a_handshake_reply_dribbled_byte_by_byte_is_given_up_on_in_time(
        tunnel_port, echo, clients):
    """Every read gets a byte, so a timeout per read never fires: the reply as a whole
    has HANDSHAKE_TIMEOUT (5 s), as v1.14's handshake has."""
    tunnel_port.plays = [dribbling(ok_reply(GOOD_BODY), 0.3)]  # 27 s for the whole reply
    server = tunnel_port.good_server()
    client = clients(tunnel_port, echo)
    started = time.monotonic()
    client.wait_for_output("no complete handshake reply within 5s", timeout=10)
    client.wait_for_output(OPEN % "0", timeout=10)
    assert time.monotonic() - started < 9
    assert_served(server)
    assert_one_line_each(client, [])


# -- the control channel -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_bad_control_lines_are_skipped_and_an_endless_one_ends_the_session(
        tunnel_port, echo, clients):
    first = tunnel_port.good_server()
    client = clients(tunnel_port, echo)
    client.wait_for_output(OPEN % "0", timeout=10)
    wait_until(lambda: len(first.pool) >= 2, 5, what="pooled connections")
    key = first.key
    with first.write_lock:
        first.control.sendall(b"not base64!\n")
        first.control.sendall(line_of(b'{"action":"tcp","id":', key))  # cut short
        first.control.sendall(line_of(b'["tcp"]', key))
        first.control.sendall(signals.encode_signal(signals.Signal("reboot"), key))
        first.control.sendall(signals.encode_signal(signals.tcp("10.0.0.1:1", "deadbeef"), key))
        for byte in signals.encode_signal(signals.Signal("dribbled"), key):
            first.control.sendall(bytes([byte]))
            time.sleep(0.005)
    client.wait_for_output("unknown action 'dribbled'", timeout=5)  # after all the others
    client.wait_for_output("Pool: no data connection with id deadbeef", timeout=8)
    assert_served(first, b"the session lives on")
    assert_one_line_each(client, [
        "Client: control line skipped: control line is not base64: b'not base64!",
        "Client: control line skipped: control line is not JSON under our key",
        "Client: control line skipped: control signal is not a JSON object",
        "Client: control signal ignored: unknown action 'reboot'",
    ])

    second = tunnel_port.good_server()  # where the client comes back to
    baseline = rss_kb(client.pid)
    with first.write_lock:
        sent = send_flood(first.control, b"", b"A" * 1024)  # and never a newline
    client.wait_for_output("control channel: control line longer than 4096 bytes", timeout=5)
    close_server(first)
    wait_until(lambda: client.output().count(OPEN % "0") == 2, 10, what="the session again")
    assert_served(second)
    assert sent < FLOOD, "the client read all %d bytes of the endless line" % sent
    assert rss_kb(client.pid) - baseline < RSS_SLACK_KB
    assert_one_line_each(client, [])


@pytest.mark.timeout(30)
def test_a_verify_with_a_wrong_fingerprint_ends_the_session(tunnel_port, echo, clients):
    """tls=1: the server's verify names a pooled connection with a fingerprint that is
    not its certificate's. (A verify naming an id that never came ends it too, after
    pool.ID_ARRIVAL_WAIT: 5 s this suite cannot spend; a tcp signal's unknown id is
    tested above.)"""
    wrong = keys.certificate_fingerprint(b"not the server's certificate")
    first = tunnel_port.good_server(tls="1", ping_interval=5.0)  # its own verify: later
    client = clients(tunnel_port, echo)
    client.wait_for_output(OPEN % "1", timeout=10)
    name, conn = first.pool.newest()
    assert conn is not None, "no pooled connection"  # still open: the client has it idle
    second = tunnel_port.good_server(tls="1")
    first.send(signals.verify(name, wrong))
    client.wait_for_output("TLS certificate fingerprint mismatch on pool connection %s"
                           " (the server says %s, we expect %s)"
                           % (name, wrong, first.fingerprint), timeout=5)
    close_server(first)
    wait_until(lambda: client.output().count(OPEN % "1") == 2, 10, what="the session again")
    assert_served(second)  # it waits for our verify, which the client sends at once

    client.wait_for_output("TLS certificate fingerprint verified", timeout=5)  # second's
    assert_one_line_each(client, [])
    assert not second.failures
