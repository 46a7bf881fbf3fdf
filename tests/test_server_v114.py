"""Our server role on the NodePass v1.14 wire (wire=1.14), a real process, driven by the
reference v1.14 client (reference_peer_v114.py) and by our own client at wire=1.14:
a user at the server's target port reaches the client's target at tls 0, 1 and 2, over
TCP and UDP (one pool connection per user address), keyless and with a key; a client's
flush empties our pool; a wrong key is refused with 401 and logged (and a right one served
after it), the refusals are v1.14's bytes (badkey.curl.txt), and garbage on the tunnel
port is logged, not fatal.
"""

import re
import socket

import pytest

import loopback  # scripts/loopback.py, on the path by conftest.py
import v114_transcripts as captures
from reference_peer_v114 import ReferenceClient
from support import (FAST_ENV, HOST, EchoServer, NodepassProcess, free_port, make_test_ca,
                     tcp_exchange, udp_exchange, wait_until)
from nodepass_gevent.config import parse_url
from nodepass_gevent.tunnel.pool import ServerPool
from nodepass_gevent.wire.v114 import signals

FAST_PING = 1.0  # the reference client's ping (v1.14: 5 s); its verify follows one


def run_server(started, tls="0", key="", folder=None, env=None):
    """Our server at wire=1.14: (process, tunnel port, user port), once it listens.
    tls "2" takes a test CA's certificate, made in ``folder``."""
    tunnel, users = free_port(), free_port()
    files = ""
    if tls == "2":
        made = make_test_ca(str(folder))
        files = "&crt=%s&key=%s" % (made["crt"], made["key"])
    process = NodepassProcess("server://%s%s:%d/%s:%d?wire=1.14&tls=%s%s"
                              % (key + "@" if key else "", HOST, tunnel, HOST, users, tls,
                                 files), env=dict(FAST_ENV, **(env or {})))
    started(process)
    process.wait_for_output("v1.14 wire (one port)", timeout=10)
    return process, tunnel, users


def actions(peer):
    return {signal.action for signal in peer.received}


