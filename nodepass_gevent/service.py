"""Run the process's tunnels until SIGTERM/SIGINT, then stop them gracefully.

Signal handlers only set an event; the work runs in the main greenlet.
SIGUSR1 logs every tunnel's traffic line at once; SIGUSR2, only with
NODEPASS_DEBUG_COUNTS=1, logs greenlet/descriptor/memory figures (debug.py). SIGHUP reloads: the
tunnels file if there is one (fleet.Fleet.apply), and every tls=2
certificate, which is also re-read each RELOAD_INTERVAL. systemd hears
READY=1 once every tunnel listens or has its tunnel open, RELOADING=1 and
READY=1 around a reload, STOPPING=1 on the way out, and WATCHDOG=1 if the
unit asks for it (systemd.py).
"""

import signal
import ssl
from typing import Callable, Dict, List, Optional, Sequence

import gevent
from gevent.event import Event

from nodepass_gevent.base import net
from nodepass_gevent.config import Address, Config, ConfigError, Settings
from nodepass_gevent.log import log
from nodepass_gevent.ops import debug, systemd
from nodepass_gevent.ops.fleet import Fleet, StartError
from nodepass_gevent.tunnelset import Tunnel

__all__ = ["StartError", "Failure", "build", "run"]


class Failure(Exception):
    """A lone tunnel stopped on an internal error (already logged)."""


def build(config: Config, settings: Settings, ssl_context: Optional[ssl.SSLContext],
          name: str = ""):
    if config.role == "server":
        from nodepass_gevent.tunnel.server import Server
        return Server(config, settings, ssl_context, name=name)
    from nodepass_gevent.tunnel.client import Client
    return Client(config, settings, name=name)


def run(tunnels: Sequence[Tunnel], contexts: Dict[str, Optional[ssl.SSLContext]],
        settings: Settings, reread: Optional[Callable[[], List[Tunnel]]] = None,
        metrics_address: Optional[Address] = None) -> None:
    """Run ``tunnels`` until a signal. ``reread`` gives the tunnels file's set
    anew for SIGHUP (ConfigError if it no longer validates). A lone command-line
    tunnel (empty name) ends the process when it fails: Failure."""
    lone = len(tunnels) == 1 and not tunnels[0].name
    _Process(Fleet(build, restart_failed=not lone), settings, reread).run(
        tunnels, contexts, metrics_address)


