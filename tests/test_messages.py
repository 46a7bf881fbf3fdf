"""The log lines an operator acts on, from real processes on loopback: each says
which thing, what is wrong and what to do (issue: "error messages a person can
act on"), and the metrics' labels stay bounded over many reconnects."""

import re
import socket
import threading
import time
from typing import List, Set, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from multi_support import http_get
from support import HOST, free_port, wait_until

KEY = "messages-key"


def url(role: str, tunnel_port: int, target_port: int, key: str = "", query: str = "") -> str:
    user = key + "@" if key else ""
    return "%s://%s%s:%d/%s:%d?log=debug%s" % (role, user, HOST, tunnel_port, HOST,
                                               target_port, query)


def log_line(process, pattern: str, timeout: float = 10) -> str:
    """The first line of ``process``'s log matching ``pattern`` (a regex), once it is there."""
    found = []

    def logged() -> bool:
        found[:] = re.findall(r"^.*%s.*$" % pattern, process.output(), re.MULTILINE)
        return bool(found)
    try:
        wait_until(logged, timeout, what=pattern)
    except AssertionError:
        raise AssertionError("no line matching %r in:\n%s" % (pattern, process.output()[-3000:]))
    return found[0]


# -- one client per server -----------------------------------------------------------

@pytest.mark.parametrize("key", ["", KEY], ids=["no key", "key"])
def test_a_second_client_hears_why_and_the_server_says_who_has_the_tunnel(nodepass, echo,
                                                                           key):
    tunnel_port, user_port = free_port(), free_port()
    server = nodepass(url("server", tunnel_port, user_port, key))
    first = nodepass(url("client", tunnel_port, echo.port, key))
    first.wait_for_output(" open: data port")
    second = nodepass(url("client", tunnel_port, echo.port, key))
    refused = log_line(server, r"Tunnel: refused a second client")
    assert re.search(r"WARN  Tunnel: refused a second client from 127\.0\.0\.1:\d+: the tunnel"
                     r" already has a client, 127\.0\.0\.1:\d+, connected since"
                     r" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \([0-9.]+s\); a server takes one client:"
                     r" stop the other client, or give this one a server of its own", refused)
    if key:  # it proved the key: the server told it, after the handshake
        told = log_line(second, r"Client: server ")
        assert told.endswith("ERROR Client: server %s:%d already serves another client (a server"
                             " takes one client): stop the other client, or give this one a"
                             " server of its own; retrying" % (HOST, tunnel_port)), told
    else:  # v1.0's bytes: nothing is said, the client infers it
        guessed = log_line(second, r"Client: server ")
        assert guessed.endswith(
            "WARN  Client: server %s:%d closed the tunnel before sending its tunnel signal:"
            " most likely it already serves another client (a server takes one client), or"
            " still holds this client's last tunnel; stop the other client, or give this one"
            " a server of its own; retrying" % (HOST, tunnel_port)), guessed
    assert " lost" not in second.output()  # it never had a tunnel to lose


# -- the client's dial and handshake ----------------------------------------------------

def test_a_server_nobody_listens_on_is_cannot_reach_not_lost(nodepass, echo):
    tunnel_port = free_port()
    client = nodepass(url("client", tunnel_port, echo.port), {"SERVICE_COOLDOWN": "50ms"})
    line = log_line(client, r"Client: cannot reach")
    assert line.endswith("WARN  Client: cannot reach server %s:%d: Connection refused"
                         % (HOST, tunnel_port)), line
    assert log_line(client, r"Client: reconnecting in").endswith(
        "Client: reconnecting in 50ms")  # not "0.1s", nor "0.0s" for a shorter one
    assert "lost" not in client.output()


def test_a_keyless_client_on_a_keyed_server_is_told_on_both_sides(nodepass, echo):
    tunnel_port, user_port = free_port(), free_port()
    server = nodepass(url("server", tunnel_port, user_port, KEY))
    client = nodepass(url("client", tunnel_port, echo.port))
    told = log_line(client, r"requires a shared key")
    assert told.endswith("ERROR Client: server %s:%d requires a shared key and this client has"
                         " none: give it the server's key, client://KEY@host:port/... or"
                         " NODEPASS_KEY" % (HOST, tunnel_port)), told
    seen = log_line(server, r"sent no key")
    assert re.search(r"WARN  Tunnel: 127\.0\.0\.1:\d+ sent no key: it closed the connection on"
                     r" the key challenge; this server requires its shared key: give the client"
                     r" the same one \(client://KEY@host:port/\.\.\. or NODEPASS_KEY\)$", seen)
    assert "did not authenticate" not in server.output()
    assert "closed in the middle of a line" not in server.output()


