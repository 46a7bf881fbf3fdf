"""metrics.py's WSGI application on status dicts: /metrics, /status, /healthz.

The end-to-end tests (test_metrics.py) scrape real roles with Prometheus;
here the text format and the health rule are checked on their own.
"""

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodepass_gevent.ops.metrics import FIGURES, MetricsApp, healthy

pytestmark = pytest.mark.matrix


def status(name, role, state, **figures):
    base = {"name": name, "role": role, "state": state, "tunnel": "127.0.0.1:1",
            "target": "127.0.0.1:2", "peer": None, "data_port": None, "tls": 0}
    base.update({key: 0 for key, _, _, _ in FIGURES})
    base["last_heartbeat_age"] = None
    base.update(figures)
    return base


def call(app, path, method="GET"):
    replies = []
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method},
                        lambda status, headers: replies.append((status, dict(headers)))))
    return replies[0][0], replies[0][1], body


def test_metrics_are_labelled_by_name_and_role_and_read_at_each_scrape():
    tunnels = [status("web", "server", "up", bytes_in=10, tcp_total=3),
               status("db", "client", "waiting", last_heartbeat_age=1.5)]
    app = MetricsApp(lambda: tunnels)
    code, headers, body = call(app, "/metrics")
    assert code == "200 OK" and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, s.labels.get("name")): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("nodepass_bytes_in_total", "web")] == 10
    assert samples[("nodepass_tcp_connections_total", "web")] == 3
    assert samples[("nodepass_tunnel_up", "web")] == 1
    assert samples[("nodepass_tunnel_up", "db")] == 0
    assert samples[("nodepass_last_heartbeat_age_seconds", "db")] == 1.5
    assert ("nodepass_last_heartbeat_age_seconds", "web") not in samples
    assert ("process_resident_memory_bytes", None) in samples
    tunnels[0]["bytes_in"] = 99  # the next scrape reads the new figure
    body = call(app, "/metrics")[2].decode()
    assert 'nodepass_bytes_in_total{name="web",role="server"} 99.0' in body


def test_status_is_json_of_every_tunnel():
    tunnels = [status("web", "server", "up", peer="127.0.0.1:5000")]
    code, headers, body = call(MetricsApp(lambda: tunnels), "/status")
    assert code == "200 OK" and headers["Content-Type"] == "application/json"
    assert json.loads(body.decode())["tunnels"][0]["peer"] == "127.0.0.1:5000"


@pytest.mark.parametrize("states, ok", [
    (["up", "up"], True), (["up", "waiting"], False), (["failed"], False), ([], False),
])
def test_healthz_is_200_only_while_every_tunnel_is_up(states, ok):
    tunnels = [status("t%d" % i, "client", state) for i, state in enumerate(states)]
    assert healthy(tunnels) is ok
    code, _, body = call(MetricsApp(lambda: tunnels), "/healthz")
    assert code == ("200 OK" if ok else "503 Service Unavailable")
    if not ok and states:
        assert b"waiting" in body or b"failed" in body


def test_other_paths_and_methods_are_refused():
    app = MetricsApp(lambda: [])
    assert call(app, "/")[0] == "404 Not Found"
    assert call(app, "/metrics", "POST")[0] == "405 Method Not Allowed"


@pytest.mark.parametrize("peer, label", [
    ("10.0.0.5:40123", "10.0.0.5"), ("[::1]:40123", "::1"), (None, ""),
])
def test_the_info_metric_names_the_peer_host_without_its_port(peer, label):
    # A port would make a new series at every reconnect (the client's is ephemeral).
    tunnels = [status("web", "server", "up", peer=peer)]
    body = call(MetricsApp(lambda: tunnels), "/metrics")[2].decode()
    info = [s for family in text_string_to_metric_families(body)
            for s in family.samples if s.name == "nodepass_tunnel_info"]
    assert [s.labels["peer"] for s in info] == [label]
