"""The --metrics HTTP endpoint: Prometheus /metrics, JSON /status, /healthz.

Nothing here runs on the data path. The roles keep plain integer counters
(stats.Stats) and a status() dict; a scrape calls ``tunnels()`` (every
running role, read at that moment, so a reload is seen at the next scrape)
and turns their status into metric families, labelled by tunnel name and
role. The official client library (prometheus_client) writes the text
format; it is imported only when --metrics is given, so a process without
it pays no memory for it.

    /metrics  Prometheus text format: the counters of every tunnel, and the
              process's own (memory, CPU, open files)
    /status   JSON: {"tunnels": [status(), ...]} with each tunnel's state, peer
              and health verdict ("healthy", "problem", "health")
    /healthz  200 "ok" while every tunnel can carry users (health.py: its
              control channel is up, data connections arrive, its target
              answers), else 503 and one line per tunnel that cannot, with why
"""

import json
from typing import Callable, Dict, Iterable, List, Optional

import gevent.pywsgi

from nodepass_gevent.base import health
from nodepass_gevent.config import Address
from nodepass_gevent.log import log

StatusSource = Callable[[], List[Dict[str, object]]]
LABELS = ["name", "role"]
UP = "up"

# status() key -> (metric name, kind, help). Counters get "_total" from the library.
FIGURES = (
    ("bytes_in", "nodepass_bytes_in", "counter",
     "Bytes from users (or the data side) towards the target"),
    ("bytes_out", "nodepass_bytes_out", "counter", "Bytes back towards users"),
    ("tcp_active", "nodepass_tcp_active", "gauge", "TCP connections open now"),
    ("tcp_total", "nodepass_tcp_connections", "counter", "TCP connections carried"),
    ("udp_datagrams", "nodepass_udp_datagrams", "counter", "UDP datagrams carried"),
    ("udp_flows_active", "nodepass_udp_flows_active", "gauge", "UDP flows open now"),
    ("pool_idle", "nodepass_pool_idle", "gauge", "Pooled data connections ready for use"),
    ("pool_capacity", "nodepass_pool_capacity", "gauge",
     "Client: the idle count the pool refills to now (adapts within MIN_POOL_CAPACITY.."
     "MAX_POOL_CAPACITY); server: the most it holds (MAX_POOL_CAPACITY)"),
    ("data_dials", "nodepass_data_dials", "counter", "Data connections dialed or accepted"),
    ("data_dial_failures", "nodepass_data_dial_failures", "counter",
     "Data connections that failed to open"),
    ("reconnects", "nodepass_reconnects", "counter", "Tunnel (control) connections re-made"),
    ("auth_failures", "nodepass_auth_failures", "counter", "Shared-key authentication failures"),
    ("tls_failures", "nodepass_tls_failures", "counter", "TLS handshake failures"),
    ("semaphore_waits", "nodepass_semaphore_waits", "counter",
     "Users that found SEMAPHORE_LIMIT reached"),
    ("users_dropped", "nodepass_users_dropped", "counter",
     "Users closed for want of a tunnel client or a data connection (server)"),
    ("target_failures", "nodepass_target_failures", "counter",
     "Users whose TCP target did not answer (client)"),
    ("last_heartbeat_age", "nodepass_last_heartbeat_age_seconds", "gauge",
     "Seconds since the last heartbeat on the tunnel connection"),
    ("control_rtt", "nodepass_control_rtt_seconds", "gauge",
     "The kernel's smoothed round trip of the tunnel (control) connection"),
)


class TunnelCollector:
    """A prometheus_client collector reading every tunnel's status() on scrape."""

    def __init__(self, tunnels: StatusSource) -> None:
        self.tunnels = tunnels

    def collect(self) -> Iterable:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily)
        statuses = self.tunnels()
        up = GaugeMetricFamily("nodepass_tunnel_up", "1 while the tunnel's state is up",
                               labels=LABELS)
        # Labels must stay bounded: "peer" is the peer's host without its port
        # (the server would see a new ephemeral port, so a new series, at every
        # reconnect); the user's addresses never appear.
        info = GaugeMetricFamily("nodepass_tunnel_info", "The tunnel's definition and state;"
                                 " peer: the host of the client (server) or server (client);"
                                 " wire: the NodePass wire spoken (1.0, 1.14; auto: not yet"
                                 " found out)",
                                 labels=LABELS + ["state", "tunnel", "target", "tls", "peer",
                                                  "wire"])
        for status in statuses:
            labels = [str(status["name"]), str(status["role"])]
            up.add_metric(labels, 1.0 if status["state"] == UP else 0.0)
            info.add_metric(labels + [str(status["state"]), str(status["tunnel"]),
                                      str(status["target"]), str(status["tls"]),
                                      peer_host(status.get("peer")),
                                      str(status.get("wire") or "")], 1.0)
        yield up
        yield info
        yield from _health_families(statuses)
        for key, metric, kind, text in FIGURES:
            family_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_class(metric, text, labels=LABELS)
            for status in statuses:
                value = status.get(key)
                if value is not None:  # no heartbeat yet: absent rather than a made-up age
                    family.add_metric([str(status["name"]), str(status["role"])], float(value))
            yield family


# nodepass_udp_dropped_total{reason, direction}: status() key -> its labels.
# Bounded: the reasons and directions are these, never an address or a port.
UDP_DROPS = (
    ("udp_too_large_datagrams", "too_large", "to_target"),
    ("udp_too_large_replies", "too_large", "to_user"),
)


