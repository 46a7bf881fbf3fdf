"""Fixtures: every process or server a test starts is stopped here, pass or fail."""

import logging
import os
import subprocess
import sys
import time
from typing import Dict, Optional

import pytest

sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# scripts/loopback.py: helpers the tests share with the bench (scripts/benchmark/).
sys.path.append(os.path.join(REPO, "scripts"))

from support import (FAST_ENV, HOST, EchoServer, NodepassProcess, echo_works,  # noqa: E402
                     free_port, make_test_ca, stop_all, wait_until)


@pytest.fixture
def nodepass():
    """Start nodepass processes: ``nodepass(url, env=None)``; all stopped at teardown."""
    started = []

    def start(url: str, env: Optional[Dict[str, str]] = None, **kwargs) -> NodepassProcess:
        full_env = dict(FAST_ENV)
        full_env.update(env or {})
        process = NodepassProcess(url, full_env, **kwargs)
        started.append(process)
        return process

    yield start
    stop_all(started)


@pytest.fixture
def started():
    """start(thing) keeps it to close (peers, sockets) or stop (processes) after the test."""
    things = []
    yield things.append
    for thing in reversed(things):
        (thing.stop_quietly if isinstance(thing, NodepassProcess) else thing.close)()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> Dict[str, str]:
    return make_test_ca(str(tmp_path_factory.mktemp("ca")))


@pytest.fixture(scope="session")
def pyz_build(tmp_path_factory):
    """(path of a nodepass.pyz for every Python, what build-pyz printed): built
    once per session for test_pyz.py and test_service_script.py (20-30 s)."""
    output = tmp_path_factory.mktemp("pyz") / "nodepass.pyz"
    started = time.monotonic()
    build = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "build-pyz"),
                            "--output", str(output)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=280)
    assert build.returncode == 0, build.stdout[-3000:]
    print("build-pyz took %.1fs:\n%s" % (time.monotonic() - started, build.stdout))
    return output, build.stdout


class Tunnel:
    """A server and a client wired to an echo target, ready for traffic."""

    def __init__(self, nodepass, echo, tls: int = 0, env=None, server_query: str = "",
                 client_query: str = "") -> None:
        self.tunnel_port, self.port = free_port(), free_port()
        query = "log=debug&tls=%d%s" % (tls, server_query)
        self.server_url = "server://%s:%d/%s:%d?%s" % (HOST, self.tunnel_port, HOST,
                                                     self.port, query)
        self.client_url = "client://%s:%d/%s:%d?log=debug%s" % (
            HOST, self.tunnel_port, HOST, echo.port, client_query)
        self._start, self.env = nodepass, env or {}
        self.server = self.start_server()
        self.client = self.start_client()

    def start_server(self) -> NodepassProcess:
        self.server = self._start(self.server_url, self.env, status=True)
        return self.server

    def start_client(self) -> NodepassProcess:
        self.client = self._start(self.client_url, self.env, status=True)
        return self.client

    def wait_ready(self, timeout: float = 15) -> None:
        try:
            wait_until(lambda: echo_works(self.port), timeout, interval=0.1,
                       what="traffic through the tunnel")
        except AssertionError:
            raise AssertionError("tunnel not ready.\nserver log:\n%s\nclient log:\n%s"
                                 % (self.server.output()[-3000:],
                                    self.client.output()[-3000:])) from None


@pytest.fixture
def make_tunnel(nodepass, echo):
    """``make_tunnel(tls=0, env=None, server_query='', client_query='')`` -> ready Tunnel."""
    def make(tls: int = 0, env=None, ready: bool = True, **queries) -> Tunnel:
        tunnel = Tunnel(nodepass, echo, tls, env, **queries)
        if ready:
            tunnel.wait_ready()
        return tunnel
    return make


# -- in-process layer tests ------------------------------------------------------------

class Records(logging.Handler):
    """The package log's records, kept for assertions."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG):
        return [record.getMessage() for record in self.records if record.levelno == level]

    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


@pytest.fixture
def records():
    """Every line the package logs during the test, at every level."""
    from nodepass_gevent.log import log
    handler, level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.fixture
def cooperative_sockets(monkeypatch):
    """The package's sockets and TLS as gevent's, without patching the whole
    test process (whose helper servers use threads)."""
    import gevent.socket
    import gevent.ssl
    from nodepass_gevent.base import net
    from nodepass_gevent.copy import tls
    from nodepass_gevent.wire.v1 import control
    for module in (net, control):
        monkeypatch.setattr(module, "socket", gevent.socket)
    monkeypatch.setattr(tls, "ssl", gevent.ssl)
