"""The server's edge policy: what happens to a user before and as the tunnel carries it.

One object, built from the Config's ``proxy=``, ``allow=``/``deny=``,
``per_user=`` and ``rate=``, that the server's user-admission path asks at
four points:

    TCP user accepted   -> admit_tcp()       refused: reset at once, nothing spent
                                             (server.py's user listener, in the
                                             accept callback: no place, no greenlet)
    data connection won -> proxy_header()    the PROXY header to write first, or None
    copying             -> rate              the tunnel's TunnelRate, or None
    TCP user gone       -> release_tcp()
    UDP datagram        -> admit_datagram()  refused or over the rate: dropped
    UDP reply           -> pass_reply()      over the rate: dropped

With none of those parameters the server does not ask (``admits_tcp`` and
``filters_udp`` are False), and its behaviour and wire bytes are unchanged.
"""

import socket
import struct
from typing import Optional

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.config import Config
from nodepass_gevent.edge import proxyheader
from nodepass_gevent.edge.access import Gate, RefusalLog, source_ip
from nodepass_gevent.edge.ratelimit import TunnelRate


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def reset(user: socket.socket) -> None:
    """Refuse with a TCP reset, as a firewall's reject does: no FIN handshake, and
    no TIME_WAIT left on this host by a flood of refused users. Never raises."""
    try:
        user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    net.close_quietly(user)


class Edge:
    """See the module docstring."""

    def __init__(self, config: Config, stats: Stats, warn) -> None:
        self.stats = stats
        self.proxy_version = config.proxy_version
        self.gate = Gate(config.allow, config.deny, config.per_user, stats, RefusalLog(warn))
        self._per_user = config.per_user is not None
        self.rate = TunnelRate(config.rate_mbit) if config.rate_mbit is not None else None
        self.admits_tcp = self.gate.active          # allow=, deny= or per_user= given
        self.filters_udp = self.gate.filters or self.rate is not None

    def admit_tcp(self, user: socket.socket, peer: tuple) -> bool:
        """False: the user was refused (counted, logged) and is reset and closed.
        Every admitted user must be released (release_tcp) when it ends."""
        if self.gate.open_tcp(peer) is None:
            reset(user)
            return False
        return True

    def release_tcp(self, peer: tuple) -> None:
        if self._per_user:
            self.gate.close_tcp(source_ip(peer[0]))

    def proxy_header(self, user: socket.socket, peer: tuple) -> Optional[bytes]:
        """The PROXY header for this TCP user (proxy=1|2), or None."""
        if not self.proxy_version:
            return None
        try:
            destination = user.getsockname()
        except OSError:
            destination = None  # gone already: UNKNOWN / LOCAL, the receiver copes
        return proxyheader.encode(self.proxy_version, peer, destination)

    def admit_datagram(self, peer: tuple, size: int) -> bool:
        if self.gate.filters and not self.gate.admits_datagram(peer):
            return False
        if self.rate is not None and not self.rate.inbound.try_spend(size):
            self.stats.datagrams_over_rate += 1
            return False
        return True

    def pass_reply(self, size: int) -> bool:
        if self.rate is not None and not self.rate.outbound.try_spend(size):
            self.stats.datagrams_over_rate += 1
            return False
        return True
