"""The master's instances: our tunnels, run in the master's own process.

Each instance is one tunnel URL (server:// or client://, any parameter the
CLI takes) run by a Fleet of its own (fleet.py, restart_failed off), so a
tunnel that cannot start or that fails later only turns its own status to
``error``; the API and the other instances go on. Status means what v1.14
says: ``running`` (started), ``stopped`` (stopped or never started),
``error`` (it could not start, or failed). The figures v1.14 reads from a
child's CHECK_POINT lines come here from the tunnel's own Stats.

Every change is saved at once (masterstate.py) and published to the event
subscribers (the /events streams) as a dict ``{"type", "instance"}``.
"""

import binascii
import logging
import os
from typing import Callable, Dict, List, Optional

import gevent
import gevent.lock

from nodepass_gevent.base import health
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import ConfigError, Settings
from nodepass_gevent.log import log
from nodepass_gevent.ops.masterstate import MasterState
from nodepass_gevent.tunnelset import parse_tunnel
from nodepass_gevent.urls import query_pairs, split_url

KEY_ID = "********"  # v1.14's pseudo-instance that carries the API key
MAX_VALUE = 256      # v1.14 refuses longer aliases, tags, peer fields
MAX_URL = 4096
FIGURES_INTERVAL = 5.0  # v1.14's CHECK_POINT period: one update event each
STOP_GRACE = 5.0        # v1.14 gives a child 5 s after SIGTERM
STOP_ALL_WAIT = 0.5     # at the master's stop, for every instance's listeners to close
ERROR_RETRY = 3600.0    # v1.14 restarts instances in error hourly
# Stats counters (by status() name) the figures read; "reset" takes a baseline of each.
COUNTERS = ("bytes_in", "bytes_out", "udp_bytes_in", "udp_bytes_out")
TRAFFIC = ("tcprx", "tcptx", "udprx", "udptx")  # v1.14's names of those figures


class ApiError(Exception):
    """A refusal with its HTTP status and v1.14's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def empty_meta() -> dict:
    return {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}}


def normalise_url(url: str, log_level: str) -> str:
    """The URL as v1.14 shows it: log= the master's when absent, query keys sorted."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "Invalid URL")
    if len(url) > MAX_URL:
        raise ApiError(400, "URL longer than %d characters" % MAX_URL)
    try:
        parts = split_url(url)
    except ValueError as exc:
        raise ApiError(400, "Invalid URL: %s" % exc) from None
    if parts.scheme not in ("server", "client"):
        raise ApiError(400, "Invalid URL scheme")
    pieces = [piece for piece in parts.query.split("&") if piece]
    if not any(name == "log" for name, _ in query_pairs(parts.query, True)):
        pieces.append("log=" + log_level)
    pieces.sort()
    text = "%s://%s%s" % (parts.scheme, parts.netloc, parts.path)
    if pieces:
        text += "?" + "&".join(pieces)
    return text + ("#" + parts.fragment if parts.fragment else "")


# v1.14 parameters our tunnels do not take, with the values that ask for what
# they do anyway: mode=0 (auto) or 1 (reverse) for a server, 0 or 2 (dual-end)
# for a client. A dashboard's URL carries them; they are kept in ``url``.
V114_MODES = {"server": ("0", "1"), "client": ("0", "2")}


def runnable_url(url: str) -> str:
    """The URL our CLI would run: v1.14's ``mode=`` taken out (ConfigError
    for a mode ours does not have)."""
    parts = split_url(url)
    pieces = []
    for piece in (piece for piece in parts.query.split("&") if piece):
        name, _, value = piece.partition("=")
        if name != "mode":
            pieces.append(piece)
        elif value not in V114_MODES.get(parts.scheme, ()):
            raise ConfigError("mode=%s is not supported: a %s here runs mode %s"
                              % (value, parts.scheme, " or ".join(V114_MODES[parts.scheme])))
    text = "%s://%s%s" % (parts.scheme, parts.netloc, parts.path)
    return text + ("?" + "&".join(pieces) if pieces else "") + (
        "#" + parts.fragment if parts.fragment else "")


