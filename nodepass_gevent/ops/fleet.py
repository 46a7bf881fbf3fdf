"""The running tunnels of one process: start them, keep them up, reload them.

A Fleet holds one role (server.Server or client.Client) per tunnel name.
Each tunnel has its own counters, pool, semaphore and cooldown (they live in
its role); the fleet only starts, stops and replaces roles:

- a tunnel whose role fails (role.failed: a crashed loop) is logged, stopped
  and started afresh after its SERVICE_COOLDOWN; the others never notice.
  A lone command-line URL instead ends the process, as it always has, so a
  service manager restarts it (``restart_failed=False``);
- ``apply(tunnels)`` (a reload) compares by name and definition: added ones
  start, removed ones stop accepting and drain for their SHUTDOWN_TIMEOUT,
  changed ones are replaced the same way, unchanged ones are not touched;
- ``reload_certificates()`` re-reads every tls=2 server's crt/key into a new
  context for its next data connections; a file that no longer loads is
  logged and the old context kept.
"""

import hashlib
import ssl
import time
from typing import Callable, Dict, List, Optional, Sequence

import gevent
from gevent.event import Event

from nodepass_gevent.base import health
from nodepass_gevent.base.net import BindError
from nodepass_gevent.config import TLS_VERIFIED, ConfigError
from nodepass_gevent.copy import tls
from nodepass_gevent.log import log
from nodepass_gevent.tunnelset import Tunnel, diff

# A replaced server's listeners close at the start of its stop; its successor
# retries binding for this long before counting the start as failed.
REBIND_WAIT = 2.0
REBIND_INTERVAL = 0.05


class StartError(Exception):
    """A tunnel could not start (a port in use, an address that does not resolve)."""


def server_context(tunnel: Tunnel) -> Optional[ssl.SSLContext]:
    """The tunnel's TLS context (None for a client or tls=0); ConfigError naming it."""
    if tunnel.config.role != "server":
        return None
    try:
        return tls.server_context(tunnel.config)
    except ConfigError as exc:
        if not tunnel.name:
            raise
        raise ConfigError("tunnel %s: %s" % (tunnel.describe(), exc)) from None


def certificate_digest(tunnel: Tunnel) -> Optional[bytes]:
    """A digest of the tls=2 files, to tell a renewed certificate from the same one."""
    if tunnel.config.role != "server" or tunnel.config.tls_mode != TLS_VERIFIED:
        return None  # a client's tls= is the least mode it accepts: no files
    digest = hashlib.sha256()
    for path in (tunnel.config.crt, tunnel.config.key):
        try:
            with open(path, "rb") as stream:
                digest.update(stream.read())
        except OSError:
            return None
    return digest.digest()


class Entry:
    """One tunnel of the fleet: its definition and its current role (None while
    it waits to be started again)."""

    def __init__(self, tunnel: Tunnel, ssl_context: Optional[ssl.SSLContext]) -> None:
        self.tunnel = tunnel
        self.ssl_context = ssl_context
        self.role = None
        self.restart = None  # type: Optional[gevent.Greenlet]
        self.watcher = None  # type: Optional[gevent.Greenlet]
        self.certificate = certificate_digest(tunnel)
        self.failure = ""  # why it is not running, for status()


