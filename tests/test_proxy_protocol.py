"""proxy=1|2: the service behind the tunnel logs the user's real address and port.

Real consumers (tests/consumers.py): Debian's nginx (``listen ... proxy_protocol``,
``$proxy_protocol_addr:$proxy_protocol_port`` in its access log) and HAProxy
(``bind ... accept-proxy``, ``%ci:%cp`` in its log), each run by the test on
loopback. Users connect from 127.0.0.2 while the client runs on 127.0.0.1,
so the address logged can only have come from the header. Our client, and
the v1.0 reference client, forward the header unchanged.
"""

import socket

import pytest

from consumers import HAProxy, Nginx, http_get
from nodepass_gevent.edge import proxyheader
from reference_peer import ReferenceClient
from support import HOST, EchoServer, echo_works, free_port, tcp_exchange, wait_until

USER_HOST = "127.0.0.2"  # on loopback's 127/8, yet not the client's address


@pytest.fixture(scope="module")
def echo():
    """One echo target for the module (the per-test one costs a second at teardown)."""
    server = EchoServer()
    yield server
    server.close()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def nginx():
    consumer = Nginx()
    yield consumer
    consumer.close()


@pytest.fixture(scope="module")
def haproxy():
    consumer = HAProxy()
    yield consumer
    consumer.close()


@pytest.fixture
def consumers(nginx, haproxy):
    return {"nginx": nginx, "haproxy": haproxy}


def server_url(tunnel_port: int, port: int, query: str, host: str = HOST) -> str:
    target = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    return "server://%s:%d/%s?log=debug&%s" % (HOST, tunnel_port, target, query)


def wait_for_http(port: int, host: str = HOST) -> None:
    def answered() -> bool:
        try:
            return http_get(port, host, timeout=3)[0].startswith(b"HTTP/1.1 200")
        except OSError:
            return False
    wait_until(answered, 15, interval=0.1, what="HTTP through the tunnel")


def assert_logged_user(consumer, port: int, host: str = HOST, source: str = USER_HOST) -> None:
    reply, (ip, user_port) = http_get(port, host, source=source)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    consumer.wait_for_line("%s:%d via" % (ip, user_port))


@pytest.mark.parametrize("tls", [0, 1])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_consumer_logs_the_users_address(nodepass, consumers, name, version, tls):
    consumer = consumers[name]
    tunnel_port, port = free_port(), free_port()
    server = nodepass(server_url(tunnel_port, port, "tls=%d&proxy=%d" % (tls, version)))
    nodepass("client://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, consumer.port))
    wait_for_http(port)
    assert "proxy=%d" % version in server.output()
    for _ in range(2):  # each user its own header: two ports, two lines
        assert_logged_user(consumer, port)


@pytest.mark.parametrize("version, tls", [(1, 0), (2, 1)])
def test_v1_reference_client_forwards_the_header(nodepass, nginx, version, tls):
    tunnel_port, port = free_port(), free_port()
    server = nodepass(server_url(tunnel_port, port, "tls=%d&proxy=%d" % (tls, version)))
    wait_until(lambda: "Server: tunnel" in server.output(), 10, what="server start")
    client = ReferenceClient(tunnel_port, nginx.port)
    try:
        assert client.tls_mode == tls
        wait_for_http(port)
        assert_logged_user(nginx, port)
    finally:
        client.close()


def test_dual_stack_listener_sends_ipv4_users_as_tcp4(nodepass, haproxy):
    """A user of a listener on all interfaces ([::], v6-mapped IPv4) is written as TCP4."""
    tunnel_port, port = free_port(), free_port()
    nodepass("server://%s:%d/:%d?log=debug&proxy=2" % (HOST, tunnel_port, port))
    nodepass("client://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, haproxy.port))
    wait_for_http(port)
    assert_logged_user(haproxy, port)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")
@pytest.mark.parametrize("version", [1, 2])
def test_ipv6_user(nodepass, nginx, version):
    tunnel_port, port = free_port(), free_port6()
    nodepass(server_url(tunnel_port, port, "proxy=%d" % version, host="::1"))
    nodepass("client://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, nginx.port))
    wait_for_http(port, "::1")
    assert_logged_user(nginx, port, "::1", source="::1")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_consumers_take_the_unknown_and_local_headers(consumers, name, version):
    """What the server writes when it cannot tell the addresses (UNKNOWN / LOCAL):
    the consumer accepts the connection and falls back to its own view of it."""
    consumer = consumers[name]
    reply, (ip, user_port) = http_get(consumer.port, prefix=proxyheader.encode(version, None,
                                                                                None))
    assert reply.startswith(b"HTTP/1.1 200")
    if name == "haproxy":  # it logs the real peer; nginx logs "-:-" for the unknown
        consumer.wait_for_line("%s:%d via" % (ip, user_port))


def test_without_proxy_the_service_gets_the_users_bytes_only(nodepass, echo):
    """No proxy=: not one byte more (the echo returns exactly what was sent)."""
    tunnel_port, port = free_port(), free_port()
    nodepass(server_url(tunnel_port, port, "tls=0"))
    nodepass("client://%s:%d/%s:%d" % (HOST, tunnel_port, HOST, echo.port))
    wait_until(lambda: echo_works(port), 15, what="echo through the tunnel")
    assert tcp_exchange(port, b"payload") == b"payload"


def test_proxy_header_comes_first_then_the_users_bytes(nodepass, echo):
    """Through an echo: the header, byte for byte, then the payload."""
    tunnel_port, port = free_port(), free_port()
    nodepass(server_url(tunnel_port, port, "proxy=1"))
    nodepass("client://%s:%d/%s:%d" % (HOST, tunnel_port, HOST, echo.port))
    wait_until(lambda: _echoes_with_header(port), 15, what="echo through the tunnel")
    with socket.socket() as sock:
        sock.bind((USER_HOST, 0))
        sock.connect((HOST, port))
        user_port = sock.getsockname()[1]
        sock.sendall(b"payload")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        echoed = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            echoed += chunk
    assert echoed == b"PROXY TCP4 %s %s %d %d\r\npayload" % (
        USER_HOST.encode(), HOST.encode(), user_port, port)


def _echoes_with_header(port: int) -> bool:
    try:
        return tcp_exchange(port, b"x", timeout=3).startswith(b"PROXY TCP4 ")
    except OSError:
        return False


def free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]
