"""Master mode: NodePass v1.14's management REST API, served by gevent.pywsgi.

``master://HOST:PORT[/PREFIX]?log=&tls=&crt=&key=&state=DIR`` serves the API
under ``PREFIX/v1`` (default ``/api/v1``), over HTTPS at tls=1 (a self-signed
certificate) or tls=2 (crt=, key=). Routes, bodies and status codes follow
what a v1.14.0 master answers (../shared/wire-v114/transcripts/master-*):
X-API-Key auth (compared in constant time), CORS on every answer, OPTIONS
always 200, ``{"error": "..."}`` refusals. Request bodies are bounded
(MAX_BODY); malformed JSON is a 400 with the reason; unknown fields are
ignored, as v1.14 ignores them. Instances are instances.py's.
"""

import ipaddress
import json
import signal
import socket
import time
from typing import Callable, Optional, Tuple

import gevent
import gevent.lock
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from nodepass_gevent import __version__
from nodepass_gevent.config import ConfigError, parse_address, parse_url
from nodepass_gevent.log import log
from nodepass_gevent.ops import hostinfo, masterevents, masteropenapi, masterprobes
from nodepass_gevent.ops.masterevents import json_text
from nodepass_gevent.ops.instances import (KEY_ID, ApiError, Instances, LogRelay, check_value,
                                           empty_meta)
from nodepass_gevent.ops.masterstate import MasterState, StateError, default_directory
from nodepass_gevent.urls import query_pairs, split_url

MAX_BODY = 64 * 1024
SHUTDOWN_EVENT_WAIT = 0.2  # for the event streams to write "shutdown" before they close
ACTIONS = ("start", "stop", "restart", "reset")
CORS = [("Access-Control-Allow-Headers", "Content-Type, Authorization, X-API-Key, Cache-Control"),
        ("Access-Control-Allow-Methods", "GET, PATCH, POST, PUT, DELETE, OPTIONS"),
        ("Access-Control-Allow-Origin", "*")]
REASONS = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 400: "400 Bad Request",
           401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found",
           405: "405 Method Not Allowed", 409: "409 Conflict", 413: "413 Payload Too Large",
           500: "500 Internal Server Error"}


class MasterUrl:
    """The parts of a master:// URL."""

    def __init__(self, text: str) -> None:
        parts = split_url(text)
        if parts.scheme != "master":
            raise ConfigError("not a master:// URL")
        self.address = parse_address(parts.netloc, "master address", lowest_port=0)
        self.prefix = (parts.path.rstrip("/") or "/api") + "/v1"
        params = dict(query_pairs(parts.query))
        self.log_level = params.get("log", "info")
        self.tls = params.get("tls", "0")
        self.crt, self.key = params.get("crt", ""), params.get("key", "")
        self.state = params.get("state") or default_directory()
        # metrics=HOST:PORT: /metrics, /status and /healthz of the running instances.
        self.metrics = (parse_address(params["metrics"], "metrics= address", lowest_port=0)
                        if params.get("metrics") else None)
        # The TLS checks are the tunnels': a server URL with the same tls=, crt=, key=.
        query = "tls=%s&log=%s" % (self.tls, self.log_level)
        if self.crt or self.key:
            query += "&crt=%s&key=%s" % (self.crt, self.key)
        self.tls_config = parse_url("server://127.0.0.1:2/127.0.0.1:1?" + query)


