"""One lifecycle for everything long-lived: roles, listeners' owners, pools.

The words, used the same way everywhere:

    start()         begin serving (a listener that cannot open raises BindError)
    stop(timeout)   stop accepting, let work in progress finish for ``timeout``
                    seconds, then cut what is left ("drain, then cut")
    close()         stop(0): cut at once
    closed          True once stop() or close() began; never serves again
    failed          an Event set when a supervised greenlet crashed (a bug):
                    the owner must stop, and the process exits non-zero
    ready           an Event set once the component serves (a server listens,
                    a client's tunnel is open); cleared while it does not

and ``with component: ...`` starts it and closes it.

Supervision: greenlets spawned with Component.spawn() must live as long as
the component (accept and report loops, a client's session loop and its pool
manager). One that raises is a bug; a component that went on without it would
look healthy while it no longer serves (a client whose pool never refills).
A crash is logged once, at critical, and sets ``failed``. A kill is a stop,
not a failure.
"""

import logging
from typing import Callable, List, Set

import gevent
import gevent.pool
from gevent.event import Event

from nodepass_gevent.log import log as root_log

CUT_GRACE = 1.0  # how long killed handlers get to unwind after the drain timed out


class Component:
    """Base of every long-lived part; see the module docstring for the words."""

    kind = "Component"   # the word that starts its log lines, e.g. "Server"

    def __init__(self, log: logging.LoggerAdapter = None) -> None:
        self.log = log if log is not None else logging.LoggerAdapter(root_log, {})
        self.failed = Event()
        self.ready = Event()
        self.closed = False
        self._supervised = set()  # type: Set[gevent.Greenlet]
        self._drained = []  # type: List[gevent.pool.Group]

    # -- the words ---------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float) -> None:
        """Stop accepting, drain the work groups for ``timeout``, then cut them."""
        if self.closed:
            return
        self.closed = True
        self.ready.clear()
        self.stop_accepting()
        self.kill_supervised()
        self.cut_idle()
        self._drain_then_cut(timeout)

    def close(self) -> None:
        self.stop(0)

    def __enter__(self) -> "Component":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- what a component fills in ------------------------------------------

    def stop_accepting(self) -> None:
        """Close every listener, so that no new work arrives."""

    def cut_idle(self) -> None:
        """End what carries no user bytes in flight (tunnel, pools, UDP flows)."""

    def drain_on_stop(self, group: gevent.pool.Group) -> gevent.pool.Group:
        """Register a group of user work to drain on stop(); returns it."""
        self._drained.append(group)
        return group

    # -- supervision ---------------------------------------------------------

    def spawn(self, function: Callable, *args) -> gevent.Greenlet:
        """Run ``function`` for the component's life; a crash fails the component."""
        greenlet = gevent.spawn(function, *args)
        greenlet.link_exception(self._on_crash)
        greenlet.link(self._supervised.discard)  # finished ones are not kept
        self._supervised.add(greenlet)
        return greenlet

    def fail(self, reason: object) -> None:
        """Something that must not happen happened: log it and fail loudly."""
        self.log.critical("%s: internal failure: %r", self.kind, reason)
        self.failed.set()

    def kill_supervised(self) -> None:
        """Stop every supervised greenlet still running (a stop, not a failure)."""
        for greenlet in list(self._supervised):
            greenlet.kill(block=False)

    def _on_crash(self, greenlet: gevent.Greenlet) -> None:
        self.fail(greenlet.exception)

    def _drain_then_cut(self, timeout: float) -> None:
        left = 0
        for group in self._drained:
            group.join(timeout=timeout)
            left += len(group)
        if not left:
            return
        self.log.warning("%s: cutting %d connections still open after %.1fs", self.kind, left,
                         timeout)
        for group in self._drained:
            group.kill(timeout=CUT_GRACE)


class Supervisor(Component):
    """Supervision alone, for parts that live inside another's lifetime
    (tests, and pools run on behalf of an owner)."""

    def __init__(self, kind: str, log: logging.LoggerAdapter = None) -> None:
        super().__init__(log)
        self.kind = kind

    def start(self) -> None:
        self.ready.set()

    def kill(self) -> None:
        self.kill_supervised()
