"""UDP datagrams and replies too large for the v1.0 wire: counted, and said
in a warning with the remedy, at most once per TOO_LARGE_LOG_INTERVAL.

udp.py drops them (its module docstring, "Sizes", says why); this module
counts them and words the warning.
"""

import time
from typing import Callable

from nodepass_gevent.base import health
from nodepass_gevent.base.stats import Stats

TOO_LARGE_LOG_INTERVAL = 10.0  # at most one "too large" warning a direction this often

# What a dropped datagram or reply says, by (role, direction): which limit, and
# what to do. The v1.0 wire's own limit is the peer's UDP_DATA_BUF_SIZE; this
# side's is the one it knows, so a datagram from the peer that is above it
# shows that the peer's is larger.
_FLOW_REMEDY = ("or use UDP flows (both sides nodepass-gevent, the server without udp=v1:"
                " flows are its default)")
_TOO_LARGE_LINES = {
    ("server", "datagram"):
        "Target: UDP datagram of %d bytes from %s dropped whole: above UDP_DATA_BUF_SIZE=%d,"
        " the most the v1.0 wire carries (a v1.0 client would cut it); raise"
        " UDP_DATA_BUF_SIZE on both sides, " + _FLOW_REMEDY + "%s",
    ("server", "reply"):
        "Target: UDP reply of %d bytes for %s dropped whole: above UDP_DATA_BUF_SIZE=%d here,"
        " the client's is larger; give both sides the same UDP_DATA_BUF_SIZE, "
        + _FLOW_REMEDY + "%s",
    ("client", "datagram"):
        "Client: UDP datagram of %d bytes for target %s dropped whole: above"
        " UDP_DATA_BUF_SIZE=%d here, the server's is larger; give both sides the same"
        " UDP_DATA_BUF_SIZE, " + _FLOW_REMEDY + "%s",
    ("client", "reply"):
        "Client: UDP reply of %d bytes from target %s dropped whole: above"
        " UDP_DATA_BUF_SIZE=%d, the most the v1.0 wire carries (a v1.0 server would cut"
        " it); raise UDP_DATA_BUF_SIZE on both sides, " + _FLOW_REMEDY + "%s",
}


class TooLargeDrops:
    """One role's datagrams and replies above UDP_DATA_BUF_SIZE on the v1.0 wire
    (see the module docstring): each already dropped whole by the caller, here
    counted in Stats and said in a warning with its size, the limit and the
    remedy: the first at once, then at most one line a direction per
    ``interval``, which says how many more went unsaid since the line before."""

    def __init__(self, role: str, limit: int, stats: Stats, log,
                 interval: float = TOO_LARGE_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.stats = limit, stats
        self._datagrams = _Occasional(log.warning, _TOO_LARGE_LINES[role, "datagram"],
                                      interval, clock)
        self._replies = _Occasional(log.warning, _TOO_LARGE_LINES[role, "reply"],
                                    interval, clock)

    def datagram(self, size: int, party: str) -> None:
        """A datagram towards the target (``party``: from whom, or for which target)."""
        self.stats.udp_too_large_datagrams += 1
        self._datagrams.say(size, party, self.limit)

    def reply(self, size: int, party: str) -> None:
        """A reply towards the user (``party``: for whom, or from which target)."""
        self.stats.udp_too_large_replies += 1
        self._replies.say(size, party, self.limit)


class _Occasional:
    """A warning said at most once per ``interval`` (health.Throttle); each line
    after the first says how many went unsaid since the one before."""

    def __init__(self, warn: Callable[..., None], text: str, interval: float,
                 clock: Callable[[], float]) -> None:
        self._warn, self._text = warn, text
        self._throttle = health.Throttle(interval, clock)

    def say(self, *args) -> bool:
        """True if the line was written."""
        unsaid = self._throttle.due()
        if unsaid is None:
            return False
        since = (" (and %d more since the last line)" % unsaid) if unsaid else ""
        self._warn(self._text, *(args + (since,)))
        return True
