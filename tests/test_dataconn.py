"""The data connection, in-process: the server's DataPort and the client's Dialer
(TLS, key proof, id) over real loopback sockets."""

import gevent
import gevent.event
import gevent.pool
import gevent.socket
import pytest

from nodepass_gevent.base import net
from nodepass_gevent.base.lifecycle import Supervisor
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import Address, parse_url
from nodepass_gevent.copy import tls
from nodepass_gevent.log import TunnelLog
from nodepass_gevent.tunnel.listeners import TcpListener
from nodepass_gevent.tunnel.pool import ServerPool
from nodepass_gevent.wire.v1 import dataconn

from support import HOST, free_port

pytestmark = [pytest.mark.matrix, pytest.mark.usefixtures("cooperative_sockets")]

WAIT = 5.0


class Session:
    """What the data port asks of the control channel: the client's host."""

    peer_host, peer, in_use, closed = HOST, HOST, False, False


class CountingPool(gevent.pool.Pool):
    """The data listener's handshake pool, counting the greenlets it started."""

    spawned = 0

    def spawn(self, *args, **kwargs):
        self.spawned += 1
        return super().spawn(*args, **kwargs)


class DataPort:
    """A DataPort behind a real data listener; its pool and counters."""

    def __init__(self, tls_mode: int = 0, key: bytes = None, now: bool = False) -> None:
        config = parse_url("server://%s:%d/%s:%d?tls=%d" % (HOST, free_port(), HOST,
                                                            free_port(), tls_mode))
        self.pool, self.stats, self.session = ServerPool(8), Stats(), Session()
        self.port = dataconn.DataPort(tls.server_context(config), key, self.pool, self.stats,
                                      TunnelLog(), lambda: self.session)
        self.handshakes = CountingPool(8)
        self.listener = TcpListener(net.listen_tcp(Address(HOST, 0)), self.port.handle,
                                    self.handshakes, Supervisor("Server"), "data",
                                    hands_on=True,
                                    handle_now=self.port.handle_now if now else None)
        self.listener.start()

    def dialer(self, tls_mode: int = 0, key: bytes = None) -> dataconn.Dialer:
        self.client_stats = Stats()
        return dataconn.Dialer(Address(HOST, self.listener.port), (HOST, self.listener.port),
                               tls.client_context(tls_mode), key, self.client_stats)

    def wait_pooled(self, count: int) -> None:
        with gevent.Timeout(WAIT):
            while self.pool.idle < count:
                gevent.sleep(0.01)

    def close(self) -> None:
        self.listener.close()
        self.pool.close()


@pytest.fixture
def data_port():
    ports = []

    def make(**kwargs) -> DataPort:
        ports.append(DataPort(**kwargs))
        return ports[-1]

    yield make
    for port in ports:
        port.close()


@pytest.mark.parametrize("tls_mode", [0, 1])
@pytest.mark.parametrize("key", [None, b"sesame"])
def test_both_sides_agree_on_the_id_and_the_connection_carries_bytes(data_port, tls_mode, key):
    port = data_port(tls_mode=tls_mode, key=key)
    connection_id, client_side = port.dialer(tls_mode, key)()
    try:
        port.wait_pooled(1)
        taken_id, server_side = port.pool.take(WAIT)
        assert taken_id == connection_id and port.session.in_use
        client_side.sendall(b"ping")
        assert server_side.recv(4) == b"ping"
        server_side.close()
    finally:
        client_side.close()
    assert port.client_stats.data_dials == 1 and port.client_stats.data_dial_failures == 0


def test_a_wrong_key_is_refused_and_counted(data_port):
    port = data_port(key=b"sesame")
    with pytest.raises((OSError, ValueError)):
        port.dialer(key=b"open-up")()
    with gevent.Timeout(WAIT):
        while not port.stats.auth_failures:
            gevent.sleep(0.01)
    assert port.pool.idle == 0 and port.client_stats.data_dial_failures == 1


def test_a_plain_client_cannot_use_a_tls_data_port(data_port):
    port = data_port(tls_mode=1)
    with pytest.raises((OSError, ValueError)):
        port.dialer(tls_mode=0)()  # reads TLS bytes where the id should be
    assert port.pool.idle == 0


def test_connections_from_another_host_are_refused_before_any_byte(data_port, records):
    port = data_port()
    port.session.peer_host = "127.0.0.2"  # the tunnel's client is elsewhere
    with pytest.raises((OSError, ValueError)):
        port.dialer()()
    assert "not the connected tunnel client" in records.text()
    assert port.pool.idle == 0


def dial_from_callbacks(dialer: dataconn.Dialer):
    """Dialer.start, waited for: the connection, or the error it ended with."""
    ended = gevent.event.AsyncResult()
    dial = dialer.start(lambda dial, connection, error: ended.set((connection, error)))
    assert dial is not None
    return ended.get(timeout=WAIT)


@pytest.mark.parametrize("key", [None, b"sesame"])
@pytest.mark.parametrize("tls_mode", [0, 1])
def test_only_plain_keyless_data_connections_go_without_a_greenlet(data_port, tls_mode, key):
    port = data_port(tls_mode=tls_mode, key=key, now=True)
    dialer = port.dialer(tls_mode, key)
    plain = tls_mode == 0 and key is None
    if plain:
        (connection_id, client_side), error = dial_from_callbacks(dialer)
        assert error is None
    else:
        assert dialer.start(lambda *ended: None) is None  # the caller dials in a greenlet
        connection_id, client_side = dialer()
    try:
        port.wait_pooled(1)
        taken_id, server_side = port.pool.take(WAIT)
        assert taken_id == connection_id
        client_side.sendall(b"ping")
        assert server_side.recv(4) == b"ping"
        server_side.close()
    finally:
        client_side.close()
    # Plain and keyless, the id is written in the accept callback: no handshake greenlet.
    assert port.handshakes.spawned == (0 if plain else 1)
    assert port.client_stats.data_dials == 1 and port.client_stats.data_dial_failures == 0


@pytest.mark.parametrize("server", ["refused", "garbage", "short"])
def test_a_dial_from_callbacks_fails_as_a_greenlet_dial_does(server):
    listener = gevent.socket.socket()
    listener.bind((HOST, 0))
    address = listener.getsockname()
    if server == "refused":
        listener.close()
    else:
        listener.listen(1)

        def answer():
            sock, _ = listener.accept()
            sock.sendall(b"NOT-AN-ID" if server == "garbage" else b"abc")
            sock.close()

        gevent.spawn(answer)
    stats = Stats()
    try:
        connection, error = dial_from_callbacks(
            dataconn.Dialer(Address(*address), address, None, None, stats))
    finally:
        listener.close()
    assert connection is None
    expected = {"refused": ConnectionRefusedError, "garbage": ValueError,
                "short": ConnectionError}[server]
    assert isinstance(error, expected), error
    assert stats.data_dials == 1 and stats.data_dial_failures == 1
