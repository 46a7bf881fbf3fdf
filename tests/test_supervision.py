"""Supervision of the roles' long-lived greenlets and the UDP receive back-off,
in-process with real sockets on 127.0.0.1 (issue 10).

The CLI monkey-patches the standard library; a test process must not (other
tests run threads), so for the length of a test the modules under test get
gevent's socket module instead (``cooperative_sockets``). Faults are injected
where the production code has no way to produce them: a bug in a dialer or a
report loop, a kernel refusing datagram buffers.
"""

import errno
import logging
import os

import gevent
import gevent.socket
import pytest

from nodepass_gevent.base.lifecycle import Supervisor
from nodepass_gevent.config import Settings, parse_url
from nodepass_gevent.tunnel import listeners
from nodepass_gevent.tunnel import pool as pool_module
from nodepass_gevent.tunnel.client import Client
from nodepass_gevent.tunnel.pool import ClientPool
from nodepass_gevent.tunnel.server import Server
from nodepass_gevent.wire.v1 import dataconn

from support import HOST, free_port

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

FAILURE_WAIT = 5.0  # generous: each failure below happens within milliseconds


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connecting is refused)."""
    return free_port()


# -- the supervisor itself -----------------------------------------------------------

def test_a_crash_fails_the_role_loudly_and_a_kill_does_not(records):
    supervisor = Supervisor("Test")
    sleeper = supervisor.spawn(gevent.sleep, 60)
    supervisor.kill()
    sleeper.join(timeout=1)
    assert sleeper.dead and not supervisor.failed.is_set()  # a stop, not a failure

    def buggy():
        raise RuntimeError("a bug")

    supervisor.spawn(buggy)
    assert supervisor.failed.wait(FAILURE_WAIT)
    assert "Test: internal failure: RuntimeError('a bug'" in records.text()
    assert not supervisor._supervised  # finished greenlets are not kept


# -- the client pool's manager ---------------------------------------------------------

def test_a_pool_whose_dialer_has_a_bug_fails_its_owner_loudly(records):
    supervisor = Supervisor("Client")

    def buggy_dial():
        raise TypeError("not a dial failure: a bug")

    pool = ClientPool(buggy_dial, min_capacity=4, max_capacity=4, supervisor=supervisor)
    pool.start()
    try:
        assert supervisor.failed.wait(FAILURE_WAIT), "the pool manager died silently"
        critical = records.messages(logging.CRITICAL)
        assert len(critical) == 1 and "Client: internal failure: TypeError" in critical[0]
        # Not mistaken for a dial failure retried for ever:
        assert "data connection failed" not in records.text()
    finally:
        pool.close()
        supervisor.kill()


def test_a_pool_whose_dials_are_refused_retries_without_failing_its_owner(records,
                                                                           monkeypatch):
    monkeypatch.setattr(pool_module, "DIAL_BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(pool_module, "DIAL_BACKOFF_MAX", 0.02)
    monkeypatch.setattr(pool_module, "ADJUST_INTERVAL", 0.05)  # a failed round waits for it
    supervisor, port, dials = Supervisor("Client"), closed_port(), []

    def refused_dial():
        dials.append(1)
        gevent.socket.create_connection((HOST, port), timeout=1)  # ConnectionRefusedError
        raise AssertionError("something listens on port %d" % port)

    pool = ClientPool(refused_dial, min_capacity=2, max_capacity=2, supervisor=supervisor)
    pool.start()
    try:
        with gevent.Timeout(FAILURE_WAIT):
            while len(dials) < 20:
                gevent.sleep(0.01)
        assert not supervisor.failed.is_set()
        warnings = [text for text in records.messages(logging.WARNING)
                    if "data connection failed" in text]
        assert len(warnings) == 1, warnings  # the first of the streak; the rest are debug
    finally:
        pool.close()
        supervisor.kill()


def test_client_fails_when_its_pool_manager_crashes(records, cooperative_sockets,
                                                     monkeypatch):
    # A real tunnel and data port on loopback; the bug strikes inside the
    # client's own dialer, after it connected to the data port.
    tunnel = gevent.socket.socket()
    data = gevent.socket.socket()
    for listener in (tunnel, data):
        listener.bind((HOST, 0))
        listener.listen(16)
    controls = []

    def serve_tunnel():
        control, _ = tunnel.accept()
        controls.append(control)
        control.sendall(b"//%d#0\n" % data.getsockname()[1])

    def serve_data():
        while True:
            connection, _ = data.accept()
            controls.append(connection)
            connection.sendall(b"0123abcd")  # an id, for the dial to read

    def buggy_read_id(*args):
        raise TypeError("a bug in the data connection handshake")

    # Both ways of reading the id: a greenlet's dial, and a plain one from callbacks.
    monkeypatch.setattr(dataconn, "read_id", buggy_read_id)
    monkeypatch.setattr(dataconn, "check_id", buggy_read_id)
    server = gevent.spawn(serve_tunnel)
    data_server = gevent.spawn(serve_data)
    config = parse_url("client://%s:%d/%s:%d" % (HOST, tunnel.getsockname()[1], HOST,
                                                 closed_port()))
    client = Client(config, Settings(min_pool_capacity=2, max_pool_capacity=2))
    client.start()
    try:
        assert client.failed.wait(FAILURE_WAIT), "the client looks healthy without a pool"
        assert "Client: internal failure: TypeError" in records.text()
        assert "tunnel to %s:%d open" % (HOST, tunnel.getsockname()[1]) in records.text()
    finally:
        client.stop(0.1)
        server.kill()
        data_server.kill()
        for sock in controls + [tunnel, data]:
            sock.close()


def test_server_fails_when_its_report_loop_crashes(records, cooperative_sockets,
                                                    monkeypatch):
    config = parse_url("server://%s:%d/%s:%d" % (HOST, free_port(), HOST, free_port()))
    server = Server(config, Settings(report_interval=0.01), None)

    def buggy_report_check():
        raise KeyError("a bug in the traffic counters")

    monkeypatch.setattr(server.stats, "changed_since_report", buggy_report_check)
    server.start()
    try:
        assert server.failed.wait(FAILURE_WAIT)
        assert "Server: internal failure: KeyError" in records.text()
    finally:
        server.stop(0.1)


# -- the UDP receive loop --------------------------------------------------------------

class FlakyListener(listeners.UdpListener):
    """A real UDP listener whose receive fails while ``failing`` is set (as when
    the kernel is out of buffers), counting every call."""

    failing, calls = True, 0

    def receive(self, size: int):
        self.calls += 1
        if self.failing:
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return super().receive(size)


def test_udp_receive_loop_backs_off_on_repeated_errors_and_recovers(records, monkeypatch):
    monkeypatch.setattr(listeners, "RECEIVE_BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(listeners, "RECEIVE_BACKOFF_MAX", 0.04)
    sock = gevent.socket.socket(gevent.socket.AF_INET, gevent.socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    owner, received = Supervisor("Server"), []
    listener = FlakyListener(sock, 2048, lambda datagram, peer: received.append(datagram),
                             owner, "Target")
    sender = gevent.socket.socket(gevent.socket.AF_INET, gevent.socket.SOCK_DGRAM)
    try:
        listener.start()
        # A datagram waits, so the socket stays readable while receiving fails.
        sender.sendto(b"during the storm", sock.getsockname())
        gevent.sleep(0.5)
        # 0.01 + 0.02 + 0.04 + 0.04 ... fit about 14 tries in 0.5 s; a loop
        # without back-off makes thousands.
        assert 5 <= listener.calls <= 20, listener.calls
        warnings = records.messages(logging.WARNING)
        assert len(warnings) == 1 and "Target: UDP receive failed" in warnings[0]
        errors = listener.calls
        listener.failing = False
        sender.sendto(b"after the storm", sock.getsockname())
        with gevent.Timeout(FAILURE_WAIT):
            while len(received) < 2:
                gevent.sleep(0.01)
        assert received == [b"during the storm", b"after the storm"]
        assert ("Target: UDP receives work again after %d errors" % errors
                in records.messages(logging.INFO))
        listener.close()
        gevent.sleep(0.05)
        assert listener.closed and not owner.failed.is_set()  # closed without a crash
    finally:
        listener.close()
        sender.close()
        sock.close()
