"""The master's own probes, on its API port beside ``PREFIX/v1`` (not under it):

    /healthz  without the key: 200 "ok" while the API serves and the state
              directory can be written (its last save worked), else 503 and
              one line saying why. For systemd, a load balancer, a watchdog.
    /metrics  Prometheus text (metrics.py's) over every instance, by its id,
    /status   and the same as JSON ({"tunnels": [...]}). Both need the key:
              ``X-API-Key: KEY``, or ``Authorization: Bearer KEY`` (what
              Prometheus sends with ``authorization: {credentials: KEY}``).

``metrics=HOST:PORT`` on the master URL serves /metrics, /status and
/healthz of the instances on a port of their own, without the key (bind it
to loopback), as ``--metrics`` does for the CLI's tunnels.
"""

import hmac
import os
from typing import Optional

from nodepass_gevent.ops.masterevents import json_text
from nodepass_gevent.ops.masterstate import StateError

PATHS = ("/healthz", "/metrics", "/status")
BEARER = "Bearer "


def state_problem(state) -> Optional[str]:
    """Why the state directory cannot take the next save (None if it can);
    after a failed save, the retried save's failure."""
    if state.last_error:  # changes not on disk: write them now, if it works again
        try:
            state.save()
        except StateError:
            return state.last_error
    directory = state.directory
    if not os.path.isdir(directory):
        return "the state directory %s is gone" % directory
    try:
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
    except OSError as exc:
        return "the state directory %s: %s" % (directory, exc.strerror or exc)
    if read_only or not os.access(directory, os.W_OK | os.X_OK):
        return "the state directory %s is not writable" % directory
    return None


def key_matches(given: str, key: str) -> bool:
    """Constant-time comparison (hmac.compare_digest) of a presented key."""
    return hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))


class Probes:
    """The WSGI handler of PATHS; ``metrics_app`` (metrics.MetricsApp over the
    instances' statuses) is made at the first /metrics or /status call."""

    def __init__(self, instances, stopping) -> None:
        self.instances, self.stopping = instances, stopping
        self._metrics_app = None

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return self.healthz(start_response)
        given = presented_key(environ)
        if not given:
            return _json(start_response, "401 Unauthorized",
                         {"error": "Unauthorized: API key required"})
        if not key_matches(given, self.instances.state.key):
            return _json(start_response, "401 Unauthorized",
                         {"error": "Unauthorized: Invalid API key"})
        if self._metrics_app is None:
            from nodepass_gevent.ops.metrics import MetricsApp
            self._metrics_app = MetricsApp(self.instances.statuses)
        return self._metrics_app(environ, start_response)

    def healthz(self, start_response):
        problem = ("the master is stopping" if self.stopping.is_set()
                   else state_problem(self.instances.state))
        if problem is None:
            return _text(start_response, "200 OK", "ok\n")
        return _text(start_response, "503 Service Unavailable", problem + "\n")


def presented_key(environ) -> str:
    given = environ.get("HTTP_X_API_KEY", "")
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if not given and authorization.startswith(BEARER):
        given = authorization[len(BEARER):].strip()
    return given


def _text(start_response, status: str, text: str):
    body = text.encode("utf-8")
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _json(start_response, status: str, value):
    body = json_text(value)
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]
