"""TCP users and launches from event-loop callbacks (tunnel/tcp.CallbackConnections).

Once the splice engine is probed and a data connection waits, a user costs
the server no greenlet; once the target's address is known, a launch costs
the client none. These check what those paths must keep doing, on real
processes: users reach the target, a target that goes away is said (and the
next user after it comes back gets through), a stop of either side drains
such connections, then cuts them, and SEMAPHORE_LIMIT still holds.
"""

import socket
import time

import pytest

from support import HOST, EchoServer, free_port, tcp_exchange, wait_until


def urls(tunnel_port, user_port, target_port):
    return ("server://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, user_port),
            "client://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, target_port))


def start_pair(nodepass, target_port, env=None):
    tunnel_port, user_port = free_port(), free_port()
    server_url, client_url = urls(tunnel_port, user_port, target_port)
    server = nodepass(server_url, env)
    server.wait_for_output("Server: tunnel")
    client = nodepass(client_url, env)
    client.wait_for_output("Client: tunnel to")
    wait_until(lambda: _echoes(user_port), 10)
    return server, client, user_port


def _echoes(port):
    try:
        return tcp_exchange(port, b"ping", timeout=2) == b"ping"
    except OSError:
        return False


@pytest.mark.timeout(40)
def test_a_target_that_goes_away_is_said_and_comes_back(nodepass):
    target = EchoServer()
    target_port = target.port
    server, client, user_port = start_pair(nodepass, target_port)
    payload = bytes(range(256)) * 600  # 150 KB: splices as well as copies
    for _ in range(20):  # the address is known: these go through the callbacks
        assert tcp_exchange(user_port, payload) == payload
    target.close()
    with socket.create_connection((HOST, user_port), timeout=10) as user:
        user.sendall(b"hello")
        assert user.recv(100) == b""  # turned away: closed without a byte
    client.wait_for_output("cannot reach TCP target", 10)
    target = EchoServer(port=target_port)
    try:
        wait_until(lambda: _echoes(user_port), 15)
        assert tcp_exchange(user_port, payload) == payload
    finally:
        target.close()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("side", ["client", "server"])
def test_a_stop_drains_then_cuts_an_open_connection(nodepass, echo, side):
    server, client, user_port = start_pair(nodepass, echo.port)
    stopped = {"client": client, "server": server}[side]
    with socket.create_connection((HOST, user_port), timeout=10) as user:
        user.sendall(b"still here")
        assert user.recv(100) == b"still here"
        started = time.monotonic()
        stopped.stop(timeout=15)  # SHUTDOWN_TIMEOUT=3s in the tests' environment
        assert 2.5 < time.monotonic() - started < 10
        assert "cutting 1 connections still open" in stopped.output()
        user.settimeout(10)
        assert user.recv(100) == b""  # cut, and the end passed on to the user


@pytest.mark.timeout(40)
def test_semaphore_limit_still_bounds_users(nodepass, echo):
    server, client, user_port = start_pair(nodepass, echo.port, {"SEMAPHORE_LIMIT": "2"})
    users = [socket.create_connection((HOST, user_port), timeout=10) for _ in range(3)]
    try:
        for user in users[:2]:
            user.sendall(b"in")
            assert user.recv(10) == b"in"
        users[2].sendall(b"waits")
        users[2].settimeout(1.0)
        with pytest.raises(socket.timeout):  # no place: not accepted yet
            users[2].recv(10)
        users[0].close()  # a place frees: the third is served
        users[2].settimeout(10)
        assert users[2].recv(10) == b"waits"
    finally:
        for user in users:
            user.close()
