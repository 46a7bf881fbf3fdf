"""--metrics scraped by a real Prometheus (Debian's `prometheus`), on loopback.

One module-scoped Prometheus (its start-up is the slow part) scrapes a server
process and a client process, each running two tunnels, every second; the
test sends bytes through one tunnel and asks Prometheus's HTTP API for them.
"""

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from multi_support import http_get, tunnel_ports, wait_states
from support import FAST_ENV, HOST, EchoServer, NodepassProcess, free_port, tcp_exchange, \
    wait_until

from nodepass_gevent.ops.metrics import FIGURES

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: nodepass
    static_configs:
      - targets: [{targets}]
"""


class Prometheus:
    """A Prometheus server with a temporary config and data directory."""

    def __init__(self, targets) -> None:
        executable = shutil.which("prometheus")
        assert executable, "prometheus is missing: apt-get install prometheus"
        self.folder = tempfile.mkdtemp(prefix="nodepass-prometheus-")
        config = os.path.join(self.folder, "prometheus.yml")
        with open(config, "w") as stream:
            stream.write(PROMETHEUS_CONFIG.format(
                targets=", ".join("'%s:%d'" % (HOST, port) for port in targets)))
        self.port = free_port()
        self._log = open(os.path.join(self.folder, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            [executable, "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(self.folder, "data"),
             "--web.listen-address=%s:%d" % (HOST, self.port), "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: http_get(self.port, "/-/ready")[0] == 200, 60, interval=0.2,
                       what="prometheus ready")
        except AssertionError:
            self.close()
            raise

    def query(self, expression: str):
        """The instant vector of ``expression``: [(labels, float value)]."""
        code, body = http_get(self.port, "/api/v1/query?query=" +
                              urllib.parse.quote(expression))
        assert code == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]

    def wait_value(self, expression: str, expected: float, timeout: float = 30) -> None:
        seen = []

        def reached() -> bool:
            seen[:] = self.query(expression)
            return len(seen) == 1 and seen[0][1] == expected
        try:
            wait_until(reached, timeout, interval=0.25, what=expression)
        except AssertionError:
            raise AssertionError("%s: wanted %s, Prometheus has %r" % (expression, expected,
                                                                       seen)) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def scraped():
    """Two tunnels (web, db) on a server process and a client process, both scraped."""
    echo = EchoServer()
    ports = tunnel_ports(2)
    metrics = {}
    folder = tempfile.mkdtemp(prefix="nodepass-metrics-")
    files = {}
    for role in ("server", "client"):
        files[role] = os.path.join(folder, role + ".tunnels")
        with open(files[role], "w") as stream:
            for name, pair in zip(("web", "db"), ports):
                if role == "server":
                    stream.write("%s server://%s:%d/%s:%d\n" % (name, HOST, pair["tunnel"], HOST,
                                                                pair["target"]))
                else:
                    stream.write("%s client://%s:%d/%s:%d?min=4\n" % (name, HOST, pair["tunnel"],
                                                                      HOST, echo.port))
    processes = []
    prometheus = None
    try:
        for role in ("server", "client"):
            processes.append(NodepassProcess(["--config", files[role]], dict(FAST_ENV),
                                             status=True))
            metrics[role] = processes[-1].status_port
        prometheus = Prometheus(metrics.values())
        for role, process in zip(("server", "client"), processes):
            wait_states(metrics[role], {"web": "up", "db": "up"}, processes=[process])
        yield {"prometheus": prometheus, "ports": ports, "metrics": metrics}
    finally:
        if prometheus is not None:
            prometheus.close()
        for process in processes:
            process.cleanup()
        echo.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_prometheus_sees_the_bytes_sent_through_one_tunnel(scraped):
    prometheus, web = scraped["prometheus"], scraped["ports"][0]
    payload = os.urandom(123457)
    assert tcp_exchange(web["target"], payload) == payload
    # Both sides count the user's bytes towards the target as "in", the echo as "out".
    for role in ("server", "client"):
        for direction in ("in", "out"):
            prometheus.wait_value('nodepass_bytes_%s_total{name="web",role="%s"}'
                                  % (direction, role), len(payload))
    prometheus.wait_value('nodepass_tcp_connections_total{name="web",role="server"}', 1)
    # The other tunnel carried nothing: counters are per tunnel.
    prometheus.wait_value('nodepass_bytes_in_total{name="db",role="server"}', 0)
    assert sorted(labels["role"] for labels, value in
                  prometheus.query('nodepass_tunnel_up{name="db"}') if value == 1) == \
        ["client", "server"]
    assert [value for _, value in prometheus.query('up{job="nodepass"}')] == [1.0, 1.0]


def test_every_figure_is_exposed_for_every_tunnel(scraped):
    code, body = http_get(scraped["metrics"]["client"], "/metrics")
    assert code == 200
    families = {family.name: family for family in text_string_to_metric_families(body)}
    for key, metric, kind, _ in FIGURES:
        if key == "last_heartbeat_age":
            continue  # absent until the first heartbeat line arrives
        name = metric[:-len("_total")] if metric.endswith("_total") else metric
        family = families.get(name)
        assert family is not None, "%s missing" % metric
        assert {sample.labels["name"] for sample in family.samples} >= {"web", "db"}
    client_pools = [sample.value for sample in families["nodepass_pool_idle"].samples]
    assert client_pools and all(value >= 1 for value in client_pools)
    assert "process_resident_memory_bytes" in body
    code, text = http_get(scraped["metrics"]["server"], "/healthz")
    assert (code, text) == (200, "ok\n")