class UdpDropCollector:
    """nodepass_udp_dropped_total: UDP datagrams dropped whole, by why and which way."""

    def __init__(self, tunnels: StatusSource) -> None:
        self.tunnels = tunnels

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily
        family = CounterMetricFamily(
            "nodepass_udp_dropped", "UDP datagrams dropped whole; too_large: above"
            " UDP_DATA_BUF_SIZE on the v1.0 wire (to_target: users' datagrams,"
            " to_user: replies)", labels=LABELS + ["reason", "direction"])
        for status in self.tunnels():
            for key, reason, direction in UDP_DROPS:
                value = status.get(key)
                if value is not None:
                    family.add_metric([str(status["name"]), str(status["role"]), reason,
                                       direction], float(value))
        yield family


def peer_host(peer: Optional[object]) -> str:
    """"10.0.0.5" of "10.0.0.5:40123", "::1" of "[::1]:40123"; "" for no peer."""
    if not peer:
        return ""
    host = str(peer).rpartition(":")[0] or str(peer)
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _health_families(statuses: List[Dict[str, object]]) -> Iterable:
    """The /healthz verdict per tunnel, and which problem: a gauge per
    health.PROBLEMS value (bounded labels: the list is fixed)."""
    from prometheus_client.core import GaugeMetricFamily
    healthy_family = GaugeMetricFamily("nodepass_tunnel_healthy",
                                       "1 while the tunnel can carry users (/healthz)",
                                       labels=LABELS)
    problem_family = GaugeMetricFamily("nodepass_tunnel_problem",
                                       "1 for the problem that keeps the tunnel from carrying"
                                       " users", labels=LABELS + ["problem"])
    for status in statuses:
        labels = [str(status["name"]), str(status["role"])]
        healthy_family.add_metric(labels, 1.0 if tunnel_healthy(status) else 0.0)
        for problem in health.PROBLEMS:
            problem_family.add_metric(labels + [problem],
                                      1.0 if status.get("problem") == problem else 0.0)
    yield healthy_family
    yield problem_family


def make_registry(tunnels: StatusSource):
    from prometheus_client import CollectorRegistry, ProcessCollector
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TunnelCollector(tunnels))
    registry.register(UdpDropCollector(tunnels))
    ProcessCollector(registry=registry)
    return registry


def tunnel_healthy(status: Dict[str, object]) -> bool:
    """The tunnel can carry users: its role says so (status()["healthy"]),
    and its state is up (a status without a verdict is judged by that alone)."""
    return status["state"] == UP and status.get("healthy", True) is True


def healthy(statuses: List[Dict[str, object]]) -> bool:
    return bool(statuses) and all(tunnel_healthy(status) for status in statuses)


def unhealthy_lines(statuses: List[Dict[str, object]]) -> List[str]:
    """/healthz's 503 body: one line per tunnel that cannot carry users."""
    lines = []
    for status in statuses:
        if tunnel_healthy(status):
            continue
        reason = status.get("health")
        lines.append("%s %s%s" % (status["name"] or status["role"], status["state"],
                                  ": %s" % reason if reason and reason != health.OK else ""))
    return lines or ["no tunnel"]


class MetricsApp:
    """The WSGI application behind --metrics."""

    def __init__(self, tunnels: StatusSource) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        self.tunnels = tunnels
        self._registry = make_registry(tunnels)
        self._generate, self._content_type = generate_latest, CONTENT_TYPE_LATEST

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"GET only\n")
        if path == "/metrics":
            return _reply(start_response, "200 OK", self._generate(self._registry),
                          self._content_type)
        if path == "/status":
            body = json.dumps({"tunnels": self.tunnels()}, indent=1, sort_keys=True)
            return _reply(start_response, "200 OK", body.encode("utf-8") + b"\n",
                          "application/json")
        if path == "/healthz":
            statuses = self.tunnels()
            if healthy(statuses):
                return _reply(start_response, "200 OK", b"ok\n")
            return _reply(start_response, "503 Service Unavailable",
                          ("\n".join(unhealthy_lines(statuses)) + "\n").encode("utf-8"))
        return _reply(start_response, "404 Not Found", b"/metrics, /status or /healthz\n")


def _reply(start_response, status: str, body: bytes, content_type: str = "text/plain"):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class MetricsServer:
    """gevent's WSGI server for MetricsApp; start() raises OSError if the port is taken.
    ``listener``: a socket already listening on ``address`` (bound before the
    tunnels start, so a taken port stops the process before it serves anything)."""

    def __init__(self, address: Address, tunnels: StatusSource, listener=None) -> None:
        self.address = address
        self._server = gevent.pywsgi.WSGIServer(listener or (address.host or "", address.port),
                                                MetricsApp(tunnels), log=None,
                                                error_log=_ErrorLog())

    def start(self) -> None:
        self._server.start()
        log.info("Metrics: http://%s/metrics, /status and /healthz",
                 Address(self.address.host, self._server.server_port))

    @property
    def port(self) -> int:
        return self._server.server_port

    def stop(self) -> None:
        self._server.stop(timeout=1)


class _ErrorLog:
    """pywsgi's error log (tracebacks of a failing request) into our log, as warnings."""

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            log.warning("Metrics: %s", text)

    def flush(self) -> None:
        pass