def expanded_url(url: str, settings: Settings) -> str:
    """v1.14's ``config``: the URL with the values in force written out where
    it leaves them to a default (our parameters, not v1.14's), keys sorted."""
    tunnel = parse_tunnel(runnable_url(url), settings, "config")
    config, tuned = tunnel.config, tunnel.settings
    defaults = {"log": config.log_level, "tls": str(config.tls_mode),
                "max": str(tuned.max_pool_capacity), "slot": str(tuned.semaphore_limit)}
    if config.role == "server":
        defaults.update({"udp": config.udp_mode, "data_port": str(config.data_port),
                         "proxy": str(config.proxy_version)})
    else:
        defaults["min"] = str(tuned.min_pool_capacity)
    parts = split_url(url)
    given = {name for name, _ in query_pairs(parts.query, True)}
    pieces = [piece for piece in parts.query.split("&") if piece]
    pieces += ["%s=%s" % (name, value) for name, value in defaults.items() if name not in given]
    return "%s://%s%s?%s" % (parts.scheme, parts.netloc, parts.path, "&".join(sorted(pieces)))


class Instance:
    """One saved tunnel and, while it runs, its Fleet."""

    def __init__(self, record: dict) -> None:
        self.id = record["id"]
        self.alias = str(record.get("alias") or "")
        self.url = record["url"]
        self.restart = bool(record.get("restart", True))
        self.meta = record.get("meta") if isinstance(record.get("meta"), dict) else empty_meta()
        self.type = split_url(self.url).scheme
        self.config = record.get("config") or self.url
        self.status = "stopped"
        self.error = ""
        self.fleet = None
        self.watcher = None  # type: Optional[gevent.Greenlet]
        self.lock = gevent.lock.RLock()  # one start or stop at a time
        # The traffic counters at the last "reset" (the role's own Stats are
        # never rewritten: its gauges and report line stay right).
        self.baseline = dict.fromkeys(COUNTERS, 0)
        self.mode = 0  # v1.14 keeps the last mode seen (0 until the tunnel was up)
        self.last = dict.fromkeys(("mode", "ping", "pool", "tcps", "udps") + TRAFFIC, 0)

    def record(self) -> dict:
        return {"id": self.id, "alias": self.alias, "url": self.url, "config": self.config,
                "restart": self.restart, "meta": self.meta}

    def role_status(self) -> dict:
        statuses = self.fleet.statuses() if self.fleet is not None else []
        return statuses[0] if statuses else {}

    def idle_status(self) -> dict:
        """status() of an instance that does not run: its definition, zero counters."""
        parts = split_url(self.url)
        state = "failed" if self.status == "error" else "stopped"
        status = dict.fromkeys(Stats.FIELDS, 0)
        status.update({"name": self.id, "role": self.type, "state": state, "error": self.error,
                       "tunnel": parts.netloc.rpartition("@")[2], "target": parts.path[1:],
                       "peer": None, "data_port": None, "pool_idle": 0,
                       "tls": dict(query_pairs(parts.query)).get("tls", ""),
                       "pool_capacity": 0, "udp_datagrams": 0, "last_heartbeat_age": None,
                       "control_rtt": None})
        status.update(health.not_running(state, self.error))
        return status

    def reset_counters(self) -> None:
        status = self.role_status()
        self.baseline = {name: status.get(name, 0) for name in COUNTERS}
        self.last.update(dict.fromkeys(TRAFFIC, 0))

    def figures(self) -> dict:
        """v1.14's figures from the role's status(): ``mode`` 1 for a server
        (reverse: it takes the users) and 2 for a client (dual-end: it dials
        the target) once the tunnel has been up; ``ping`` the control
        connection's round trip in ms, as the kernel measured it. A stopped
        instance keeps its last traffic counters and mode, as in v1.14."""
        if self.fleet is None:
            return self.last
        status = self.role_status()
        if status.get("state") == "up":
            self.mode = 1 if self.type == "server" else 2
        counted = {name: status.get(name, 0) - self.baseline[name] for name in COUNTERS}
        rtt = status.get("control_rtt")
        self.last = {"mode": self.mode, "ping": int(rtt * 1000) if rtt is not None else 0,
                     "pool": status.get("pool_idle", 0), "tcps": status.get("tcp_active", 0),
                     "udps": status.get("udp_flows_active", 0),
                     "tcprx": counted["bytes_in"] - counted["udp_bytes_in"],
                     "tcptx": counted["bytes_out"] - counted["udp_bytes_out"],
                     "udprx": counted["udp_bytes_in"], "udptx": counted["udp_bytes_out"]}
        return self.last

    def stopped_figures(self) -> None:
        """Keep the last counters of a tunnel being stopped (gauges to 0)."""
        self.last = dict(self.figures(), ping=0, pool=0, tcps=0, udps=0)

    def to_json(self) -> dict:
        body = {"id": self.id, "alias": self.alias, "type": self.type, "status": self.status,
                "url": self.url, "config": self.config, "restart": self.restart,
                "meta": self.meta}
        body.update(self.figures())
        return body


