"""Supervision of the greenlets that must live as long as their role.

Accept loops, the UDP receive loop, report loops, the client's session loop
and its pool manager never end on their own while the role runs: one that
raises is a bug, and a role that kept going without it would look healthy
while it no longer serves (a client whose pool never refills). A crash is
logged and sets ``failed``, on which service.run stops the role and exits
non-zero, so the service manager restarts it.
"""

from typing import Callable, Set

import gevent
from gevent.event import Event

from nodepass_gevent.log import log


class Supervisor:
    """Spawns long-lived greenlets for one role; any crash fails the role."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.failed = Event()
        self._running = set()  # type: Set[gevent.Greenlet]

    def spawn(self, function: Callable, *args) -> gevent.Greenlet:
        greenlet = gevent.spawn(function, *args)
        # A kill (GreenletExit) counts as success: only real exceptions fail the role.
        greenlet.link_exception(self._on_crash)
        greenlet.link(self._running.discard)  # finished ones are not kept
        self._running.add(greenlet)
        return greenlet

    def kill(self) -> None:
        """Stop every greenlet still running (a stop, not a failure). Never blocks."""
        for greenlet in list(self._running):
            greenlet.kill(block=False)

    def _on_crash(self, greenlet: gevent.Greenlet) -> None:
        log.critical("%s: internal failure: %r", self.role, greenlet.exception)
        self.failed.set()
