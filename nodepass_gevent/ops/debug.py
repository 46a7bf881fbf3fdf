"""Debug-only process figures, for leak hunting; off unless asked for.

With NODEPASS_DEBUG_COUNTS=1 in the environment, SIGUSR2 makes the process log
one line at info level:

    Debug: greenlets=12 alive=9 fds=7 rss_kb=31240

``greenlets`` counts every greenlet object still in memory after a full
garbage collection (a finished one that something still holds counts too:
that is the leak to find), ``alive`` those not yet finished, ``fds`` the open
descriptors (/proc/self/fd), ``rss_kb`` the resident set (/proc/self/status).
The collection walks every object, so it costs milliseconds on a big process:
fine on request, never done otherwise. Without the variable no handler is
installed and SIGUSR2 keeps its default action (the process ends), as before.
Used by tests/test_storms.py to see another process's greenlets.
"""

import gc
import os
import signal
from typing import List

import gevent
import greenlet

from nodepass_gevent.log import log

VARIABLE = "NODEPASS_DEBUG_COUNTS"


def enabled(environ=None) -> bool:
    return (os.environ if environ is None else environ).get(VARIABLE, "") == "1"


def counts() -> dict:
    """The figures of the line above, as a dict."""
    gc.collect()
    greenlets = [obj for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet)]
    return {"greenlets": len(greenlets),
            "alive": sum(1 for g in greenlets if not g.dead),
            "fds": len(os.listdir("/proc/self/fd")) - 1,  # minus listdir's own
            "rss_kb": _rss_kb()}


def log_counts() -> None:
    figures = counts()
    log.info("Debug: %s", " ".join("%s=%d" % (name, figures[name])
                                   for name in ("greenlets", "alive", "fds", "rss_kb")))


def signal_handlers() -> List[object]:
    """The SIGUSR2 handler, if NODEPASS_DEBUG_COUNTS=1 (cancel() each at the end)."""
    if not enabled():
        return []
    return [gevent.signal_handler(signal.SIGUSR2, log_counts)]


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