class _Process:
    """The main greenlet's loop: signals set events, the work happens here."""

    def __init__(self, fleet: Fleet, settings: Settings,
                 reread: Optional[Callable[[], List[Tunnel]]]) -> None:
        self.fleet, self.settings, self.reread = fleet, settings, reread
        self.notifier = systemd.Notifier()
        self.stop_requested, self.reload_requested = Event(), Event()
        self.helpers = []  # type: List[gevent.Greenlet]
        self.announcer = None  # type: Optional[gevent.Greenlet]
        self.metrics_server = None

    def run(self, tunnels: Sequence[Tunnel], contexts: Dict[str, Optional[ssl.SSLContext]],
            metrics_address: Optional[Address]) -> None:
        handlers = [gevent.signal_handler(signal.SIGTERM, self.stop_requested.set),
                    gevent.signal_handler(signal.SIGINT, self.stop_requested.set),
                    gevent.signal_handler(signal.SIGUSR1, self.fleet.report),
                    gevent.signal_handler(signal.SIGHUP, self.reload_requested.set)] + debug.signal_handlers()
        try:
            # The metrics port first: taken, it is a one-line error before any tunnel starts.
            metrics_socket = _listen_metrics(metrics_address) if metrics_address else None
            try:
                self.fleet.start(tunnels, contexts)
            except BaseException:
                net.close_quietly(metrics_socket)
                raise
            if metrics_socket is not None:
                self.metrics_server = _start_metrics(metrics_address, metrics_socket,
                                                     self.fleet)
            self._start_helpers()
            self._serve_until_stopped()
            self._stop()
        finally:
            self._stop_helpers()
            for handler in handlers:
                handler.cancel()
            self.notifier.close()

    def _start_helpers(self) -> None:
        self.announcer = gevent.spawn(_announce_ready, self.fleet, self.notifier)
        self.helpers.append(gevent.spawn(_reload_certificates_forever, self.fleet,
                                         self.settings.reload_interval))
        if self.notifier.watchdog_interval:
            self.helpers.append(gevent.spawn(_watchdog_forever, self.notifier))

    def _serve_until_stopped(self) -> None:
        while True:
            gevent.wait([self.stop_requested, self.reload_requested, self.fleet.failed],
                        count=1)
            if self.stop_requested.is_set() or self.fleet.failed.is_set():
                return
            self.reload_requested.clear()
            _reload(self.fleet, self.notifier, self.reread)
            # READY=1 again (with a fresh STATUS=) once the new set is all up.
            self.announcer.kill(block=False)
            self.announcer = gevent.spawn(_announce_ready, self.fleet, self.notifier)

    def _stop(self) -> None:
        self.notifier.stopping()
        log.info("Shutting down (grace %.1fs)", self.fleet.shutdown_grace())
        self._stop_helpers()
        self.fleet.stop()  # each tunnel drains for its own SHUTDOWN_TIMEOUT
        if self.fleet.failed.is_set():
            raise Failure()
        log.info("Stopped")

    def _stop_helpers(self) -> None:
        """Never blocks long; safe to call twice."""
        gevent.killall(self.helpers + [g for g in (self.announcer,) if g is not None],
                       block=False)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None


def _listen_metrics(address: Address):
    """The --metrics socket, listening; StartError naming the address if it cannot."""
    try:
        return net.listen_tcp(address, role="metrics port (--metrics)")
    except net.BindError as exc:
        raise StartError(str(exc)) from None


def _start_metrics(address: Address, listener, fleet: Fleet):
    from nodepass_gevent.ops.metrics import MetricsServer
    server = MetricsServer(address, fleet.statuses, listener)
    try:
        server.start()
    except OSError as exc:  # not expected: the socket is listening already
        fleet.stop(0)
        raise StartError("cannot serve metrics on %s: %s"
                         % (address, exc.strerror or exc)) from None
    return server


def _reload(fleet: Fleet, notifier: systemd.Notifier,
            reread: Optional[Callable[[], List[Tunnel]]]) -> None:
    notifier.reloading()
    if reread is not None:
        try:
            tunnels = reread()
            summary = fleet.apply(tunnels)
        except ConfigError as exc:
            log.error("Reload refused, the running tunnels are kept: %s", exc)
        else:
            log.info("Reloaded: %s", summary)
    fleet.reload_certificates()
    notifier.ready(_summary(fleet))


def _announce_ready(fleet: Fleet, notifier: systemd.Notifier) -> None:
    """READY=1 once every tunnel is listening or connected (and after each reload)."""
    fleet.wait_ready()
    notifier.ready(_summary(fleet))


def _summary(fleet: Fleet) -> str:
    """systemctl status's line: ready = listening (server) or connected (client);
    up = also has its peer (a server's client connected)."""
    states = [status["state"] for status in fleet.statuses()]
    ready = sum(1 for role in fleet.roles() if role.ready.is_set())
    return "%d of %d tunnels ready, %d up" % (ready, len(states), states.count("up"))


def _reload_certificates_forever(fleet: Fleet, interval: float) -> None:
    while True:
        gevent.sleep(interval)
        fleet.reload_certificates()


def _watchdog_forever(notifier: systemd.Notifier) -> None:
    # Sent from the hub's own loop: if greenlets stop being scheduled, systemd notices.
    while True:
        notifier.watchdog()
        gevent.sleep(notifier.watchdog_interval)
