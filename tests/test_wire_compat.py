"""Wire compatibility, tested against a v1.0 peer built from docs/protocol.md alone."""

import os
import re
import threading
import time

import pytest

from reference_peer import LAUNCH_SIGNAL, TUNNEL_SIGNAL, ReferenceClient, ReferenceServer
from support import HOST, echo_works, free_port, sha256, tcp_exchange, udp_exchange, wait_until

# Our server's tunnel signal by default: v1.0's with the UDP flow offer in the
# query string, which a v1.0 client's URL parser reads past (docs/protocol.md,
# "Extension: UDP flows").
TUNNEL_SIGNAL_OFFERING_FLOWS = re.compile(rb"^//(\d+)\?udp=flow#([012])\n$")

pytestmark = pytest.mark.matrix  # the core suite, run on every Python


@pytest.fixture
def reference_server(request, test_ca):
    servers = []

    def start(**kwargs):
        server = ReferenceServer(cert=test_ca, **kwargs)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


@pytest.fixture
def reference_client():
    clients = []

    def start(*args, **kwargs):
        client = ReferenceClient(*args, **kwargs)
        clients.append(client)
        return client
    yield start
    for client in clients:
        client.close()


# -- our client, their server ---------------------------------------------------

@pytest.mark.parametrize("tls", [0, 1])
def test_our_client_serves_a_v1_server(nodepass, echo, reference_server, tls):
    server = reference_server(tls_mode=tls)
    client = nodepass("client://%s:%d/%s:%d?log=debug" % (HOST, server.tunnel_port, HOST,
                                                          echo.port))
    wait_until(lambda: echo_works(server.port), 15, what="traffic via the v1 server")
    payload = os.urandom(3 * 1024 * 1024)
    assert sha256(tcp_exchange(server.port, payload, timeout=30)) == sha256(payload)
    assert udp_exchange(server.port, b"datagram") == b"datagram"
    assert server.control_received == b""  # a v1.0 client never writes on the tunnel
    assert client.alive()


def test_our_client_survives_launch_before_id(nodepass, echo, reference_server):
    server = reference_server(tls_mode=0, launch_before_id=True)
    nodepass("client://%s:%d/%s:%d" % (HOST, server.tunnel_port, HOST, echo.port))
    wait_until(lambda: echo_works(server.port), 15, what="traffic via the v1 server")
    results = []

    def user(index):
        payload = b"user %d " % index * 100
        results.append(tcp_exchange(server.port, payload, timeout=20) == payload)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert results.count(True) == 50


# -- our server, their client -----------------------------------------------------

@pytest.mark.parametrize("tls", [0, 1])
def test_v1_client_serves_our_server(nodepass, echo, reference_client, tls):
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug&tls=%d" % (HOST, tunnel_port, HOST, port,
                                                                 tls))
    wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
    client = reference_client(tunnel_port, echo.port)
    assert TUNNEL_SIGNAL_OFFERING_FLOWS.match(client.first_line), client.first_line
    assert client.tls_mode == tls
    assert 1024 <= client.data_port < 8192  # v1.0's random range
    wait_until(lambda: echo_works(port), 15, what="traffic via our server")
    payload = os.urandom(3 * 1024 * 1024)
    assert sha256(tcp_exchange(port, payload, timeout=30)) == sha256(payload)
    assert udp_exchange(port, b"datagram") == b"datagram"
    time.sleep(1.2)  # long enough for a heartbeat (REPORT_INTERVAL=1s in tests)
    # Every line our server wrote is a v1.0 heartbeat or launch signal for an
    # id that it wrote on one of the client's data connections.
    assert b"\n" in client.lines
    launches = [LAUNCH_SIGNAL.match(line) for line in client.lines if line != b"\n"]
    assert launches and all(launches)
    assert {m.group(1) for m in launches} <= set(client.ids_seen)
    ids = [m.group(1) for m in launches]
    assert len(ids) == len(set(ids))  # every data connection is used once
    # It never acknowledged the flow offer: v1.0 datagrams (#2), never a flow (#3).
    assert {m.group(2) for m in launches} == {b"1", b"2"}
    assert all(len(i) == 8 for i in client.ids_seen)
    assert "uses UDP flows" not in server.output()


@pytest.mark.parametrize("tls", [0, 1])
def test_udp_v1_pins_the_v1_tunnel_signal_byte_for_byte(nodepass, reference_client, tls):
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?tls=%d&udp=v1" % (HOST, tunnel_port, HOST, port,
                                                               tls))
    wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
    client = reference_client(tunnel_port, port)
    assert client.first_line == b"//%d#%d\n" % (client.data_port, tls)
    assert TUNNEL_SIGNAL.match(client.first_line)
