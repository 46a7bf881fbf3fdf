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

import socket
import time
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence

from nodepass_gevent.base.stats import Stats
from nodepass_gevent.edge.proxyheader import packed_ip

REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about one source
REFUSAL_LOG_SOURCES = 4096   # sources remembered for that; beyond, one summary line


def source_ip(host: str) -> bytes:
    """The user's address packed (4 or 16 bytes; IPv4-mapped as IPv4, zone dropped)."""
    packed = packed_ip(host)
    if packed is None:  # accept() and recvfrom() give numeric addresses: never here
        raise ValueError("not an IP address: %r" % host)
    return packed


def ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


class NetworkSet:
    """ip_network objects, matched against packed addresses by integer prefix.

    One set of network numbers per (address length, prefix length): a lookup
    costs one shift and one set probe per distinct prefix length, whatever the
    number of entries (ipaddress's ``in`` costs microseconds per entry).
    """

    def __init__(self, networks: Sequence) -> None:
        self._by_length = {4: {}, 16: {}}  # type: Dict[int, Dict[int, set]]
        for network in networks:
            size = 4 if network.version == 4 else 16
            shift = size * 8 - network.prefixlen
            self._by_length[size].setdefault(shift, set()).add(
                int(network.network_address) >> shift)
        self.empty = not networks

    def __contains__(self, packed: bytes) -> bool:
        number = int.from_bytes(packed, "big")
        return any(number >> shift in numbers
                   for shift, numbers in self._by_length[len(packed)].items())


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


def _tcp_connections(count: int) -> str:
    return "%d TCP connection%s" % (count, "" if count == 1 else "s")


class Gate:
    """The admission check for users of one server; see the module docstring."""

    def __init__(self, allow: Sequence, deny: Sequence, per_user: Optional[int],
                 stats: Stats, refusals: RefusalLog) -> None:
        self._allow, self._deny = NetworkSet(allow), NetworkSet(deny)
        self._per_user = per_user
        self._open = {}  # type: Dict[bytes, int]   packed source ip -> open TCP connections
        self.stats, self.refusals = stats, refusals
        self.filters = not (self._allow.empty and self._deny.empty)
        self.active = self.filters or per_user is not None  # False: the server skips it

    def permits(self, ip: bytes) -> bool:
        """Whether allow/deny let ``ip`` (packed, see source_ip()) in."""
        if ip in self._deny:
            return False
        return self._allow.empty or ip in self._allow

    def open_tcp(self, peer: tuple) -> Optional[bytes]:
        """Admit a TCP user (a key to pass to close_tcp() when it ends), or None: refused
        (counted and logged), and the caller closes the connection at once."""
        ip = source_ip(peer[0])
        if self.filters and not self.permits(ip):
            self.stats.users_refused += 1
            self.refusals.refused(ip_text(ip), "not allowed (allow=/deny=)")
            return None
        if self._per_user is not None:
            count = self._open.get(ip, 0)
            if count >= self._per_user:
                self.stats.users_over_cap += 1
                self.refusals.refused(ip_text(ip), "%s from this address %s open already,"
                                      " the most allowed (per_user=%d)"
                                      % (_tcp_connections(count), "is" if count == 1 else
                                         "are", self._per_user))
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
        self.refusals.refused(ip_text(ip), "datagram not allowed (allow=/deny=)")
        return False

    def open_count(self, peer_host: str) -> int:
        """Open TCP connections counted for a source (for tests and status)."""
        return self._open.get(source_ip(peer_host), 0)
