"""Our client role on the NodePass v1.14 wire (wire=1.14), a real process, against the
reference v1.14 server (reference_peer_v114.py): a user of the server reaches our
client's target at tls 0 and 1, a wrong key is refused and said so, and the handshake
our client writes is the Go client's, byte for byte.
"""

import socket

import pytest

import v114_transcripts as captures
from reference_peer_v114 import ReferenceServer
from support import (FAST_ENV, HOST, EchoServer, NodepassProcess, run_nodepass, tcp_exchange,
                     wait_until)
from nodepass_gevent.config import ConfigError, parse_url
from nodepass_gevent.wire.v114 import handshake, signals

FAST_PING = 1.0  # the reference server's ping (v1.14: 5 s); its verify follows one


def run_client(started, url):
    process = NodepassProcess(url, env=FAST_ENV)
    started(process)
    return process


@pytest.mark.timeout(20)
@pytest.mark.parametrize("tls", ["0", "1"])
def test_a_user_of_the_v114_server_reaches_our_clients_target(started, tls):
    echo = EchoServer()
    started(echo)
    server = ReferenceServer(tls=tls, ping_interval=FAST_PING)
    started(server)
    client = run_client(started, "client://%s:%d/%s:%d?wire=1.14"
                        % (HOST, server.tunnel_port, HOST, echo.port))
    payload = b"hello-v114-client " * 5000
    assert tcp_exchange(server.user_port, payload, timeout=10) == payload
    assert tcp_exchange(server.user_port, b"second") == b"second"
    client.wait_for_output("(v1.14 wire, tls=%s" % tls, timeout=5)
    wait_until(lambda: {"ping", "pong"} <= {s.action for s in server.received}, 5,
               what="our ping and pong")
    if tls == "1":  # ours went first (users wait for it); the server's follows its ping
        assert "verify" in {s.action for s in server.received}
        client.wait_for_output("TLS certificate fingerprint verified", timeout=5)
    assert server.statuses == [200]
    assert not (server.failures or server.refused_lines)


@pytest.mark.timeout(20)
def test_a_wrong_key_is_refused_and_logged(started):
    server = ReferenceServer(ping_interval=FAST_PING)
    started(server)
    client = run_client(started, "client://wrong@%s:%d/%s:9?wire=1.14"
                        % (HOST, server.tunnel_port, HOST))
    client.wait_for_output("the server refused the key (401 Unauthorized)", timeout=5)
    wait_until(lambda: len(server.statuses) >= 2, 5, what="a second try after the pause")
    assert set(server.statuses) == {handshake.UNAUTHORIZED}
    assert "Traceback" not in client.output()


@pytest.mark.timeout(20)
def test_our_handshake_is_the_go_clients_request_byte_for_byte(started):
    """Key e68be2b4 (the capture's, FNV of port 10101) given as KEY@: the same bearer."""
    if not captures.available("tls0.txt"):
        pytest.skip("the v1.14 capture tls0.txt is not at %s" % captures.TRANSCRIPTS)
    expected = captures.read_relay_dump("tls0.txt").connections[1].stream(
        captures.CLIENT_TO_SERVER)
    listener = socket.socket()
    started(listener)
    listener.bind((HOST, 0))
    listener.listen(1)
    listener.settimeout(10)
    run_client(started, "client://e68be2b4@%s:%d/%s:9?wire=1.14"
               % (HOST, listener.getsockname()[1], HOST))
    conn, _ = listener.accept()
    started(conn)
    conn.settimeout(5)
    request = b""
    while handshake.head_end(request) is None and len(request) < handshake.MAX_HEAD:
        chunk = conn.recv(4096)
        if not chunk:
            break
        request += chunk
    assert request == expected
    assert request.startswith(b"GET / HTTP/1.1\r\nHost: none\r\n")


@pytest.mark.matrix
@pytest.mark.timeout(5)
def test_the_wire_parameter_is_parsed_and_checked():
    assert parse_url("client://h:1/h:2").wire == "auto"  # found out per server
    assert parse_url("client://h:1/h:2?wire=1.0").wire == "1.0"
    assert parse_url("client://h:1/h:2?wire=1.14").wire == "1.14"
    with pytest.raises(ConfigError, match="bad wire value '2'"):
        parse_url("client://h:1/h:2?wire=2")


@pytest.mark.timeout(10)
def test_check_shows_the_wire_and_a_bad_one_is_one_line():
    good = run_nodepass(["--check", "client://127.0.0.1:1/127.0.0.1:2?wire=1.14"])
    assert good.returncode == 0 and " auth=off wire=1.14\n" in good.stdout
    bad = run_nodepass(["--check", "client://127.0.0.1:1/127.0.0.1:2?wire=1.4"])
    assert bad.returncode != 0 and "bad wire value '1.4'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(20)
def test_bad_lines_are_skipped_unknown_actions_ignored_and_flush_empties_the_pool(started):
    echo = EchoServer()
    started(echo)
    server = ReferenceServer(ping_interval=FAST_PING)
    started(server)
    client = run_client(started, "client://%s:%d/%s:%d?wire=1.14"
                        % (HOST, server.tunnel_port, HOST, echo.port))
    client.wait_for_output("(v1.14 wire, tls=0", timeout=5)
    wait_until(lambda: len(server.pool) >= 4, 5, what="pooled connections")
    with server.write_lock:
        server.control.sendall(b"not base64!\n" + signals.encode_signal(
            signals.Signal("reboot"), server.key))
    server.send(signals.flush())
    client.wait_for_output("control line skipped: control line is not base64", timeout=5)
    client.wait_for_output("asked for a flush", timeout=5)
    server.pool.close()  # the Go sender flushes its own idle connections too
    assert tcp_exchange(server.user_port, b"still here") == b"still here"
    assert "reboot" not in client.output() and "Traceback" not in client.output()
