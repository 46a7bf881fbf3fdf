"""The NodePass wire protocol: every byte, kind, mode and timeout, found here.

Glossary:
    tunnel   the plain TCP control channel; the client dials the server's tunnel_addr
    data     a connection from the client to the server's data port, used once
    pool     pre-dialed data connections, waiting to be used
    target   where users arrive (server) / the private service (client)

v1.0 (docs/protocol.md, "Control channel" and "Data connections"):

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

Extensions, off unless switched on at both ends (docs/protocol.md, "Extension:
shared-key authentication" and "Extension: UDP flows"):

    shared key   "//0?auth=hmac-sha256&nonce=<Ns>#0\\n" challenge, "//<Nc>?mac=<M1>#auth\\n"
                 response, "//<port>?auth=hmac-sha256&mac=<M2>#<tls>\\n" or
                 "//0?error=auth#0\\n"; on data: <Nd> (32 hex), <M3> (64 hex), then the id;
                 a client that proved the key but cannot have the tunnel now hears
                 "//0?error=busy#0\\n" (another client has it) or "//0?error=cooldown#0\\n"
    UDP flows    "?udp=flow" in the tunnel signal, "//flow#udp\\n" from the client,
                 launch kind 3, then frames of a 2-byte big-endian length and a datagram

Signals are parsed like URLs: host = port or id, fragment = kind. A query
string is ignored by v1.0 clients, which is where extensions are advertised.
"""

import binascii
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

# The tunnel signal's TLS mode and the server's udp= value are the URL's
# (config.py), the flow frame header the flow engine's (udplink.py).
from nodepass_gevent.config import (  # noqa: F401 (the wire's vocabulary too)
    TLS_MODE_NAMES, TLS_MODES, TLS_NONE, TLS_SELF_SIGNED, TLS_VERIFIED, UDP_MODE_FLOW, UDP_MODE_V1,
    UDP_MODES, is_tls_mode)
from nodepass_gevent.copy.udplink import FLOW_FRAME_HEADER  # noqa: F401
from nodepass_gevent.urls import hostname, query_pairs, split_url

# -- v1.0 ----------------------------------------------------------------------

ID_LENGTH = 8  # hex characters a server writes at the start of every data connection
MAX_SIGNAL_LENGTH = 4096  # a longer line is not a NodePass signal
HEARTBEAT = b"\n"
# A tunnel silent for this many REPORT_INTERVALs (no heartbeat read, or one
# not acknowledged) is taken for dead.
HEARTBEAT_MISSES = 3
# Seconds a peer gets for each handshake, on either side: the tunnel signal
# (and the key exchange), TLS, the key proof and the id on a data connection.
HANDSHAKE_TIMEOUT = 5.0

KIND_TCP = "1"
KIND_UDP = "2"
KIND_UDP_FLOW = "3"  # extension (udp.py): only after the client acknowledged it
KIND_AUTH = "auth"   # extension (auth.py): the client's key response, client -> server
KIND_NAMES = {KIND_TCP: "tcp", KIND_UDP: "udp", KIND_UDP_FLOW: "udp flow"}

# -- extensions ----------------------------------------------------------------
# Advertised in the tunnel signal's query string (ignored by v1.0 clients) and
# acknowledged by a line from the client on the tunnel (never read by v1.0
# servers).

# UDP flows (udp.py): the offer, the answer, and how many UDP_READ_TIMEOUTs an
# idle flow lives (the frame header is udplink.py's FLOW_FRAME_HEADER): one
# while its user has sent a single datagram (a lone request, such as a DNS
# query or a probe, holds its data connection no longer than v1.0's exchange
# would), FLOW_IDLE_READ_TIMEOUTS once the user has sent a second.
EXTENSION_UDP_FLOW = ("udp", "flow")
ACK_UDP_FLOW = b"//flow#udp\n"
FLOW_IDLE_READ_TIMEOUTS = 12

# Shared-key authentication (auth.py): the scheme, the query fields, and the
# lengths of what is written raw on a data connection (lowercase hex).
AUTH_SCHEME = "hmac-sha256"
FIELD_AUTH, FIELD_NONCE, FIELD_MAC, FIELD_ERROR = "auth", "nonce", "mac", "error"
AUTH_NONCE_LENGTH = 32
AUTH_MAC_LENGTH = 64
_NO_PORT = "0"  # the host of a signal that carries no data port yet (challenge, rejection)


class ProtocolError(ValueError):
    """Bytes from the peer that do not follow the protocol."""


@dataclass(frozen=True)
class Signal:
    """One parsed signal line: ``//<host>?<query>#<kind>``."""

    host: str
    kind: str
    query: Dict[str, str]


IDS_PER_DRAW = 256  # ids made from one os.urandom() call (one getrandom(2) per id otherwise)
_drawn_ids = []  # type: List[str]


