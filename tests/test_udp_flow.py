"""The UDP flow extension: one data connection per user address, framed datagrams."""

import os
import re
import socket
import threading
import time

import pytest

from reference_peer import ReferenceClient
from support import HOST, echo_works, free_port, udp_exchange, wait_until

pytestmark = pytest.mark.matrix  # the core suite, run on every Python


def flow_tunnel(nodepass, echo, tls=0, env=None):
    # Default URLs on both sides: flows are the default between our peers.
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug&tls=%d"
                      % (HOST, tunnel_port, HOST, port, tls), env)
    client = nodepass("client://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, echo.port),
                      env)
    wait_until(lambda: echo_works(port), 15, what="the tunnel")
    client.wait_for_output("using UDP flows")
    server.wait_for_output("uses UDP flows")
    return server, client, port


@pytest.mark.parametrize("tls", [0, 1])
def test_datagrams_of_one_address_share_one_flow(nodepass, echo, tls):
    server, client, port = flow_tunnel(nodepass, echo, tls)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.settimeout(5)
        for size in (1, 100, 1400, 4000, 8192):
            payload = os.urandom(size)
            user.sendto(payload, (HOST, port))
            assert user.recvfrom(65535)[0] == payload
        for index in range(200):
            user.sendto(b"%d" % index, (HOST, port))
            assert user.recvfrom(100)[0] == b"%d" % index
    launches = server.output().count("udp flow user")
    assert launches == 1  # 205 datagrams, one data connection


def test_many_addresses_concurrently_lose_nothing(nodepass, echo):
    server, client, port = flow_tunnel(nodepass, echo)
    failures = []

    def user(index):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for n in range(50):
                payload = b"user %d datagram %d" % (index, n)
                sock.sendto(payload, (HOST, port))
                try:
                    if sock.recvfrom(100)[0] != payload:
                        failures.append((index, n))
                except socket.timeout:
                    failures.append((index, n, "lost"))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert server.output().count("udp flow user") == 16


def test_a_datagram_may_have_several_replies(nodepass):
    # A target that answers every datagram twice: v1.0 passes only the first.
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind((HOST, 0))

    def answer_twice():
        while True:
            try:
                data, peer = target.recvfrom(100)
            except OSError:
                return
            target.sendto(data + b"-1", peer)
            target.sendto(data + b"-2", peer)

    threading.Thread(target=answer_twice, daemon=True).start()
    try:
        tunnel_port, port = free_port(), free_port()
        server = nodepass("server://%s:%d/%s:%d?udp=flow" % (HOST, tunnel_port, HOST, port))
        nodepass("client://%s:%d/%s:%d" % (HOST, tunnel_port, HOST, target.getsockname()[1]))
        # The server's word, not the client's: a datagram that arrives before the
        # server has read the acknowledgement goes the v1.0 way (one reply).
        server.wait_for_output("uses UDP flows", timeout=15)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
            user.settimeout(5)
            deadline = time.monotonic() + 10
            while True:  # the first datagrams may beat the pool; retry briefly
                user.sendto(b"hi", (HOST, port))
                try:
                    first = user.recvfrom(100)[0]
                    break
                except socket.timeout:
                    assert time.monotonic() < deadline
            assert first == b"hi-1"
            assert user.recvfrom(100)[0] == b"hi-2"
    finally:
        target.close()


def test_idle_flow_closes_and_a_new_one_opens(nodepass, echo):
    server, client, port = flow_tunnel(nodepass, echo, env={"UDP_READ_TIMEOUT": "200ms"})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.settimeout(5)
        user.sendto(b"one", (HOST, port))
        assert user.recvfrom(100)[0] == b"one"
        # The server ends it after IDLE_READ_TIMEOUTS x UDP_READ_TIMEOUT (2.4 s) of silence.
        wait_until(lambda: re.search(r"UDP flow .* ended", server.output()), 12 * 0.2 + 15,
                   what="the server to end the idle flow")
        user.sendto(b"two", (HOST, port))
        assert user.recvfrom(100)[0] == b"two"
    assert server.output().count("udp flow user") == 2


def test_v1_client_gets_v1_datagrams_from_a_flow_server(nodepass, echo):
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, port))
    wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
    client = ReferenceClient(tunnel_port, echo.port)
    try:
        assert client.first_line.startswith(b"//") and b"udp=flow" in client.first_line
        wait_until(lambda: echo_works(port), 15, what="traffic via the v1 client")
        for _ in range(3):
            assert udp_exchange(port, b"v1 datagram") == b"v1 datagram"
        assert "uses UDP flows" not in server.output()
        assert all(not line.endswith(b"#3\n") for line in client.lines)
    finally:
        client.close()


def test_shutdown_does_not_wait_for_idle_flows(nodepass, echo):
    server, client, port = flow_tunnel(nodepass, echo)
    assert udp_exchange(port, b"x") == b"x"
    for process in (server, client):
        started = time.monotonic()
        assert process.stop() == 0
        assert time.monotonic() - started < 2.5  # SHUTDOWN_TIMEOUT is 3s in tests
