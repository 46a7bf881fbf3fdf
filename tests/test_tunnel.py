"""End to end: our server and our client, real processes, an echo target."""

import os
import signal
import socket
import threading
import time

import pytest

from support import FAST_ENV, echo_works, sha256, tcp_exchange, udp_exchange, wait_until

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

PAYLOAD_MB = 8


def tls_tunnel(make_tunnel, test_ca, tls):
    if tls == 2:
        return make_tunnel(tls=2, env={"SSL_CERT_FILE": test_ca["ca"]},
                           server_query="&crt=%s&key=%s" % (test_ca["crt"], test_ca["key"]))
    return make_tunnel(tls=tls)


@pytest.mark.parametrize("tls", [0, 1, 2])
def test_large_payload_round_trip_is_byte_exact(make_tunnel, test_ca, tls):
    tunnel = tls_tunnel(make_tunnel, test_ca, tls)
    payload = os.urandom(PAYLOAD_MB * 1024 * 1024)
    echoed = tcp_exchange(tunnel.port, payload, timeout=30)
    assert len(echoed) == len(payload)
    assert sha256(echoed) == sha256(payload)


@pytest.mark.parametrize("tls", [0, 1])
def test_half_close_request_gets_its_response(make_tunnel, tls):
    tunnel = make_tunnel(tls=tls)
    # The echo target answers only after it sees our EOF, then closes its side:
    # both half-closes must cross the tunnel for this to return.
    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=10) as user:
        user.sendall(b"request")
        user.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = user.recv(1024)
            if not chunk:
                break
            answer += chunk
    assert answer == b"request"


@pytest.mark.parametrize("tls", [0, 1, 2])
def test_udp_datagram_gets_its_reply(make_tunnel, test_ca, tls):
    tunnel = tls_tunnel(make_tunnel, test_ca, tls)
    for size in (1, 1000, 4000, 8000):
        payload = os.urandom(size)
        assert udp_exchange(tunnel.port, payload) == payload


@pytest.mark.parametrize("tls,udp", [(0, "flow"), (1, "flow"), (0, "v1")])
def test_udp_datagrams_and_bytes_are_counted_once_by_either_role(make_tunnel, tls, udp):
    # A flow (plain or TLS link) and v1.0's exchanges each count a datagram
    # where it is passed on and a reply where it is passed back: once, in the
    # figures the master reports apart from TCP's (udprx/udptx).
    tunnel = make_tunnel(tls=tls, server_query="&udp=" + udp)
    payloads = [os.urandom(size) for size in (10, 300, 2000)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:  # one user: one flow
        user.settimeout(5)
        for payload in payloads:
            user.sendto(payload, ("127.0.0.1", tunnel.port))
            assert user.recvfrom(65535)[0] == payload
    size = sum(len(payload) for payload in payloads)
    for role in (tunnel.server, tunnel.client):
        role.wait_for_status(lambda status: (status["udp_datagrams"], status["udp_bytes_in"],
                                             status["udp_bytes_out"]) == (3, size, size),
                             what="3 datagrams and %d bytes each way" % size)
        status = role.status()
        assert status["bytes_in"] >= size and status["bytes_out"] >= size


@pytest.mark.parametrize("tls", [0, 1])
def test_concurrent_udp_senders_each_get_their_own_replies_in_order(make_tunnel, tls):
    # v1.0 UDP (udp=v1): a data connection per datagram, dialed (tls=0: from
    # callbacks) and filed (tls=0: in the accept callback) as fast as senders use them up.
    tunnel = make_tunnel(tls=tls, server_query="&udp=v1")
    senders, rounds = 16, 10
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(senders)]
    try:
        for sock in socks:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", tunnel.port))
        for round_number in range(rounds):
            sent = [b"%d;%d;" % (index, round_number) + os.urandom(32)
                    for index in range(senders)]
            for sock, payload in zip(socks, sent):
                sock.send(payload)
            assert [sock.recv(65535) for sock in socks] == sent
    finally:
        for sock in socks:
            sock.close()