def exchange_raw(port, request, timeout=5.0):
    """Send ``request`` and half-close on a fresh connection to the tunnel port; all
    it gets back."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return loopback.read_to_eof(sock, 4096)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("tls", ["0", "1", "2"])
def test_a_user_of_our_server_reaches_the_reference_clients_target(started, tls, tmp_path):
    """TCP users, and UDP: one session (one pool connection, one udp signal) per user
    address, each datagram raw; keyless (the key is FNV-1a-32 of the port string)."""
    echo = EchoServer()
    started(echo)
    server, tunnel, users = run_server(started, tls, folder=tmp_path)
    client = ReferenceClient(tunnel, target=(HOST, echo.port), ping_interval=FAST_PING)
    started(client)
    assert client.ready.wait(10), client.failures
    payload = b"hello-v114-server " * 5000
    assert tcp_exchange(users, payload, timeout=10) == payload
    assert tcp_exchange(users, b"second") == b"second"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.settimeout(5)
        for datagram in (b"udp-one", b"udp-two " * 1000):
            user.sendto(datagram, (HOST, users))
            assert user.recvfrom(65535)[0] == datagram
    assert udp_exchange(users, b"another address") == b"another address"
    server.wait_for_output("(v1.14 wire, tls=%s" % tls, timeout=5)
    wait_until(lambda: {"ping", "pong", "tcp"} <= actions(client), 5, what="our signals")
    udp = [signal for signal in client.received if signal.action == "udp"]
    assert len(udp) == 2 and len({signal.id for signal in udp}) == 2  # one per address
    if tls != "0":  # ours on the newest idle connection; users waited for the client's
        assert "verify" in actions(client) and client.verified.is_set()
        server.wait_for_output("Server: TLS certificate fingerprint verified", timeout=5)
    assert client.statuses == [200] and client.config.tls == tls
    assert not (client.failures or client.refused_lines)
    assert "Traceback" not in server.output()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("tls", ["0", "1", "2"])
def test_our_client_and_our_server_speak_v114_to_each_other(started, tls, tmp_path):
    echo = EchoServer()
    started(echo)
    server, tunnel, users = run_server(started, tls, key="s3cret", folder=tmp_path)
    trust = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")} if tls == "2" else {}
    # tls=2 checks the Host name, "none" for an IP (as v1.14): a name the certificate has.
    client = NodepassProcess("client://s3cret@%s:%d/%s:%d?wire=1.14&tls=%s"
                             % ("localhost" if tls == "2" else HOST, tunnel, HOST, echo.port,
                                tls),
                             env=dict(FAST_ENV, **trust))
    started(client)
    client.wait_for_output("(v1.14 wire, tls=%s" % tls, timeout=10)
    payload = b"ours-to-ours " * 5000
    assert tcp_exchange(users, payload, timeout=10) == payload
    if tls != "0":
        server.wait_for_output("Server: TLS certificate fingerprint verified", timeout=5)
        client.wait_for_output("Client: TLS certificate fingerprint verified", timeout=5)
    for process in (server, client):
        assert "Traceback" not in process.output()


@pytest.mark.timeout(20)
def test_a_flush_from_the_client_empties_our_pool_and_users_are_served_after(started):
    echo = EchoServer()
    started(echo)
    server, tunnel, users = run_server(started)
    client = ReferenceClient(tunnel, target=(HOST, echo.port), ping_interval=FAST_PING)
    started(client)
    assert client.ready.wait(10), client.failures
    wait_until(lambda: len(client.pool) >= client.min_pool, 5, what="a full pool")
    client.pool.close()  # as v1.14's flushing side: its own idle ones first, then the signal
    client.send(signals.flush())
    server.wait_for_output("the client asked for a flush", timeout=5)
    assert tcp_exchange(users, b"after a flush") == b"after a flush"  # on a redialed one
    assert not client.failures and "Traceback" not in server.output()


@pytest.mark.timeout(20)
def test_a_wrong_key_is_refused_with_401_logged_and_a_right_one_served_after(started):
    echo = EchoServer()
    started(echo)
    server, tunnel, users = run_server(started)
    wrong = ReferenceClient(tunnel, target=(HOST, echo.port), key=b"wrong", retry_after=0.05)
    started(wrong)
    wait_until(lambda: len(wrong.statuses) >= 2, 5, what="two refusals")
    wrong.close()
    assert set(wrong.statuses) == {401} and not wrong.ready.is_set()
    server.wait_for_output("refused: 401 Unauthorized (wrong key", timeout=5)
    client = ReferenceClient(tunnel, target=(HOST, echo.port), ping_interval=FAST_PING)
    started(client)
    assert client.ready.wait(10), client.failures
    assert tcp_exchange(users, b"after a refusal") == b"after a refusal"


@pytest.mark.timeout(20)
def test_refusals_are_v114s_bytes_and_garbage_is_logged_not_fatal(started):
    if not captures.available("badkey.curl.txt"):
        pytest.skip("the v1.14 capture badkey.curl.txt is not at %s" % captures.TRANSCRIPTS)
    expected = captures.read_curl_replies("badkey.curl.txt")
    server, tunnel, users = run_server(started)
    for case, request in (("POST", b"POST / HTTP/1.1\r\nHost: none\r\nContent-Length: 0\r\n\r\n"),
                          ("wrong path", b"GET /nope HTTP/1.1\r\nHost: none\r\n\r\n"),
                          ("no auth", b"GET / HTTP/1.1\r\nHost: none\r\n\r\n")):
        reply = exchange_raw(tunnel, request)
        capture = expected[case]
        date = re.search(rb"Date: ([^\r]+)\r\n", capture).group(1)
        assert re.sub(rb"Date: [^\r]+\r\n", b"Date: " + date + b"\r\n", reply) == capture, case
    assert exchange_raw(tunnel, b"\x16\x03\x01 not http\r\n\r\n").startswith(
        b"HTTP/1.1 400 Bad Request\r\n")
    assert exchange_raw(tunnel, b"\x00\xffgarbage with no end") == b""  # no reply, a close
    server.wait_for_output("not a v1.14 handshake (400)", timeout=5)
    server.wait_for_output("closed after 21 bytes that are not a request head", timeout=5)
    server.wait_for_output("refused: 405 Method Not Allowed", timeout=5)
    echo = EchoServer()
    started(echo)
    client = ReferenceClient(tunnel, target=(HOST, echo.port), ping_interval=FAST_PING)
    started(client)
    assert client.ready.wait(10), client.failures
    assert tcp_exchange(users, b"still serving") == b"still serving"
    assert "Traceback" not in server.output()


@pytest.mark.matrix
@pytest.mark.timeout(5)
def test_the_server_takes_the_wire_parameter():
    assert parse_url("server://:1/h:2").wire == "auto"
    assert parse_url("server://:1/h:2?wire=1.14").wire == "1.14"


@pytest.mark.matrix
@pytest.mark.timeout(5)
def test_the_server_pool_gives_its_newest_and_a_named_connection():
    """What a v1.14 verify asks of tunnel/pool.ServerPool, beside its oldest-first take."""
    pool = ServerPool(4)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for name, (ours, _) in zip(("aa", "bb", "cc"), pairs):
            assert pool.add(name, ours)
        assert pool.newest_id() == "cc"
        assert pool.take_named("bb") is pairs[1][0]
        assert pool.take_named("bb") is None and pool.ids() == {"aa", "cc"}
        assert pool.take(0)[0] == "aa" and pool.newest_id() == "cc"
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
