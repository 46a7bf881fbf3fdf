"""Shared-key authentication and the minimum TLS mode, end to end and on the wire."""

import os
import socket
import time

import pytest

from nodepass_gevent.wire.v1 import auth, protocol
from support import HOST, echo_works, free_port, tcp_exchange, wait_until

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

KEY = "correct horse battery staple"


def start_pair(nodepass, echo, server_key, client_key, tls=0, client_tls=0, env=None):
    tunnel_port, port = free_port(), free_port()
    key_part = lambda key: "" if key is None else key.replace(" ", "%20") + "@"  # noqa: E731
    server = nodepass("server://%s%s:%d/%s:%d?log=debug&tls=%d"
                      % (key_part(server_key), HOST, tunnel_port, HOST, port, tls), env,
                      status=True)
    server.wait_for_status(lambda status: status["data_port"], what="server start")
    client = nodepass("client://%s%s:%d/%s:%d?log=debug&tls=%d"
                      % (key_part(client_key), HOST, tunnel_port, HOST, echo.port, client_tls),
                      env)
    return server, client, tunnel_port, port


@pytest.mark.parametrize("tls", [0, 1])
def test_same_key_tunnel_works(nodepass, echo, tls):
    server, client, _, port = start_pair(nodepass, echo, KEY, KEY, tls=tls)
    wait_until(lambda: echo_works(port), 15, what="authenticated traffic")
    payload = os.urandom(1024 * 1024)
    assert tcp_exchange(port, payload) == payload
    assert "(authenticated)" in server.output()
    assert "authenticated" in client.output()


def test_key_never_appears_in_logs_or_process_title(nodepass, echo):
    server, client, _, port = start_pair(nodepass, echo, KEY, KEY)
    wait_until(lambda: echo_works(port), 15, what="authenticated traffic")
    for process in (server, client):
        with open("/proc/%d/cmdline" % process.pid, "rb") as cmdline:
            title = cmdline.read().replace(b"\0", b" ")
        assert b"horse" not in title and b"nodepass_gevent" in title
        assert "horse" not in process.output()


@pytest.mark.parametrize("client_key", ["wrong key", None])
def test_client_without_the_key_is_refused_clearly_on_both_sides(nodepass, echo, client_key):
    server, client, _, port = start_pair(nodepass, echo, KEY, client_key)
    expected = "rejected our shared key" if client_key else "requires a shared key"
    client.wait_for_output(expected, timeout=10)
    if client_key:
        server.wait_for_output("failed authentication", timeout=10)
    assert not echo_works(port)
    assert "Tunnel: client connected" not in server.output()
    assert server.alive() and client.alive()


def test_wrong_key_backs_off_instead_of_storming(nodepass, echo):
    server, client, _, _ = start_pair(nodepass, echo, KEY, "wrong", env={
        "SERVICE_COOLDOWN": "100ms"})
    client.wait_for_output("rejected our shared key", timeout=15)
    first = client.output().count("rejected our shared key")
    time.sleep(1.5)
    attempts = client.output().count("rejected our shared key") - first
    # 100ms cooldown doubled per failure (0.2, 0.4, 0.8, 1.6 s): at most 3 more
    # tries in 1.5 s, where a fixed cooldown would make 15.
    assert attempts <= 3
    assert "reconnecting in 0.4s" in client.output() or "reconnecting in 0.8s" in client.output()


def test_keyed_client_refuses_an_unkeyed_server(nodepass, echo):
    server, client, _, port = start_pair(nodepass, echo, None, KEY)
    client.wait_for_output("does not ask for the shared key", timeout=10)
    assert not echo_works(port)


def test_unauthenticated_peer_learns_nothing(nodepass, echo):
    server, _client, tunnel_port, port = start_pair(nodepass, echo, KEY, None)
    with socket.create_connection((HOST, tunnel_port), timeout=10) as peer:
        first = peer.makefile("rb").readline()
        challenge = protocol.parse_signal(first)
        assert challenge.host == "0" and protocol.is_auth_challenge(challenge)
        data_port = str(server.status()["data_port"])
        # The nonce is random hex and may hold the port's digits by chance
        # (it did, once in a few thousand runs): look everywhere else.
        nonce = challenge.query["nonce"].encode()
        assert len(nonce) == 32 and first.count(nonce) == 1
        assert data_port.encode() not in first.replace(nonce, b"")
        # It says nothing: the server drops it after the handshake timeout.
        started = time.monotonic()
        assert peer.recv(100) == b""
        assert time.monotonic() - started < 8


def test_replayed_handshake_is_refused(nodepass, echo):
    server, client, tunnel_port, port = start_pair(nodepass, echo, KEY, None)
    # Record a good response to one challenge, then replay it to a fresh one.
    with socket.create_connection((HOST, tunnel_port), timeout=10) as first:
        nonce = protocol.parse_signal(first.makefile("rb").readline()).query["nonce"]
        recorded = auth.client_response(KEY.encode(), nonce, auth.new_nonce())
    with socket.create_connection((HOST, tunnel_port), timeout=10) as replay:
        reader = replay.makefile("rb")
        reader.readline()
        replay.sendall(recorded)
        answer = protocol.parse_signal(reader.readline())
        assert protocol.is_auth_rejection(answer)
    server.wait_for_output("failed authentication")


def test_data_port_refuses_a_connection_without_the_key(nodepass, echo):
    server, client, _, port = start_pair(nodepass, echo, KEY, KEY)
    wait_until(lambda: echo_works(port), 15, what="authenticated traffic")
    data_port = server.status()["data_port"]
    with socket.create_connection((HOST, data_port), timeout=10) as intruder:
        nonce = intruder.recv(protocol.AUTH_NONCE_LENGTH)
        assert auth.is_nonce(nonce.decode())
        intruder.sendall(b"0" * protocol.AUTH_MAC_LENGTH)
        assert intruder.recv(100) == b""  # no id: dropped
    server.wait_for_output("Data: 127.0.0.1")
    assert echo_works(port)


def test_minimum_tls_refuses_a_weaker_server(nodepass, echo):
    server, client, _, port = start_pair(nodepass, echo, None, None, tls=0, client_tls=1)
    client.wait_for_output("below this client's minimum tls=1", timeout=10)
    assert not echo_works(port)


def test_minimum_tls_accepts_an_equal_server(nodepass, echo):
    server, client, _, port = start_pair(nodepass, echo, None, None, tls=1, client_tls=1)
    wait_until(lambda: echo_works(port), 15, what="traffic at tls=1")