def test_many_concurrent_connections_all_correct(make_tunnel):
    tunnel = make_tunnel(tls=0)
    results, errors = {}, []

    def user(index):
        payload = os.urandom(20000) + b"%d" % index
        try:
            results[index] = tcp_exchange(tunnel.port, payload, timeout=30) == payload
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(index,)) for index in range(300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(results) == 300 and all(results.values())


def test_client_restart_recovers(make_tunnel):
    tunnel = make_tunnel(tls=0)
    tunnel.client.stop(signal.SIGKILL)
    assert not echo_works(tunnel.port)
    tunnel.start_client()
    tunnel.wait_ready(timeout=15)


def test_server_restart_client_reconnects_by_itself(make_tunnel):
    tunnel = make_tunnel(tls=1)
    tunnel.server.stop(signal.SIGKILL)
    time.sleep(0.5)
    tunnel.start_server()
    tunnel.wait_ready(timeout=20)
    assert tunnel.client.alive()
    assert "reconnecting" in tunnel.client.output()


@pytest.mark.parametrize("role", ["server", "client"])
def test_sigterm_stops_gracefully_with_status_zero(make_tunnel, role):
    tunnel = make_tunnel(tls=0)
    process = getattr(tunnel, role)
    started = time.monotonic()
    assert process.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < float(FAST_ENV["SHUTDOWN_TIMEOUT"][:-1]) + 2
    assert "Stopped" in process.output()
    assert "Traceback" not in process.output()


def test_sigterm_lets_an_open_connection_finish_within_the_grace(make_tunnel):
    tunnel = make_tunnel(tls=0)
    user = socket.create_connection(("127.0.0.1", tunnel.port), timeout=10)
    try:
        user.sendall(b"first")
        assert user.recv(100) == b"first"
        tunnel.server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        user.sendall(b"still here")  # the open connection keeps working during the grace
        assert user.recv(100) == b"still here"
    finally:
        user.close()
    assert tunnel.server.proc.wait(10) == 0


def test_sigusr1_logs_the_traffic_line_at_once(make_tunnel):
    tunnel = make_tunnel(tls=0)
    tunnel.server.send_signal(signal.SIGUSR1)
    tunnel.client.send_signal(signal.SIGUSR1)
    tunnel.server.wait_for_output("Server: Traffic: tcp active=")
    tunnel.client.wait_for_output("Client: Traffic: tcp active=")


def test_traffic_report_counts_bytes(make_tunnel):
    tunnel = make_tunnel(tls=0)
    assert tcp_exchange(tunnel.port, b"x" * 100000) == b"x" * 100000
    wait_until(lambda: "bytes in=" in tunnel.server.output(), 5, what="a traffic report")
    report = [line for line in tunnel.server.output().splitlines() if "Traffic:" in line][-1]
    bytes_in = int(report.split("bytes in=")[1].split()[0])
    assert bytes_in >= 100000


def test_users_are_refused_cleanly_without_a_client(nodepass):
    from support import HOST, free_port
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, port))
    wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
    with socket.create_connection((HOST, port), timeout=5) as user:
        assert user.recv(10) == b""  # closed at once, not left hanging
    assert server.alive()


@pytest.mark.parametrize("tunnel_host, user_host, listen_host", [
    ("[::1]", "::1", "[::1]"),        # IPv6 everywhere
    ("localhost", "127.0.0.1", ""),   # a DNS name to dial, ":port" (all interfaces) to listen
])
def test_address_forms(nodepass, echo, tunnel_host, user_host, listen_host):
    import socket as socket_module
    if user_host == "::1" and not socket_module.has_ipv6:
        pytest.skip("no IPv6 on this host")
    from support import free_port
    tunnel_port, port = free_port(), free_port()
    nodepass("server://%s:%d/%s:%d" % (listen_host or tunnel_host, tunnel_port,
                                       listen_host, port))
    nodepass("client://%s:%d/127.0.0.1:%d" % (tunnel_host, tunnel_port, echo.port))
    wait_until(lambda: echo_works(port, host=user_host), 15, what="traffic over %s" % user_host)
    assert udp_exchange(port, b"datagram", host=user_host) == b"datagram"


@pytest.mark.parametrize("level, present, absent", [
    ("debug", ["DEBUG", "INFO ", "WARN "], []),
    ("info", ["INFO ", "WARN "], ["DEBUG"]),
    ("warn", ["WARN "], ["DEBUG", "INFO "]),
])
def test_log_levels(nodepass, echo, level, present, absent):
    from support import free_port
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://127.0.0.1:%d/127.0.0.1:%d?log=%s" % (tunnel_port, port, level))
    client = nodepass("client://127.0.0.1:%d/127.0.0.1:%d?log=%s" % (tunnel_port, echo.port,
                                                                    level))
    wait_until(lambda: echo_works(port), 15, what="traffic")
    # A warn-level event on every level: the client that served a user leaves.
    assert client.stop() == 0
    server.wait_for_output("disconnected; accepting a new one in", timeout=10)
    assert server.stop() == 0
    output = server.output()
    for word in present:
        assert word in output
    for word in absent:
        assert word not in output
    if level == "debug":
        assert "-> data connection" in output  # every connection is traced
    warning = next(line for line in output.splitlines() if "disconnected;" in line)
    assert warning[24:29] == "WARN "  # the event carries its level
    stamp = output.splitlines()[0][:23]
    assert stamp[4] == "-" and stamp[19] == "."