class MasterApp:
    """The WSGI application."""

    def __init__(self, instances: Instances, master_url: MasterUrl,
                 stopping: Optional[Event] = None) -> None:
        self.instances, self.url = instances, master_url
        self.started = time.monotonic()
        self.tcping_slots = gevent.lock.BoundedSemaphore(10)
        self.probes = masterprobes.Probes(instances, stopping or Event())

    def __call__(self, environ, start_response):
        if (environ.get("PATH_INFO", "") in masterprobes.PATHS
                and environ["REQUEST_METHOD"] in ("GET", "HEAD")):
            return self.probes(environ, start_response)
        try:
            status, body, headers = self.route(environ)
        except ApiError as exc:
            status, body, headers = exc.status, {"error": str(exc)}, []
        except StateError as exc:  # a save failed: the change is not kept
            log.error("master API: %s", exc)
            status, body, headers = 500, {"error": str(exc)}, []
        except Exception as exc:  # a bug of ours: one line, and the API goes on
            log.error("master API: %s %s failed: %r", environ["REQUEST_METHOD"],
                      environ.get("PATH_INFO", ""), exc)
            status, body, headers = 500, {"error": "Internal error"}, []
        if callable(body):  # a stream (SSE)
            start_response(REASONS[status], CORS + headers)
            return body()
        if body is None or isinstance(body, bytes):  # empty, or a page
            start_response(REASONS[status], CORS + headers)
            return [body or b""]
        data = json_text(body)
        start_response(REASONS[status], CORS + [("Content-Type", "application/json")] + headers)
        return [data]

    # -- routing ---------------------------------------------------------

    def route(self, environ) -> Tuple[int, object, list]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        if method == "OPTIONS":
            return 200, None, [("Content-Length", "0")]
        if not path.startswith(self.url.prefix + "/"):
            raise ApiError(404, "Not found")
        path = path[len(self.url.prefix):]
        template = path
        if path.startswith("/instances/") and path.count("/") == 2:
            template = "/instances/{id}"
        if template in masteropenapi.PUBLIC and method == "GET":
            return self.public(template)
        self.authenticate(environ)
        if template not in masteropenapi.ROUTES:
            raise ApiError(404, "Not found")
        if method.lower() not in masteropenapi.ROUTES[template]:
            raise ApiError(405, "Method not allowed")
        if template == "/instances":
            return self.instances_route(method, environ)
        if template == "/instances/{id}":
            return self.instance_route(method, path[len("/instances/"):], environ)
        if template == "/info":
            return self.info(method, environ)
        if template == "/tcping":
            return self.tcping(environ)
        return 200, masterevents.stream(self.instances), [
            ("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]

    def public(self, template: str):
        if template == "/docs":
            return 200, masteropenapi.swagger_page(self.url.prefix), [
                ("Content-Type", "text/html; charset=utf-8")]
        return 200, masteropenapi.document(self.url.prefix), []

    def authenticate(self, environ) -> None:
        given = environ.get("HTTP_X_API_KEY", "")
        if not given:
            raise ApiError(401, "Unauthorized: API key required")
        if not masterprobes.key_matches(given, self.instances.state.key):
            raise ApiError(401, "Unauthorized: Invalid API key")

    # -- instances -------------------------------------------------------

    def instances_route(self, method: str, environ):
        if method == "GET":
            return 200, self.instances.listing(), []
        body = read_json(environ)
        instance = self.instances.create(body.get("url"), body.get("alias", ""))
        return 201, instance.to_json(), []

    def instance_route(self, method: str, instance_id: str, environ):
        if instance_id == KEY_ID:
            return self.key_route(method, environ)
        instance = self.instances.get(instance_id)
        if method == "GET":
            return 200, instance.to_json(), []
        if method == "DELETE":
            self.instances.delete(instance)
            return 204, None, []
        body = read_json(environ)
        if method == "PUT":
            self.instances.replace_url(instance, body.get("url"))
            return 200, instance.to_json(), []
        return 200, self.patch(instance, body), []

    def patch(self, instance, body: dict) -> dict:
        action = body.get("action")
        if action is not None and action not in ACTIONS:
            raise ApiError(400, "Invalid action: %s" % (action,))
        if "alias" in body:
            instance.alias = check_value(body["alias"], "alias")
        if isinstance(body.get("restart"), bool):
            instance.restart = body["restart"]
        if "meta" in body:
            instance.meta = checked_meta(body["meta"])
        self.instances.save()
        reply = instance.to_json()  # as v1.14: the state before the action
        if any(name in body for name in ("alias", "restart", "meta")):
            self.instances.publish("update", instance)
        if action:
            gevent.spawn(self.act, instance, action)
        return reply

    def act(self, instance, action: str) -> None:
        if action in ("stop", "restart"):
            self.instances.stop(instance)
        if action in ("start", "restart"):
            self.instances.start(instance)
        if action == "reset":
            instance.reset_counters()
            self.instances.publish("update", instance)

    def key_route(self, method: str, environ):
        if method == "GET":
            return 200, self.instances.key_json(), []
        if method != "PATCH":
            raise ApiError(403, "Forbidden: API key instance cannot be modified")
        body = read_json(environ)
        if body.get("action") == "restart":
            from nodepass_gevent.ops.masterstate import new_key
            state, old_key = self.instances.state, self.instances.state.key
            state.key = new_key()
            try:
                state.save()
            except StateError:
                state.key = old_key  # a key that is not kept would be lost at a restart
                raise
            log.info("API Key regenerated: %s", self.instances.state.key)
            self.instances.publish("shutdown", None)
        return 200, self.instances.key_json(), []

    # -- host and probes --------------------------------------------------

    def info(self, method: str, environ):
        state = self.instances.state
        if method == "POST":
            state.alias = check_value(read_json(environ).get("alias", ""), "alias")
            state.save()
        body = {"mid": state.mid, "alias": state.alias, "ver": __version__,
                "name": self.url.address.host or hostinfo.hostname(),
                "log": self.url.log_level, "tls": self.url.tls, "crt": self.url.crt,
                "key": self.url.key}
        body.update(hostinfo.figures(self.started))
        return 200, body, []

    def tcping(self, environ):
        target = dict(query_pairs(environ.get("QUERY_STRING", ""))).get("target", "")
        if not target:
            raise ApiError(400, "Target address required")
        with self.tcping_slots:
            return 200, tcping(target), []

def checked_meta(meta) -> dict:
    if not isinstance(meta, dict):
        raise ApiError(400, "Invalid meta: an object is expected")
    result = empty_meta()
    peer = meta.get("peer") if isinstance(meta.get("peer"), dict) else {}
    for name in ("sid", "type", "alias"):
        result["peer"][name] = check_value(peer.get(name, ""), "peer " + name)
    tags = meta.get("tags") if isinstance(meta.get("tags"), dict) else {}
    result["tags"] = {check_value(name, "tag"): check_value(value, "tag")
                      for name, value in tags.items()}
    return result


def read_json(environ) -> dict:
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        raise ApiError(400, "Invalid request body: bad Content-Length") from None
    if length > MAX_BODY:
        raise ApiError(413, "Request body larger than %d bytes" % MAX_BODY)
    # No length: a chunked body (or none), read up to one byte past the bound.
    data = environ["wsgi.input"].read(length if length >= 0 else MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise ApiError(413, "Request body larger than %d bytes" % MAX_BODY)
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "Invalid request body: %s" % exc) from None
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid request body: a JSON object is expected")
    return body


def tcping(target: str) -> dict:
    host, _, port = target.rpartition(":")
    started = time.monotonic()
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        sock.close()
    except (OSError, ValueError) as exc:
        return {"target": target, "connected": False, "latency": 0,
                "error": "dial tcp %s: %s" % (target, getattr(exc, "strerror", None) or exc)}
    latency = int((time.monotonic() - started) * 1000)
    return {"target": target, "connected": True, "latency": latency, "error": None}


# -- the process -------------------------------------------------------------


def serve(master_url: MasterUrl, settings, build: Callable, listener=None,
          stop: Optional[Event] = None) -> None:
    """Run the master until SIGTERM/SIGINT (or ``stop``); StateError, ConfigError up.
    ``build`` makes a tunnel's role (service.build: the layer above gives it)."""
    from nodepass_gevent.copy import tls
    state = MasterState(master_url.state).load()
    if state.created_key:
        log.info("API Key created: %s", state.key)
    instances = Instances(state, settings, master_url.log_level, build)
    relay = LogRelay(instances, log.handlers[0].formatter if log.handlers else None)
    log.addHandler(relay)
    context = tls.server_context(master_url.tls_config)
    if listener is None:
        from nodepass_gevent.base import net
        listener = net.listen_tcp(master_url.address, role="master API")
    stop = stop or Event()
    server = WSGIServer(listener, MasterApp(instances, master_url, stop), log=None,
                        error_log=_ErrorLog(), **({"ssl_context": context} if context else {}))
    metrics = _metrics_server(master_url, instances)
    server.start()
    host, port = listener.getsockname()[:2]
    log.info("Master API listening on %s://%s:%d%s", "https" if context else "http",
             host, port, master_url.prefix)
    warning = clear_text_warning(master_url)
    if warning:
        log.warning("%s", warning)
    instances.start_saved()
    handlers = [gevent.signal_handler(signal.SIGTERM, stop.set),
                gevent.signal_handler(signal.SIGINT, stop.set)]
    try:
        stop.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        _shut_down(instances, server, metrics)
        log.removeHandler(relay)
        log.info("Stopped")


def _shut_down(instances: Instances, server: WSGIServer, metrics) -> None:
    """The streams get their ``shutdown`` event (a moment to write it), the
    API and metrics= ports close, and every instance stops, all at once:
    a SIGTERM takes well under a second (test_sigterm_is_fast...)."""
    instances.publish("shutdown", None)
    deadline = time.monotonic() + SHUTDOWN_EVENT_WAIT
    while instances.subscribers and time.monotonic() < deadline:
        gevent.sleep(0.01)
    closing = [gevent.spawn(server.stop, timeout=0.2)]
    if metrics is not None:
        closing.append(gevent.spawn(metrics.stop))
    instances.stop_all()
    gevent.joinall(closing, timeout=0.5)


class _ErrorLog:
    """pywsgi's error log (a failing stream's traceback) as one warning line."""

    def write(self, text: str) -> None:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if lines:
            log.warning("master API: %s", lines[-1].strip())


def _metrics_server(master_url: MasterUrl, instances: Instances):
    """The metrics= server over every running instance (None without metrics=)."""
    if master_url.metrics is None:
        return None
    from nodepass_gevent.base import net
    from nodepass_gevent.ops.metrics import MetricsServer
    listener = net.listen_tcp(master_url.metrics, role="master metrics= port")
    server = MetricsServer(master_url.metrics, instances.statuses, listener)
    server.start()
    return server


def clear_text_warning(master_url: MasterUrl) -> Optional[str]:
    """The warning for an API off loopback without TLS (None if it is fine)."""
    if master_url.tls != "0" or is_loopback(master_url.address.host):
        return None
    return ("the master API on %s has no TLS: the API key crosses the network in clear;"
            " use tls=1 or tls=2" % master_url.address)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name


def main(text: str, build: Callable) -> int:
    """``nodepass master://...``: the CLI's exit status (2: a bad URL or state)."""
    import sys
    from nodepass_gevent import log as logging_setup
    from nodepass_gevent.base.net import BindError
    from nodepass_gevent.config import load_settings
    from nodepass_gevent.ops.masterstate import StateError
    try:
        master_url = MasterUrl(text)
        settings = load_settings()
        logging_setup.setup(master_url.log_level)
        serve(master_url, settings, build)
    except (ConfigError, StateError) as exc:
        print("nodepass: error: %s" % exc, file=sys.stderr)
        return 2
    except BindError as exc:
        print("nodepass: error: %s" % exc, file=sys.stderr)
        return 1
    return 0