class Instances:
    """Every instance of the master; see the module docstring."""

    def __init__(self, state: MasterState, settings: Settings, log_level: str,
                 build: Callable) -> None:
        self.state, self.settings, self.log_level = state, settings, log_level
        self._build = build  # service.build: (config, settings, ssl_context, name) -> role
        self._by_id = {}  # type: Dict[str, Instance]
        self.subscribers = set()  # callables taking one event dict
        for record in state.instances:
            try:
                instance = Instance(record)
            except (KeyError, ValueError):
                continue
            self._by_id[instance.id] = instance
        self._ticker = None  # type: Optional[gevent.Greenlet]
        self._retrier = None  # type: Optional[gevent.Greenlet]

    # -- reading -------------------------------------------------------

    def key_json(self) -> dict:
        body = {"id": KEY_ID, "alias": "", "type": "", "status": "", "url": self.state.key,
                "config": self.state.mid, "restart": False, "meta": empty_meta()}
        body.update({name: 0 for name in ("mode", "ping", "pool", "tcps", "udps", "tcprx",
                                          "tcptx", "udprx", "udptx")})
        return body

    def listing(self) -> List[dict]:
        return [instance.to_json() for instance in self._by_id.values()] + [self.key_json()]

    def get(self, instance_id: str) -> Instance:
        instance = self._by_id.get(instance_id)
        if instance is None:
            raise ApiError(404, "Instance not found")
        return instance

    def statuses(self) -> List[dict]:
        """Each instance's tunnel status (its name is the instance id; a stopped
        or failed one with zero counters), for /metrics and /status."""
        return [instance.role_status() or instance.idle_status() for instance in self.all()]

    def all(self) -> List[Instance]:
        return list(self._by_id.values())

    # -- changing ------------------------------------------------------

    def create(self, url: str, alias: str = "") -> Instance:
        url = self.checked_url(url)
        instance_id = binascii.hexlify(os.urandom(4)).decode("ascii")
        while instance_id in self._by_id:
            instance_id = binascii.hexlify(os.urandom(4)).decode("ascii")
        instance = Instance({"id": instance_id, "alias": check_value(alias, "alias"),
                             "url": url, "config": expanded_url(url, self.settings),
                             "restart": True})
        self._by_id[instance_id] = instance
        self.save()
        self.publish("create", instance)
        gevent.spawn(self.start, instance)  # as v1.14: the reply says "stopped"
        return instance

    def checked_url(self, url: str) -> str:
        url = normalise_url(url, self.log_level)
        try:
            parse_tunnel(runnable_url(url), self.settings, "check")
        except ConfigError as exc:
            raise ApiError(400, "Invalid URL: %s" % exc) from None
        return url

    def replace_url(self, instance: Instance, url: str) -> None:
        url = self.checked_url(url)
        if url == instance.url:
            raise ApiError(409, "Instance URL conflict")
        self.stop(instance)
        instance.url, instance.type = url, split_url(url).scheme
        instance.config = expanded_url(url, self.settings)
        self.save()
        self.start(instance)

    def delete(self, instance: Instance) -> None:
        self._by_id.pop(instance.id, None)
        self.save()
        self.stop(instance, publish=False)
        self.publish("delete", instance)

    def save(self) -> None:
        self.state.instances = [instance.record() for instance in self._by_id.values()]
        self.state.save()

    # -- running -------------------------------------------------------

    def start(self, instance: Instance) -> None:
        with instance.lock:
            self._start(instance)

    def _start(self, instance: Instance) -> None:
        if instance.fleet is not None or instance.id not in self._by_id:
            return  # running already, or deleted meanwhile
        from nodepass_gevent.ops.fleet import Fleet, StartError, server_context
        try:
            tunnel = parse_tunnel(runnable_url(instance.url), self.settings, instance.id)
            fleet = Fleet(self._build, restart_failed=False)
            fleet.start([tunnel], {tunnel.name: server_context(tunnel)})
        except (ConfigError, StartError, OSError) as exc:
            log.error("%s: cannot start: %s", instance.id, exc)
            instance.status, instance.error = "error", str(exc)
            self.publish("update", instance)
            return
        instance.fleet, instance.status, instance.error = fleet, "running", ""
        instance.baseline = dict.fromkeys(COUNTERS, 0)  # fresh Stats
        instance.watcher = gevent.spawn(self._watch, instance, fleet)
        self.publish("update", instance)

    def _watch(self, instance: Instance, fleet) -> None:
        fleet.failed.wait()
        if instance.fleet is not fleet:
            return
        log.error("%s: the tunnel failed", instance.id)
        self.stop(instance, publish=False)
        instance.status, instance.error = "error", "failed"
        self.publish("update", instance)

    def stop(self, instance: Instance, publish: bool = True) -> None:
        with instance.lock:
            self._stop(instance, publish)

    def _stop(self, instance: Instance, publish: bool) -> None:
        instance.stopped_figures()
        fleet, instance.fleet = instance.fleet, None
        if instance.watcher is not None and instance.watcher is not gevent.getcurrent():
            instance.watcher.kill(block=False)
        instance.watcher = None
        instance.status = "stopped"
        if fleet is not None:
            fleet.stop(STOP_GRACE)
        if publish:
            self.publish("update", instance)

    def start_saved(self) -> None:
        """At the master's start: every restart=true instance runs again."""
        for instance in self.all():
            if instance.restart:
                self.start(instance)
        self._ticker = gevent.spawn(self._publish_figures_forever)
        self._retrier = gevent.spawn(self._retry_errors_forever)

    def stop_all(self) -> None:
        """At the master's stop: every instance at once, without a drain (v1.14's
        children get a SIGTERM each); the state file keeps them as they are."""
        gevent.killall([greenlet for greenlet in (self._ticker, self._retrier)
                        if greenlet is not None], block=False)
        stops = []
        for instance in self.all():
            fleet, instance.fleet = instance.fleet, None
            if fleet is not None:
                stops.append(gevent.spawn(fleet.stop, 0))
        gevent.joinall(stops, timeout=STOP_ALL_WAIT)

    def _retry_errors_forever(self) -> None:
        while True:
            gevent.sleep(ERROR_RETRY)
            for instance in self.all():
                if instance.status == "error":
                    log.info("%s: in error for an hour: starting it again", instance.id)
                    self.start(instance)

    # -- events --------------------------------------------------------

    def publish(self, kind: str, instance: Optional[Instance], logs: str = "") -> None:
        if not self.subscribers:
            return  # no stream listens: not even the figures are worth reading
        body = instance.to_json() if instance is not None else None
        event = {"type": kind, "instance": body, "logs": logs}
        for subscriber in list(self.subscribers):
            subscriber(event)

    def _publish_figures_forever(self) -> None:
        while True:
            gevent.sleep(FIGURES_INTERVAL)
            for instance in self.all():
                if instance.status == "running":
                    self.publish("update", instance)


class LogRelay(logging.Handler):
    """Sends each log line of an instance's tunnel (its records carry the
    instance id as ``tunnel``) to the event streams as a ``log`` event."""

    def __init__(self, instances: Instances, formatter: Optional[logging.Formatter]) -> None:
        super().__init__()
        self.instances = instances
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        instance = self.instances._by_id.get(getattr(record, "tunnel", "") or "")
        if instance is None or not self.instances.subscribers:
            return
        try:
            line = self.format(record)
        except Exception:  # a bad format string: the process's own handler reports it
            return
        self.instances.publish("log", instance, line)


def check_value(value, what: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "Invalid %s: a string is expected" % what)
    if len(value) > MAX_VALUE:
        raise ApiError(400, "%s exceeds %d characters" % (what.capitalize(), MAX_VALUE))
    return value