# -- the figures of the report line ---------------------------------------------------

def test_the_report_line_says_what_each_pool_figure_is(make_tunnel):
    tunnel = make_tunnel()
    client = log_line(tunnel.client, r"Client: Traffic: ")
    assert re.search(r"\| pool idle=\d+ target=\d+ \(adapts within 16\.\.1024(; \d+ over target"
                     r" after it shrank, kept until used)?\)$", client), client
    server = log_line(tunnel.server, r"Server: Traffic: ")
    assert re.search(r"\| pool idle=\d+ \(dialed in by the client; room for 1024\)$", server), \
        server
    assert "capacity=" not in tunnel.client.output() + tunnel.server.output()


# -- Prometheus labels over reconnects ------------------------------------------------

class ControlRelay:
    """A TCP relay in front of the server's tunnel port, so that the test can cut
    the client's control connection at will (its data connections go to the
    server's data port directly, as they would without the relay)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._pairs = []  # type: List[Tuple[socket.socket, socket.socket]]
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._pairs.append((downstream, upstream))
                self.accepted += 1
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Close every relayed control connection, both ways, at once."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def control_relay():
    relays = []

    def make(upstream_port: int) -> ControlRelay:
        relays.append(ControlRelay(upstream_port))
        return relays[-1]
    yield make
    for relay in relays:
        relay.close()


def tunnel_label_sets(metrics_port: int) -> Set[frozenset]:
    """Every set of labels of a nodepass_* sample on /metrics. (A figure may be
    absent for a moment, as the heartbeat age is before a session's first
    heartbeat: that is no new series; a new label value is.)"""
    code, body = http_get(metrics_port, "/metrics")
    assert code == 200, body
    return {frozenset(sample.labels.items())
            for family in text_string_to_metric_families(body)
            if family.name.startswith("nodepass_") for sample in family.samples}


def tunnel_info(metrics_port: int) -> List[dict]:
    code, body = http_get(metrics_port, "/metrics")
    assert code == 200, body
    return [sample.labels for family in text_string_to_metric_families(body)
            for sample in family.samples if sample.name == "nodepass_tunnel_info"]


RECONNECTS = 50


def test_metric_label_sets_stay_the_same_over_50_reconnects(nodepass, echo, control_relay):
    env = {"SERVICE_COOLDOWN": "20ms"}
    tunnel_port, user_port = free_port(), free_port()
    server = nodepass(url("server", tunnel_port, user_port), env, status=True)
    server.wait_for_output("Server: tunnel ")
    relay = control_relay(tunnel_port)
    client = nodepass(url("client", relay.port, echo.port), env, status=True)
    started = time.monotonic()

    def both_up(accepted: int) -> bool:
        # The relay's count shows the session is a new one, on a new port of the server's.
        server_status, client_status = server.status(), client.status()
        return (relay.accepted >= accepted and server_status["state"] == "up" and
                client_status["state"] == "up" and server_status["peer"] is not None)

    first, info = None, []
    peers = set()
    for reconnect in range(RECONNECTS + 1):
        wait_until(lambda: both_up(reconnect + 1), 10, interval=0.01,
                   what="both sides up after reconnect %d" % reconnect)
        peers.add(server.status()["peer"])
        labels = tunnel_label_sets(server.status_port) | tunnel_label_sets(client.status_port)
        if first is None:
            first = labels
            info = tunnel_info(server.status_port) + tunnel_info(client.status_port)
        assert labels == first, "after %d reconnects new series %r, gone %r" % (
            reconnect, sorted(labels - first), sorted(first - labels))
        relay.cut()
    elapsed = time.monotonic() - started
    print("%d reconnects in %.1fs; the server saw %d client ports" % (RECONNECTS, elapsed,
                                                                     len(peers)))
    assert len(peers) == RECONNECTS + 1  # each session came from a new port: the old label churned
    assert [item["peer"] for item in info] == [HOST, HOST]  # a host, never a port
    assert client.status()["reconnects"] >= RECONNECTS
