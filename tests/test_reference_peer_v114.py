"""The v1.14 reference peer against itself on loopback: its server and client halves
carry a TCP and a UDP echo in both modes and at tls 0 and 1, ping each other, verify each
other at tls 1, and a wrong key is refused with 401. If this fails, the peer
that drives our roles is wrong, not our roles.
"""

import pytest

from reference_peer_v114 import ReferenceClient, ReferenceServer
from support import HOST, EchoServer, tcp_exchange, udp_exchange, wait_until
from nodepass_gevent.wire.v114 import signals

FAST_PING = 0.2  # seconds between pings (v1.14: 5); verify goes out after one


@pytest.fixture
def peers():
    started = []

    def start(peer):
        started.append(peer)
        return peer

    echo = EchoServer()
    yield start, echo
    for peer in started:
        peer.close()
    echo.close()


def actions(peer):
    return {signal.action for signal in peer.received}


@pytest.mark.matrix
@pytest.mark.parametrize("flow", ["-", "+"])
@pytest.mark.parametrize("tls", ["0", "1"])
def test_reference_halves_carry_an_echo(peers, flow, tls):
    start, echo = peers
    target = (HOST, echo.port)
    server = start(ReferenceServer(flow=flow, tls=tls, ping_interval=FAST_PING,
                                   target=target if flow == "+" else None))
    client = start(ReferenceClient(server.tunnel_port, target=target if flow == "-" else None,
                                   ping_interval=FAST_PING))
    assert client.ready.wait(10), client.failures
    user_port = server.user_port if flow == "-" else client.user_port
    assert tcp_exchange(user_port, b"hello-v114 " * 1000) == b"hello-v114 " * 1000
    assert udp_exchange(user_port, b"hello-udp-v114") == b"hello-udp-v114"
    assert server.statuses == client.statuses == [200]
    wait_until(lambda: {"ping", "pong"} <= actions(server) & actions(client), 5, what="pings")
    launcher, dialer = (server, client) if flow == "-" else (client, server)
    assert {"tcp", "udp"} <= actions(dialer) and not {"tcp", "udp"} & actions(launcher)
    if tls == "1":
        wait_until(lambda: "verify" in actions(server) & actions(client), 5, what="verifies")
    assert not (server.failures or client.failures or server.refused_lines
                or client.refused_lines)


@pytest.mark.matrix
def test_a_wrong_key_is_refused_with_401_and_retried(peers):
    start, echo = peers
    server = start(ReferenceServer(ping_interval=FAST_PING))
    client = start(ReferenceClient(server.tunnel_port, target=(HOST, echo.port), key=b"wrong",
                                   retry_after=0.05))
    wait_until(lambda: len(client.statuses) >= 2, 5, what="two refusals")
    assert set(client.statuses) == {401} and set(server.statuses) == {401}
    assert not client.ready.is_set()


@pytest.mark.matrix
def test_garbage_on_the_control_channel_is_refused_and_the_session_goes_on(peers):
    start, echo = peers
    server = start(ReferenceServer(ping_interval=FAST_PING))
    client = start(ReferenceClient(server.tunnel_port, target=(HOST, echo.port),
                                   ping_interval=FAST_PING))
    assert client.ready.wait(10)
    with client.write_lock:
        client.control.sendall(b"not base64!\n" + signals.encode_signal(
            signals.Signal("reboot"), client.key))
    wait_until(lambda: len(server.refused_lines) == 2, 5, what="two refused lines")
    assert tcp_exchange(server.user_port, b"still here") == b"still here"


@pytest.mark.matrix
def test_a_verify_naming_the_connection_we_took_for_our_own_is_accepted(peers):
    """The race v1.14 loses (contract (e)): both sides verify the same connection."""
    start, echo = peers
    server = start(ReferenceServer(tls="1", ping_interval=30))  # no verify of its own yet
    client = start(ReferenceClient(server.tunnel_port, target=(HOST, echo.port),
                                   ping_interval=30))
    assert client.ready.wait(10)
    wait_until(lambda: len(client.pool) >= 1, 5, what="an idle connection")
    name, conn = client.pool.newest()
    client.own_verify_ids.add(name)  # as if our verify had taken it first
    conn.close()
    client._check_verify(signals.verify(name, server.fingerprint))
    assert client.verified.is_set() and not client.failures
    client.verified.clear()
    client._check_verify(signals.verify(name, "sha256:" + ":".join(["00"] * 32)))
    assert client.failures == ["verify fingerprint mismatch on " + name]
