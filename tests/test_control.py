"""The control channel, in-process: both halves of the tunnel handshake and the
session state machine (which launch kinds pass), over real loopback sockets."""

import logging
import time

import gevent
import gevent.socket
import pytest

from nodepass_gevent.base import net
from nodepass_gevent.base.lifecycle import Supervisor
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import Settings, parse_url
from nodepass_gevent.log import TunnelLog
from nodepass_gevent.tunnel.listeners import TcpListener
from nodepass_gevent.wire.v1 import auth, control, protocol

from support import HOST, free_port

pytestmark = [pytest.mark.matrix, pytest.mark.usefixtures("cooperative_sockets")]

SETTINGS = Settings(report_interval=1.0, service_cooldown=0.2)
WAIT = 5.0
DATA_PORT = 4321  # only announced: nothing dials it here


class TunnelServer:
    """A ServerControl behind a real tunnel listener on loopback."""

    def __init__(self, query: str = "", key: str = "") -> None:
        self.port = free_port()
        user = key + "@" if key else ""
        self.config = parse_url("server://%s%s:%d/%s:%d%s" % (user, HOST, self.port, HOST,
                                                             free_port(), query))
        self.owner, self.stats, self.ended = Supervisor("Server"), Stats(), []
        self.control = control.ServerControl(self.config, SETTINGS, DATA_PORT, self.stats,
                                             TunnelLog(), lambda: self.ended.append(1))
        self.listener = TcpListener(net.listen_tcp(self.config.tunnel), self.control.handle,
                                    self.control.spawn, self.owner, "tunnel")
        self.listener.start()

    def client_config(self, key: str = "", query: str = ""):
        user = key + "@" if key else ""
        return parse_url("client://%s%s:%d/%s:%d%s" % (user, HOST, self.port, HOST, free_port(),
                                                       query))

    def wait_session(self):
        with gevent.Timeout(WAIT):
            while self.control.session is None:
                gevent.sleep(0.01)
        return self.control.session

    def close(self) -> None:
        self.listener.close()
        self.control.close()


