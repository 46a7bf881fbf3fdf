"""Run the process's tunnels until SIGTERM/SIGINT, then stop them gracefully.

Signal handlers only set an event; the work runs in the main greenlet.
SIGUSR1 logs every tunnel's traffic line at once. SIGHUP reloads: the
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

from nodepass_gevent import systemd
from nodepass_gevent.config import Address, Config, ConfigError, Settings
from nodepass_gevent.fleet import Fleet, StartError
from nodepass_gevent.log import log
from nodepass_gevent.tunnelset import Tunnel

__all__ = ["StartError", "Failure", "build", "run"]


class Failure(Exception):
    """A lone tunnel stopped on an internal error (already logged)."""


def build(config: Config, settings: Settings, ssl_context: Optional[ssl.SSLContext],
          name: str = ""):
    if config.role == "server":
        from nodepass_gevent.server import Server
        return Server(config, settings, ssl_context, name=name)
    from nodepass_gevent.client import Client
    return Client(config, settings, name=name)


def run(tunnels: Sequence[Tunnel], contexts: Dict[str, Optional[ssl.SSLContext]],
        settings: Settings, reread: Optional[Callable[[], List[Tunnel]]] = None,
        metrics_address: Optional[Address] = None) -> None:
    """Run ``tunnels`` until a signal. ``reread`` gives the tunnels file's set
    anew for SIGHUP (ConfigError if it no longer validates). A lone command-line
    tunnel (empty name) ends the process when it fails: Failure."""
    lone = len(tunnels) == 1 and not tunnels[0].name
    fleet = Fleet(build, restart_failed=not lone)
    stop_requested, reload_requested = Event(), Event()
    handlers = [gevent.signal_handler(signal.SIGTERM, stop_requested.set),
                gevent.signal_handler(signal.SIGINT, stop_requested.set),
                gevent.signal_handler(signal.SIGUSR1, fleet.report),
                gevent.signal_handler(signal.SIGHUP, reload_requested.set)]
    notifier = systemd.Notifier()
    helpers = []  # type: List[gevent.Greenlet]
    metrics_server = None
    try:
        fleet.start(tunnels, contexts)
        if metrics_address is not None:
            metrics_server = _start_metrics(metrics_address, fleet)
        helpers.append(gevent.spawn(_announce_ready, fleet, notifier))
        helpers.append(gevent.spawn(_reload_certificates_forever, fleet,
                                    settings.reload_interval))
        if notifier.watchdog_interval:
            helpers.append(gevent.spawn(_watchdog_forever, notifier))
        while True:
            gevent.wait([stop_requested, reload_requested, fleet.failed], count=1)
            if stop_requested.is_set() or fleet.failed.is_set():
                break
            reload_requested.clear()
            _reload(fleet, notifier, reread)
            helpers.append(gevent.spawn(_announce_ready, fleet, notifier))
        notifier.stopping()
        log.info("Shutting down (grace %.1fs)", fleet.shutdown_grace())
        gevent.killall(helpers, block=False)
        if metrics_server is not None:
            metrics_server.stop()
            metrics_server = None
        fleet.stop()  # each tunnel drains for its own SHUTDOWN_TIMEOUT
        if fleet.failed.is_set():
            raise Failure()
        log.info("Stopped")
    finally:
        gevent.killall(helpers, block=False)
        if metrics_server is not None:
            metrics_server.stop()
        for handler in handlers:
            handler.cancel()
        notifier.close()


def _start_metrics(address: Address, fleet: Fleet):
    from nodepass_gevent.metrics import MetricsServer
    server = MetricsServer(address, fleet.statuses)
    try:
        server.start()
    except OSError as exc:
        fleet.stop(0)
        raise StartError("cannot listen for metrics on %s: %s"
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
