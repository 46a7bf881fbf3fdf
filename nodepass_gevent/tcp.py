"""TCP users, both halves: one user connection = one data connection.

Server: a user connects to target_addr; the server takes a pooled data
connection, sends the launch signal (kind 1) naming its id, and relays.
Client: the launch signal names a pooled data connection; the client dials
the target and relays. The relay and its copy contract are relay.py's.

    user --TCP--> server ==data connection==> client --TCP--> target
"""

import socket

from nodepass_gevent import net, protocol, relay
from nodepass_gevent.stats import Stats


def serve_user(user: socket.socket, peer: tuple, hand_out, stats: Stats) -> None:
    """The server's half: ``hand_out(kind, who)`` gives an announced data
    connection or None (then the user is closed at once)."""
    data = hand_out(protocol.KIND_TCP, net.format_address(peer))
    if data is None:
        net.close_quietly(user)
        return
    with stats.tcp_connection():
        relay.exchange(user, data, stats)


def launch(data: socket.socket, target: net.Target, stats: Stats, log) -> None:
    """The client's half: join the launched data connection to a new
    connection to the target (both closed when done)."""
    try:
        sock = target.connect(socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("Client: cannot reach TCP target %s: %s", target.address,
                    net.describe(exc))
        net.close_quietly(data)
        return
    with stats.tcp_connection():
        relay.exchange(data, sock, stats)
