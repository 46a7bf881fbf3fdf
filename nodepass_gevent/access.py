"""Who may use the server's target port: allow/deny lists and the per-user connection cap.

The server asks a Gate before it spends anything on a user: a refused TCP
user is closed at once (no semaphore place, no data connection, no signal
to the client), a refused datagram is dropped. Refusals are counted in Stats
and logged through a RefusalLog, at most once per source per interval, so a
flood of refused users cannot flood the log.

Rules (config.py parses the lists into ip_network tuples):
- a source in ``deny`` is refused;
- with ``allow`` given, a source in none of its networks is refused;
- with ``per_user``, a TCP user beyond that many concurrent connections from
  its address is refused (UDP has no connections to count).
An IPv4 user on a dual-stack listener (::ffff:a.b.c.d) is matched as IPv4.
"""

import ipaddress
import time
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence

from nodepass_gevent.stats import Stats

REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about one source
REFUSAL_LOG_SOURCES = 4096   # sources remembered for that; beyond, one summary line


def source_ip(host: str):
    """The user's address as ipaddress sees it (IPv4-mapped as IPv4, zone dropped)."""
    address = ipaddress.ip_address(host.partition("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class RefusalLog:
    """Log refusals, at most once per source per ``interval``; say how many went unlogged.

    Memory is bounded: at most ``max_sources`` sources are remembered; when a
    flood from more sources than that arrives, the overflow is reported in one
    summary line per interval instead of one line per source.
    """

    def __init__(self, warn: Callable[..., None], interval: float = REFUSAL_LOG_INTERVAL,
                 max_sources: int = REFUSAL_LOG_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._warn, self._interval, self._max = warn, interval, max_sources
        self._clock = clock
        # source -> [time of its last line, refusals not logged since]
        self._sources = OrderedDict()  # type: OrderedDict[str, list]
        self._overflow_logged_at = None  # type: Optional[float]
        self._overflow_unlogged = 0

    def refused(self, source: str, what: str) -> bool:
        """Note one refusal of ``source`` (``what``: a short reason); True if it was logged."""
        now = self._clock()
        entry = self._sources.get(source)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return False
        if entry is None and not self._make_room(now):
            return self._overflowed(now, what)
        unlogged = entry[1] if entry is not None else 0
        self._sources[source] = [now, 0]
        self._sources.move_to_end(source)
        self._warn("Target: refused %s: %s%s", source, what,
                   " (and %d more since the last line)" % unlogged if unlogged else "")
        return True

    def _make_room(self, now: float) -> bool:
        """Room to remember one more source? When full, forget those whose last
        line is older than the interval (their next refusal is logged anyway)."""
        while len(self._sources) >= self._max:
            oldest = next(iter(self._sources.values()))
            if now - oldest[0] < self._interval:
                return False
            self._sources.popitem(last=False)
        return True

    def _overflowed(self, now: float, what: str) -> bool:
        self._overflow_unlogged += 1
        if self._overflow_logged_at is not None and now - self._overflow_logged_at < self._interval:
            return False
        self._overflow_logged_at = now
        self._warn("Target: refusing users from more than %d sources (%d refusals not logged"
                   " one by one), e.g. %s", self._max, self._overflow_unlogged, what)
        self._overflow_unlogged = 0
        return True


class Gate:
    """The admission check for users of one server; see the module docstring."""

    def __init__(self, allow: Sequence, deny: Sequence, per_user: Optional[int],
                 stats: Stats, refusals: RefusalLog) -> None:
        self._allow, self._deny = tuple(allow), tuple(deny)
        self._per_user = per_user
        self._open = {}  # type: Dict[object, int]   source ip -> open TCP connections
        self.stats, self.refusals = stats, refusals
        self.filters = bool(self._allow or self._deny)
        self.active = self.filters or per_user is not None  # False: the server skips it

    def permits(self, ip) -> bool:
        """Whether allow/deny let ``ip`` (an ipaddress address) in."""
        if any(ip in network for network in self._deny):
            return False
        return not self._allow or any(ip in network for network in self._allow)

    def open_tcp(self, peer: tuple) -> Optional[object]:
        """Admit a TCP user (a key to pass to close_tcp() when it ends), or None: refused
        (counted and logged), and the caller closes the connection at once."""
        ip = source_ip(peer[0])
        if self.filters and not self.permits(ip):
            self.stats.users_refused += 1
            self.refusals.refused(str(ip), "not allowed (allow=/deny=)")
            return None
        if self._per_user is not None:
            count = self._open.get(ip, 0)
            if count >= self._per_user:
                self.stats.users_over_cap += 1
                self.refusals.refused(str(ip), "already %d connections (per_user=%d)"
                                      % (count, self._per_user))
                return None
            self._open[ip] = count + 1
        return ip

    def close_tcp(self, key: object) -> None:
        """A user admitted by open_tcp() has gone."""
        if self._per_user is None:
            return
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def admits_datagram(self, peer: tuple) -> bool:
        """Whether a UDP datagram from ``peer`` may pass (if not: counted, logged)."""
        if not self.filters:
            return True
        ip = source_ip(peer[0])
        if self.permits(ip):
            return True
        self.stats.datagrams_refused += 1
        self.refusals.refused(str(ip), "datagram not allowed (allow=/deny=)")
        return False

    def open_count(self, peer_host: str) -> int:
        """Open TCP connections counted for a source (for tests and status)."""
        return self._open.get(source_ip(peer_host), 0)
