"""Run one role until SIGTERM/SIGINT, then stop it gracefully.

Signal handlers only set an event; the stop itself runs in the main greenlet.
SIGUSR1 logs the traffic line at once; SIGUSR2, only with
NODEPASS_DEBUG_COUNTS=1, logs greenlet/descriptor/memory figures (debug.py).
"""

import signal
import ssl
from typing import Optional

import gevent
from gevent.event import Event

from nodepass_gevent import debug
from nodepass_gevent.config import Config, Settings
from nodepass_gevent.log import log
from nodepass_gevent.net import BindError


class StartError(Exception):
    """The role could not start (a port in use, an address that does not resolve)."""


class Failure(Exception):
    """The role stopped on an internal error (already logged)."""


def build(config: Config, settings: Settings, ssl_context: Optional[ssl.SSLContext]):
    if config.role == "server":
        from nodepass_gevent.server import Server
        return Server(config, settings, ssl_context)
    from nodepass_gevent.client import Client
    return Client(config, settings)


def run(config: Config, settings: Settings, ssl_context: Optional[ssl.SSLContext]) -> None:
    role = build(config, settings, ssl_context)
    stop_requested = Event()
    handlers = [gevent.signal_handler(signal.SIGTERM, stop_requested.set),
                gevent.signal_handler(signal.SIGINT, stop_requested.set),
                gevent.signal_handler(signal.SIGUSR1, role.report)] + debug.signal_handlers()
    try:
        try:
            role.start()
        except BindError as exc:
            raise StartError(str(exc)) from None
        gevent.wait([stop_requested, role.failed], count=1)
        log.info("Shutting down (grace %.1fs)", settings.shutdown_timeout)
        role.stop(settings.shutdown_timeout)
        if role.failed.is_set():
            raise Failure()
        log.info("Stopped")
    finally:
        for handler in handlers:
            handler.cancel()
