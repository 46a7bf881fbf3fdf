"""Which wire a server speaks, found out on the tunnel connection itself (wire=auto).

    v1.0 server    accept -> writes its first line at once: "//port#tls\\n", or, with
                   a shared key, the challenge "//0?auth=...#0\\n"
    v1.14 server   accept -> writes nothing until the client's "GET / HTTP/1.1"

So the client dials and waits up to CLIENT_FIRST_LINE_WAIT for a first byte,
*peeking* (MSG_PEEK): the byte stays in the socket, and the v1.0 control reader
(a buffered makefile, wire/v1/control.py) reads the whole line as if nobody had
looked. A byte that may start "//": v1.0. Silence: v1.14, and the GET goes out
on that same connection. A close without a byte: v1.0, whose server turns a
client away that way (the v1.0 reader says so). Anything else: WireError, one
line naming the bytes.

The two waits. A v1.0 server writes within a millisecond on loopback (one round
trip after connect elsewhere), so against v1.0, auto costs nothing. Our own server,
on auto, waits SERVER_GET_WAIT for a GET before it writes its v1.0 line (a v1.14
client sends its GET at once). The client's wait must be clearly longer than the
server's, so that two of ours settle on v1.0 every time: the server gives up
waiting and writes first, while the client still listens; with the waits the
other way round both would wait, and the client would send a GET a v1.0-speaking
server no longer expects. The client adds the time its connect took (about one
round trip) so that a slow link does not eat the margin. Against a v1.14 server
auto costs the wait once per server: WireMemory remembers the answer per server
address, and later sessions send the GET at once; a reply that is not HTTP then
(the server was replaced by a v1.0 one) makes the client forget it.
"""

import socket
import time
from typing import Dict, Optional, Tuple

from nodepass_gevent.base import net
from nodepass_gevent.config import WIRE_AUTO, WIRE_V1, WIRE_V114, Address
from nodepass_gevent.wire.v1 import control

# Our server's wait for a v1.14 client's GET before it writes its v1.0 first line
# (the server role's detection; kept here, beside the wait it must stay below).
SERVER_GET_WAIT = 0.15
# The client's wait for a server's first bytes: about three times the server's, so
# a server of ours always speaks first and the pair settles on v1.0.
CLIENT_FIRST_LINE_WAIT = 0.45
PEEK_SIZE = 64         # enough to judge, and to quote in an error
V1_LINE_START = b"//"


class WireError(ConnectionError):
    """The server's first bytes belong to neither wire."""


def judge_first_bytes(first: bytes, server: Address) -> str:
    """WIRE_V1 for bytes a v1.0 line may start with (or none: a close); else WireError."""
    if V1_LINE_START.startswith(first[:len(V1_LINE_START)]):
        return WIRE_V1
    raise WireError("server %s sent %r first: not a NodePass v1.0 line (//port#tls), and a"
                    " v1.14 server sends nothing first; is it a NodePass server?"
                    % (server, first[:40]))


def wait_for_first_bytes(sock: socket.socket, wait: float) -> Optional[bytes]:
    """The first bytes the server sent within ``wait`` s, left unread; None for silence."""
    sock.settimeout(wait)
    try:
        return sock.recv(PEEK_SIZE, socket.MSG_PEEK)
    except socket.timeout:
        return None
    finally:
        sock.settimeout(None)


class WireMemory:
    """The wire each server address was found to speak, for the client's sessions."""

    def __init__(self) -> None:
        self.known = {}  # type: Dict[Address, str]

    def open(self, server: Address, log) -> Tuple[str, socket.socket]:
        """Dial ``server`` and find out its wire: (wire, the connected socket).
        Raises control.ServerUnreachable or WireError; the socket is closed then."""
        started = time.monotonic()
        sock = control.dial_tunnel(server)
        connected = time.monotonic()
        if self.known.get(server) == WIRE_V114:
            log.debug("Client: %s speaks the v1.14 wire (found out before): GET at once",
                      server)
            return WIRE_V114, sock
        try:
            first = wait_for_first_bytes(sock, CLIENT_FIRST_LINE_WAIT + connected - started)
            wire = WIRE_V114 if first is None else judge_first_bytes(first, server)
        except BaseException:
            net.close_quietly(sock)
            raise
        self._note(server, wire, time.monotonic() - connected, log)
        return wire, sock

    def _note(self, server: Address, wire: str, seconds: float, log) -> None:
        how = ("no first line within %.0fms: sending the GET" % (seconds * 1000)
               if wire == WIRE_V114 else "its first line came %.1fms after connect"
               % (seconds * 1000))
        # Said once per change: a v1.0 server is found out again at each session.
        say = log.debug if self.known.get(server) == wire else log.info
        say("Client: %s speaks the v%s wire (%s)", server, wire, how)
        self.known[server] = wire

    def forget(self, server: Address, log) -> None:
        """The remembered wire proved wrong: find out afresh next time."""
        if self.known.pop(server, WIRE_AUTO) == WIRE_V114:
            log.warning("Client: %s no longer answers as a v1.14 server: the next session"
                        " finds out its wire again", server)