@pytest.fixture
def tunnel_server(request):
    servers = []

    def make(**kwargs) -> TunnelServer:
        servers.append(TunnelServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def open_session(config):
    return control.open_client_session(config, SETTINGS, TunnelLog())


def test_handshake_gives_the_client_the_data_port_and_tls_mode(tunnel_server):
    server = tunnel_server(query="?tls=1&udp=v1")  # v1.0's signal: no flow offer
    session = open_session(server.client_config())
    try:
        assert (session.data_port, session.tls_mode) == (DATA_PORT, 1)
        assert session.data_sockaddr[:2] == (HOST, DATA_PORT)
        assert session.launch_kinds == control.ALWAYS_ALLOWED
        assert server.wait_session().peer_host == HOST
    finally:
        session.close()


def test_launches_pass_and_heartbeats_unknown_and_unoffered_kinds_are_skipped(tunnel_server,
                                                                               records):
    server = tunnel_server(query="?udp=v1")
    session = open_session(server.client_config())
    try:
        server_side = server.wait_session()
        server_side.heartbeat()
        assert server_side.last_heartbeat is not None
        server_side.send(b"//cafe0001#9\n")  # a kind nobody defined
        server_side.send(protocol.encode_launch_signal("cafe0002", protocol.KIND_UDP_FLOW))
        server_side.send(protocol.encode_launch_signal("cafe0003", protocol.KIND_TCP))
        with gevent.Timeout(WAIT):
            signal = session.next_launch(TunnelLog())
        # Kind 3 was never offered: this session does not take it.
        assert (signal.host, signal.kind) == ("cafe0003", protocol.KIND_TCP)
        ignored = [text for text in records.messages(logging.DEBUG) if "ignored signal" in text]
        assert len(ignored) == 2, ignored
    finally:
        session.close()


def test_udp_flows_pass_once_offered_and_acknowledged(tunnel_server):
    server = tunnel_server(query="?udp=flow")
    session = open_session(server.client_config())
    try:
        assert protocol.KIND_UDP_FLOW in session.launch_kinds
        server_side = server.wait_session()
        with gevent.Timeout(WAIT):
            while not server_side.udp_flow:  # the acknowledgement arrived
                gevent.sleep(0.01)
        server_side.send(protocol.encode_launch_signal("cafe0004", protocol.KIND_UDP_FLOW))
        with gevent.Timeout(WAIT):
            assert session.next_launch(TunnelLog()).kind == protocol.KIND_UDP_FLOW
    finally:
        session.close()


def test_a_second_client_is_refused_while_the_first_is_in_use(tunnel_server, records):
    server = tunnel_server()
    first = open_session(server.client_config())
    try:
        server.wait_session().in_use = True
        with pytest.raises(control.TunnelRefused, match="most likely it already serves"
                                                         " another client") as refused:
            second = open_session(server.client_config())  # closed without a signal
            second.close()
        assert not refused.value.certain  # no key: v1.0's bytes, so the client guesses
        assert "refused a second client from 127.0.0.1:" in records.text()
    finally:
        first.close()
    with gevent.Timeout(WAIT):
        while not server.ended:
            gevent.sleep(0.01)
    assert "accepting a new one in 0.2s" in records.text()  # a used session: cooldown


def test_a_second_client_with_the_key_is_told_the_tunnel_is_taken(tunnel_server, records):
    server = tunnel_server(key="sesame")
    first = open_session(server.client_config(key="sesame"))
    try:
        server.wait_session().in_use = True
        with pytest.raises(control.TunnelRefused, match="already serves another client") \
                as refused:
            open_session(server.client_config(key="sesame"))
        assert refused.value.certain  # it proved the key, so the server told it why
        assert "refused a second client from 127.0.0.1:" in records.text()
    finally:
        first.close()


def test_a_client_refused_during_the_cooldown_is_told_so(tunnel_server, records):
    server = tunnel_server(key="sesame")
    server.control.settings = Settings(report_interval=1.0, service_cooldown=5.0)  # no race
    first = open_session(server.client_config(key="sesame"))
    server.wait_session().in_use = True
    first.close()
    with gevent.Timeout(WAIT):
        while not server.ended:
            gevent.sleep(0.01)
    with pytest.raises(control.TunnelRefused, match="pausing after its last client left"):
        open_session(server.client_config(key="sesame"))
    assert "refused a client from 127.0.0.1:" in records.text()
    assert "(SERVICE_COOLDOWN)" in records.text()


def test_the_key_handshake_proves_both_sides(tunnel_server):
    server = tunnel_server(key="sesame", query="?tls=2&crt=x&key=y")
    session = open_session(server.client_config(key="sesame"))
    try:
        assert (session.data_port, session.tls_mode) == (DATA_PORT, 2)
        assert server.wait_session() is not None
    finally:
        session.close()


def test_a_wrong_key_fails_on_both_sides(tunnel_server):
    server = tunnel_server(key="sesame")
    with pytest.raises(auth.AuthError, match="rejected our shared key"):
        open_session(server.client_config(key="open-up"))
    assert server.stats.auth_failures == 1
    assert server.control.session is None


def test_a_key_is_never_given_to_a_server_that_does_not_ask(tunnel_server):
    server = tunnel_server()
    with pytest.raises(control.SessionError, match="does not ask for the shared key"):
        open_session(server.client_config(key="sesame"))


def test_a_client_without_the_key_is_told_what_to_do(tunnel_server):
    server = tunnel_server(key="sesame")
    with pytest.raises(control.SessionError, match="requires a shared key"):
        open_session(server.client_config())


def test_a_second_keyless_client_gets_not_one_byte_as_in_v1(tunnel_server, records):
    # Without a key the newcomer may be a v1.0 client: it is closed, never told.
    server = tunnel_server()
    first = open_session(server.client_config())
    try:
        server.wait_session().in_use = True
        with gevent.socket.create_connection((HOST, server.port)) as second:
            second.settimeout(WAIT)
            assert second.recv(100) == b""
        assert "refused a second client" in records.text()
    finally:
        first.close()


def test_a_peer_silent_on_the_key_challenge_sent_no_key(tunnel_server, records, monkeypatch):
    monkeypatch.setattr(control, "HANDSHAKE_TIMEOUT", 0.3)  # no test sleeps through 5 s
    server = tunnel_server(key="sesame")
    with gevent.socket.create_connection((HOST, server.port)) as peer:
        assert peer.recv(4096).startswith(b"//0?auth=")
        port = peer.getsockname()[1]
        with gevent.Timeout(WAIT):
            while "sent no key" not in records.text():
                gevent.sleep(0.01)
    assert ("Tunnel: 127.0.0.1:%d sent no key within 0.3s of the key challenge (a client"
            " without the key, a NodePass v1.0 client, which cannot use one, or not a client"
            " at all)" % port) in records.messages(logging.WARNING)


def test_a_peer_that_stops_inside_its_key_response_is_named(tunnel_server, records):
    server = tunnel_server(key="sesame")
    with gevent.socket.create_connection((HOST, server.port)) as peer:
        assert peer.recv(4096).startswith(b"//0?auth=")
        port = peer.getsockname()[1]
        peer.sendall(b"//0123")  # half a line, then gone
    with gevent.Timeout(WAIT):
        while "did not finish" not in records.text():
            gevent.sleep(0.01)
    assert ("Tunnel: 127.0.0.1:%d did not finish the key handshake: closed in the middle of a"
            " line" % port) in records.messages(logging.WARNING)


def test_a_silent_peer_is_cut_for_a_real_client_when_places_run_out(tunnel_server,
                                                                      monkeypatch, records):
    monkeypatch.setattr(control, "MAX_PENDING_CONTROLS", 2)
    server = tunnel_server(key="sesame")  # the key handshake keeps silent peers pending
    silent = [gevent.socket.create_connection((HOST, server.port)) for _ in range(2)]
    try:
        gevent.sleep(0.1)
        session = open_session(server.client_config(key="sesame"))
        session.close()
        assert silent[0].recv(4096).startswith(b"//0?auth=")  # the challenge, then cut
        started = time.monotonic()
        assert silent[0].recv(4096) == b""
        assert time.monotonic() - started < 1.0  # cut for the client, not timed out (5 s)
        assert "in its key handshake: 2 tunnel connections were handshaking" in records.text()
    finally:
        for sock in silent:
            sock.close()


def test_a_silent_squatter_on_the_tunnel_port_is_replaced_by_the_real_client(tunnel_server,
                                                                              records,
                                                                              monkeypatch):
    # v1.0 gives the tunnel to whoever connects first. A peer that takes it and
    # never dials a data connection must not keep the real client out for long
    # (for HANDSHAKE_TIMEOUT: made short here, so no test sleeps through it).
    monkeypatch.setattr(control, "HANDSHAKE_TIMEOUT", 0.3)
    server = tunnel_server()
    squatter = gevent.socket.create_connection((HOST, server.port))
    try:
        assert squatter.recv(100).startswith(b"//")  # it got the tunnel
        squatter_session = server.wait_session()
        with pytest.raises(control.TunnelRefused):  # too early: refused
            open_session(server.client_config())
        gevent.sleep(0.35)
        session = open_session(server.client_config())
        session.close()
        assert "never opened a data connection; replacing it" in records.text()
        assert squatter_session.closed and squatter.recv(100) == b""
    finally:
        squatter.close()