class Fleet:
    """See the module docstring."""

    def __init__(self, build: Callable, restart_failed: bool = True) -> None:
        self._build = build  # (config, settings, ssl_context, name) -> role
        self.restart_failed = restart_failed
        self._entries = {}  # type: Dict[str, Entry]
        self._draining = set()  # greenlets stopping removed or replaced roles
        self.failed = Event()  # set when a tunnel fails and restart_failed is off
        self.changed = Event()  # set (and cleared by the waiter) when roles come or go

    # -- the set ---------------------------------------------------------

    @property
    def tunnels(self) -> List[Tunnel]:
        return [entry.tunnel for entry in self._entries.values()]

    def roles(self) -> list:
        return [entry.role for entry in self._entries.values() if entry.role is not None]

    def start(self, tunnels: Sequence[Tunnel], contexts: Dict[str, Optional[ssl.SSLContext]]
              ) -> None:
        """Start every tunnel; StartError (after stopping those started) if one cannot."""
        try:
            for tunnel in tunnels:
                entry = Entry(tunnel, contexts.get(tunnel.name))
                self._entries[tunnel.name] = entry
                self._start_role(entry, rebind_wait=0)
        except BindError as exc:
            message = str(exc) if not tunnels[0].name else "tunnel %s: %s" % (
                tunnel.describe(), exc)
            self.stop(0)
            raise StartError(message) from None

    def apply(self, tunnels: Sequence[Tunnel]) -> str:
        """Reload to ``tunnels`` (already checked); ConfigError if a new or changed
        server's certificate does not load, before anything changes. Returns a
        summary line."""
        added, removed, changed, unchanged = diff(self.tunnels, tunnels)
        contexts = {tunnel.name: server_context(tunnel) for tunnel in added + changed}
        for tunnel in removed:
            self._retire(self._entries.pop(tunnel.name))
        for tunnel in changed:
            self._retire(self._entries.pop(tunnel.name))
        order = {tunnel.name: index for index, tunnel in enumerate(tunnels)}
        for tunnel in added + changed:
            entry = Entry(tunnel, contexts[tunnel.name])
            self._entries[tunnel.name] = entry
            self._start_or_retry(entry)
        # Keep the file's order (for /status, and the order of stop).
        self._entries = dict(sorted(self._entries.items(), key=lambda item: order[item[0]]))
        self.changed.set()
        return "%d added, %d removed, %d changed, %d unchanged" % (
            len(added), len(removed), len(changed), len(unchanged))

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop every tunnel at once, each draining for up to ``timeout``
        (None: its own SHUTDOWN_TIMEOUT), and wait for the drains."""
        entries = list(self._entries.values())
        self._entries = {}
        for entry in entries:
            self._retire(entry, timeout)
        gevent.joinall(list(self._draining), timeout=self.grace(entries, timeout) + 2)

    @staticmethod
    def grace(entries, timeout: Optional[float] = None) -> float:
        if timeout is not None:
            return timeout
        return max([entry.tunnel.settings.shutdown_timeout for entry in entries] or [0.0])

    def shutdown_grace(self) -> float:
        """The longest drain a stop of every tunnel takes (their SHUTDOWN_TIMEOUTs)."""
        return self.grace(list(self._entries.values()))

    def ready(self) -> bool:
        """True once every tunnel is listening (server) or has its tunnel open (client)."""
        roles = self.roles()
        return len(roles) == len(self._entries) and all(role.ready.is_set() for role in roles)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready():
            waits = [role.ready for role in self.roles() if not role.ready.is_set()]
            self.changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            gevent.wait(waits + [self.changed], timeout=remaining, count=1)
        return True

    def statuses(self) -> List[dict]:
        statuses = []
        for entry in list(self._entries.values()):
            if entry.role is not None:
                statuses.append(entry.role.status())
            else:
                statuses.append(_placeholder_status(entry))
        return statuses

    def report(self) -> None:
        for role in self.roles():
            role.report()

    # -- certificates -----------------------------------------------------

    def reload_certificates(self) -> None:
        for entry in list(self._entries.values()):
            config = entry.tunnel.config
            if config.role == "server" and config.tls_mode == TLS_VERIFIED:
                self._reload_certificate(entry)

    def _reload_certificate(self, entry: Entry) -> None:
        digest = certificate_digest(entry.tunnel)
        if digest is not None and digest == entry.certificate:
            return  # the same files: nothing to do
        config = entry.tunnel.config
        prefix = entry.tunnel.name + ": " if entry.tunnel.name else ""
        try:
            # A fresh context first: a broken pair must not touch the live one,
            # which a failed load_cert_chain could leave half-changed.
            tls.server_context(config)
            # Then the live context itself, shared by the role's data port:
            # every handshake from now on presents the new certificate.
            entry.ssl_context.load_cert_chain(config.crt, config.key)
        except (ConfigError, ssl.SSLError, OSError) as exc:
            log.error("%sTLS: keeping the certificate in use: %s", prefix, exc)
            return
        entry.certificate = digest
        log.info("%sTLS: certificate %s reloaded for new data connections", prefix, config.crt)

    # -- one tunnel ----------------------------------------------------------

    def _start_role(self, entry: Entry, rebind_wait: float) -> None:
        """Build and start the entry's role; BindError after ``rebind_wait``."""
        tunnel = entry.tunnel
        role = self._build(tunnel.config, tunnel.settings, entry.ssl_context, tunnel.name)
        deadline = time.monotonic() + rebind_wait
        while True:
            try:
                role.start()
                break
            except BindError:
                role.close()
                if time.monotonic() >= deadline:
                    raise
                gevent.sleep(REBIND_INTERVAL)
                role = self._build(tunnel.config, tunnel.settings, entry.ssl_context,
                                   tunnel.name)
        entry.role, entry.failure = role, ""
        entry.watcher = gevent.spawn(self._watch, entry, role)
        self.changed.set()

    def _start_or_retry(self, entry: Entry) -> None:
        try:
            self._start_role(entry, REBIND_WAIT)
        except BindError as exc:
            self._schedule_restart(entry, str(exc))

    def _watch(self, entry: Entry, role) -> None:
        role.failed.wait()
        if self._entries.get(entry.tunnel.name) is not entry or entry.role is not role:
            return  # retired meanwhile
        if not self.restart_failed:
            self.failed.set()
            return
        self._retire_role(entry, 0)
        self._schedule_restart(entry, "failed")

    def _schedule_restart(self, entry: Entry, why: str) -> None:
        cooldown = entry.tunnel.settings.service_cooldown
        entry.failure = why
        log.error("%s: %s; starting it again in %.1fs", entry.tunnel.name, why, cooldown)
        entry.restart = gevent.spawn_later(cooldown, self._restart, entry)
        self.changed.set()

    def _restart(self, entry: Entry) -> None:
        if self._entries.get(entry.tunnel.name) is not entry:
            return
        entry.restart = None
        self._start_or_retry(entry)
        if entry.role is not None:
            log.info("%s: started again", entry.tunnel.name)

    def _retire(self, entry: Entry, timeout: Optional[float] = None) -> None:
        """Stop the entry's role in the background, draining for its SHUTDOWN_TIMEOUT."""
        if entry.restart is not None:
            entry.restart.kill(block=False)
        self._retire_role(entry, entry.tunnel.settings.shutdown_timeout
                          if timeout is None else timeout)
        self.changed.set()

    def _retire_role(self, entry: Entry, timeout: float) -> None:
        role, entry.role = entry.role, None
        if entry.watcher is not None and entry.watcher is not gevent.getcurrent():
            entry.watcher.kill(block=False)
        if role is None:
            return
        drain = gevent.spawn(role.stop, timeout)
        self._draining.add(drain)
        drain.link(self._draining.discard)
        gevent.sleep(0)  # let the stop close the listeners before a successor binds


def _placeholder_status(entry: Entry) -> dict:
    """status() of a tunnel waiting to start again: its definition, zero counters."""
    config = entry.tunnel.config
    status = {"name": entry.tunnel.name, "role": config.role, "state": "failed",
              "error": entry.failure, "tunnel": str(config.tunnel), "target": str(config.target),
              "peer": None, "data_port": None, "tls": config.tls_mode, "pool_idle": 0,
              "pool_capacity": 0, "tcp_active": 0, "tcp_total": 0, "udp_datagrams": 0,
              "udp_flows_active": 0, "bytes_in": 0, "bytes_out": 0, "udp_bytes_in": 0,
              "udp_bytes_out": 0, "control_rtt": None, "data_dials": 0,
              "data_dial_failures": 0, "reconnects": 0, "auth_failures": 0, "tls_failures": 0,
              "semaphore_waits": 0, "users_dropped": 0, "target_failures": 0,
              "last_heartbeat_age": None}
    status.update(health.not_running("failed", entry.failure))
    return status
