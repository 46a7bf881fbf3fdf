"""The NodePass v1.0 wire protocol: signals on the tunnel, ids on data connections.

Glossary:
    tunnel   the plain TCP control channel; the client dials the server's tunnel_addr
    data     a connection from the client to the server's data port, used once
    pool     pre-dialed data connections, waiting to be used
    target   where users arrive (server) / the private service (client)

    client                                   server
      | ---- TCP connect tunnel_addr ------->  |
      | <--- "//<data_port>#<tls>\\n" -------  |   tunnel signal, once
      | <--- "\\n" --------------------------  |   heartbeat, every REPORT_INTERVAL
      |                                        |
      | ---- TCP connect data_port ---------->  |   (TLS handshake if tls is 1 or 2)
      | <--- "<8 hex chars>" ----------------  |   the data connection's id
      |        ... waits in both pools ...     |
      | <--- "//<id>#1\\n" -------------------  |   TCP launch: a user connected
      | <==== bytes both ways on data <id> ==> |
      | <--- "//<id>#2\\n" -------------------  |   UDP launch: a user datagram
      | <--- datagram on data <id> -----------  |
      | ---- one reply, then close ---------->  |

Signals are parsed like URLs: host = port or id, fragment = kind. A query
string is ignored by v1.0 clients, which is where extensions are advertised.
"""

import binascii
import os
from dataclasses import dataclass
from typing import Dict

from nodepass_gevent.urls import hostname, query_pairs, split_url

ID_LENGTH = 8  # hex characters a server writes at the start of every data connection
MAX_SIGNAL_LENGTH = 4096  # a longer line is not a NodePass signal
HEARTBEAT = b"\n"
# A tunnel silent for this many REPORT_INTERVALs (no heartbeat read, or one
# not acknowledged) is taken for dead.
HEARTBEAT_MISSES = 3

KIND_TCP = "1"
KIND_UDP = "2"
KIND_UDP_FLOW = "3"  # extension (udpflow.py): only after the client acknowledged it
KIND_NAMES = {KIND_TCP: "tcp", KIND_UDP: "udp", KIND_UDP_FLOW: "udp flow"}

# Extensions are advertised in the tunnel signal's query string (ignored by
# v1.0 clients) and acknowledged by a line from the client on the tunnel
# (never read by v1.0 servers).
EXTENSION_UDP_FLOW = ("udp", "flow")
ACK_UDP_FLOW = b"//flow#udp\n"


class ProtocolError(ValueError):
    """Bytes from the peer that do not follow the protocol."""


@dataclass(frozen=True)
class Signal:
    """One parsed signal line: ``//<host>?<query>#<kind>``."""

    host: str
    kind: str
    query: Dict[str, str]


def new_connection_id() -> str:
    """A fresh data connection id: 8 lowercase hex characters (4 random bytes)."""
    return binascii.hexlify(os.urandom(ID_LENGTH // 2)).decode("ascii")


def is_connection_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c in "0123456789abcdef" for c in text)


def encode_tunnel_signal(data_port: int, tls_mode: int, udp_flow: bool = False) -> bytes:
    query = b"?%s=%s" % tuple(part.encode() for part in EXTENSION_UDP_FLOW) if udp_flow else b""
    return b"//%d%s#%d\n" % (data_port, query, tls_mode)


def offers_udp_flow(signal: "Signal") -> bool:
    return signal.query.get(EXTENSION_UDP_FLOW[0]) == EXTENSION_UDP_FLOW[1]


def encode_launch_signal(connection_id: str, kind: str) -> bytes:
    return ("//%s#%s\n" % (connection_id, kind)).encode("ascii")


def parse_signal(line: bytes) -> Signal:
    """Parse one signal line (without or with its newline); raise ProtocolError."""
    if len(line) > MAX_SIGNAL_LENGTH:
        raise ProtocolError("signal longer than %d bytes" % MAX_SIGNAL_LENGTH)
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ProtocolError("signal is not ASCII") from None
    if not text.startswith("//") or any(c.isspace() or ord(c) < 32 for c in text):
        raise ProtocolError("not a signal: %r" % text[:80])
    # Split by hand (urls.py): urlsplit rejects some hosts on newer Pythons only.
    try:
        parts = split_url(text)
    except ValueError:
        raise ProtocolError("not a signal: %r" % text[:80]) from None
    host = hostname(parts.netloc)
    query = dict(query_pairs(parts.query))
    if not host:
        raise ProtocolError("signal without host: %r" % text[:80])
    return Signal(host, parts.fragment, query)


def parse_tunnel_signal(line: bytes) -> Signal:
    """The first line on the tunnel: the data port and the TLS mode."""
    return check_tunnel_signal(parse_signal(line))


def check_tunnel_signal(signal: Signal) -> Signal:
    """``signal`` if it is a valid tunnel signal; ProtocolError if not."""
    if not signal.host.isdigit() or not 1 <= int(signal.host) <= 65535:
        raise ProtocolError("tunnel signal without a data port: %r" % signal.host[:80])
    if signal.kind not in ("0", "1", "2"):
        raise ProtocolError("tunnel signal with unknown TLS mode %r" % signal.kind)
    return signal
