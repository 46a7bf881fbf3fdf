"""TCP users, both halves: one user connection = one data connection.

Server: a user connects to target_addr; the server takes a pooled data
connection, sends the launch signal (kind 1) naming its id, and relays.
Client: the launch signal names a pooled data connection; the client dials
the target and relays. The relay and its copy contract are relay.py's.

    user --TCP--> server ==data connection==> client --TCP--> target

With ``proxy=1|2`` (edge/policy.py) the server writes a PROXY protocol header
(proxyheader.py) on the data connection first, right after the launch
signal: the client forwards it to the target as the user's first bytes.
"""

import socket
from typing import Callable, Optional

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import relay
from nodepass_gevent.edge.ratelimit import TunnelRate
from nodepass_gevent.log import log
from nodepass_gevent.wire.v1 import protocol


def serve_user(user: socket.socket, peer: tuple, hand_out, stats: Stats,
               proxy_header: Optional[bytes] = None, rate: Optional[TunnelRate] = None
               ) -> None:
    """The server's half: ``hand_out(kind, peer)`` gives an announced data
    connection or None (then the user is closed at once). ``proxy_header``
    goes first on the data connection; ``rate`` paces the relay."""
    data = hand_out(protocol.KIND_TCP, peer)
    if data is None or (proxy_header is not None and not _send_header(data, proxy_header, peer)):
        net.close_quietly(user)
        return
    stats.tcp_opened()
    try:
        relay.exchange(user, data, stats, rate)
    finally:
        stats.tcp_closed()


def _send_header(data: socket.socket, header: bytes, peer: tuple) -> bool:
    """Write the PROXY header; on failure close the data connection, False."""
    try:
        net.send_message(data, header)
        return True
    except OSError as exc:
        log.debug("Target: PROXY header for %s not sent: %s", net.format_address(peer), exc)
        net.close_quietly(data)
        return False


def launch(data: socket.socket, target: net.Target, stats: Stats,
           on_target: Callable[[Optional[OSError]], None]) -> None:
    """The client's half: join the launched data connection to a new
    connection to the target (both closed when done). ``on_target(error)``
    hears whether the target answered (None) or not, before the relay: the
    client's health (the caller logs a failure, rate-limited)."""
    try:
        sock = target.connect(socket.SOCK_STREAM)
    except OSError as exc:
        net.close_quietly(data)
        on_target(exc)
        return
    on_target(None)
    stats.tcp_opened()
    try:
        relay.exchange(data, sock, stats)
    finally:
        stats.tcp_closed()