def new_connection_id() -> str:
    """A fresh data connection id: 8 lowercase hex characters (4 random bytes)."""
    if not _drawn_ids:
        text = binascii.hexlify(os.urandom(IDS_PER_DRAW * ID_LENGTH // 2)).decode("ascii")
        _drawn_ids.extend(text[start:start + ID_LENGTH]
                          for start in range(0, len(text), ID_LENGTH))
    return _drawn_ids.pop()


def is_connection_id(text: str) -> bool:
    return is_lower_hex(text, ID_LENGTH)


def is_lower_hex(text: str, length: int) -> bool:
    """Ids, nonces and MACs: exactly ``length`` lowercase hex characters."""
    return len(text) == length and not text.strip("0123456789abcdef")


def _encode_signal(host: str, kind: object,
                   fields: Iterable[Tuple[str, str]] = ()) -> bytes:
    """``//<host>?<name>=<value>&...#<kind>\\n``; no "?" without fields."""
    query = "&".join("%s=%s" % field for field in fields)
    return ("//%s%s#%s\n" % (host, "?" + query if query else "", kind)).encode("ascii")


def encode_tunnel_signal(data_port: int, tls_mode: int, udp_flow: bool = False,
                         mac: Optional[str] = None) -> bytes:
    """The tunnel signal; ``mac``: the server's key proof (auth.py), if a key is set."""
    fields = [(FIELD_AUTH, AUTH_SCHEME), (FIELD_MAC, mac)] if mac is not None else []
    if udp_flow:
        fields.append(EXTENSION_UDP_FLOW)
    return _encode_signal("%d" % data_port, "%d" % tls_mode, fields)


def offers_udp_flow(signal: "Signal") -> bool:
    return signal.query.get(EXTENSION_UDP_FLOW[0]) == EXTENSION_UDP_FLOW[1]


def encode_launch_signal(connection_id: str, kind: str) -> bytes:
    """_encode_signal's bytes without fields, formatted directly: one per user."""
    return ("//%s#%s\n" % (connection_id, kind)).encode("ascii")


def encode_auth_challenge(server_nonce: str) -> bytes:
    """The server's first line when it has a key (a v1.0 client reads port 0)."""
    return _encode_signal(_NO_PORT, TLS_NONE, [(FIELD_AUTH, AUTH_SCHEME),
                                               (FIELD_NONCE, server_nonce)])


AUTH_REJECTION = _encode_signal(_NO_PORT, TLS_NONE, [(FIELD_ERROR, FIELD_AUTH)])


# Why a server with a key turns away a client that proved it: only a key holder
# hears it (never a v1.0 client, which cannot prove a key), then the close.
REFUSED_BUSY = "busy"          # the tunnel has a client already
REFUSED_COOLDOWN = "cooldown"  # the last client left less than SERVICE_COOLDOWN ago


def encode_refusal(reason: str) -> bytes:
    """``//0?error=<reason>#0\\n``: after the key handshake, instead of the tunnel signal."""
    return _encode_signal(_NO_PORT, TLS_NONE, [(FIELD_ERROR, reason)])


def refusal_reason(signal: "Signal") -> Optional[str]:
    """REFUSED_BUSY or REFUSED_COOLDOWN if ``signal`` is such a refusal, else None."""
    reason = signal.query.get(FIELD_ERROR)
    return reason if reason in (REFUSED_BUSY, REFUSED_COOLDOWN) else None


def encode_auth_response(client_nonce: str, mac: str) -> bytes:
    return _encode_signal(client_nonce, KIND_AUTH, [(FIELD_MAC, mac)])


def is_auth_challenge(signal: "Signal") -> bool:
    return FIELD_AUTH in signal.query


def is_auth_rejection(signal: "Signal") -> bool:
    return signal.query.get(FIELD_ERROR) == FIELD_AUTH


def parse_signal(line: bytes) -> Signal:
    """Parse one signal line (without or with its newline); raise ProtocolError."""
    launch = _LAUNCH_SIGNAL.match(line)
    if launch is not None:  # the common case, once per user: no general parse
        return Signal(launch.group(1).decode("ascii"), launch.group(2).decode("ascii"), {})
    return parse_any_signal(line)


def parse_any_signal(line: bytes) -> Signal:
    """parse_signal without its shortcut for launch signals."""
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


# What parse_signal's general path makes of the same bytes, recognised at once.
_LAUNCH_SIGNAL = re.compile(rb"//([0-9a-f]{%d})#([0-9])\r?\n?\Z" % ID_LENGTH)


def parse_tunnel_signal(line: bytes) -> Signal:
    """The first line on the tunnel: the data port and the TLS mode."""
    return check_tunnel_signal(parse_signal(line))


def check_tunnel_signal(signal: Signal) -> Signal:
    """``signal`` if it is a valid tunnel signal; ProtocolError if not."""
    if not signal.host.isdigit() or not 1 <= int(signal.host) <= 65535:
        raise ProtocolError("tunnel signal without a data port: %r" % signal.host[:80])
    if not is_tls_mode(signal.kind):
        raise ProtocolError("tunnel signal with unknown TLS mode %r" % signal.kind)
    return signal
