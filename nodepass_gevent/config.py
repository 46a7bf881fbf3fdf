"""Turn the command-line URL and the environment into frozen configuration.

Everything here is pure: strings in, frozen dataclasses out, ``ConfigError``
(one readable line) for anything wrong. No sockets, no files beyond checking
that certificate paths were given.

    server://[KEY@]<tunnel_addr>/<target_addr>?log=<level>&tls=<0|1|2>&crt=<file>&key=<file>&udp=<flow|v1>
        &data_port=<port>&proxy=<1|2>&allow=<cidrs>&deny=<cidrs>&rate=<Mbit/s>&per_user=<n>
    client://[KEY@]<tunnel_addr>[,<tunnel_addr>...]/<target_addr>?log=<level>&tls=<minimum mode>

A client given several tunnel addresses fails over between those servers in
that order (failover.py); the first is ``Config.tunnel``, all of them
``Config.tunnels``. KEY (or the NODEPASS_KEY environment variable) switches on shared-key
authentication (auth.py); without it the wire bytes are v1.0's.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Tuple
from urllib.parse import unquote

# The environment variables are settings.py's; what is there is also reachable here,
# as it was before it moved (cli, tunnelset, nodepass-service read config.SETTINGS).
from nodepass_gevent.settings import (  # noqa: F401 (re-exported)
    MAX_UDP_DATA_BUF_SIZE, SETTINGS, ConfigError, Setting, Settings, load_settings,
    parse_duration)
from nodepass_gevent.urls import query_pairs, split_url

ROLES = ("server", "client")
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
KEY_VARIABLE = "NODEPASS_KEY"
# log_format=text|json, or this variable when the URL has none (the URL wins).
LOG_FORMATS = ("text", "json")
LOG_FORMAT_VARIABLE = "NODEPASS_LOG_FORMAT"
SERVER_PARAMS = ("log", "tls", "crt", "key", "udp", "data_port", "proxy", "allow", "deny", "rate",
                 "per_user", "log_format", "type", "wire")
CLIENT_PARAMS = ("log", "tls", "log_format", "wire", "type")
# type=: NodePass v1.14's pool transport. Only its TCP pool is spoken here.
POOL_TYPES = {"0": "TCP", "1": "QUIC", "2": "WebSocket", "3": "HTTP/2"}

# wire=: the NodePass wire a client speaks (wire/v1 or wire/v114); auto finds out
# per server (tunnel/wire_detect.py).
WIRE_AUTO, WIRE_V1, WIRE_V114 = "auto", "1.0", "1.14"
WIRES = (WIRE_AUTO, WIRE_V1, WIRE_V114)

# tls=: how data connections are secured, also the v1.0 tunnel signal's fragment
# (wire/v1/protocol.py carries it, copy/tls.py makes the contexts).
TLS_NONE, TLS_SELF_SIGNED, TLS_VERIFIED = 0, 1, 2
TLS_MODES = (TLS_NONE, TLS_SELF_SIGNED, TLS_VERIFIED)
TLS_MODE_NAMES = {TLS_NONE: "none", TLS_SELF_SIGNED: "self-signed", TLS_VERIFIED: "verified"}

# udp=: the server's UDP carriage (tunnel/udp.py). "flow", the default, offers
# flows, which a client that takes them gets and a v1.0 client never sees; "v1"
# pins v1.0's one connection per datagram and its tunnel signal, byte for byte.
UDP_MODE_FLOW, UDP_MODE_V1 = "flow", "v1"
UDP_MODES = (UDP_MODE_FLOW, UDP_MODE_V1)


def is_tls_mode(text: str) -> bool:
    return text in [str(mode) for mode in TLS_MODES]


@dataclass(frozen=True)
class Address:
    """A host and port as written in the URL; host '' means "all interfaces"."""

    host: str
    port: int

    def __str__(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)

    @property
    def dial_host(self) -> str:
        """Where to connect: an empty host means this machine."""
        return self.host or "localhost"


@dataclass(frozen=True)
class Config:
    """One tunnel endpoint, as the URL describes it."""

    role: str
    tunnel: Address
    target: Address
    log_level: str = "info"
    # Server: the TLS mode of data connections. Client: the least it accepts.
    tls_mode: int = 0
    crt: Optional[str] = None
    key: Optional[str] = None
    # Server: "flow" offers the UDP flow extension (udp.py); "v1" does not.
    udp_mode: str = UDP_MODE_FLOW
    # The shared key for authentication; None keeps the v1.0 protocol.
    auth_key: Optional[bytes] = field(default=None, repr=False)
    # Client: every server to fail over between, in order (``tunnel`` first).
    # Empty means just ``tunnel``; see ``servers``.
    tunnels: Tuple[Address, ...] = ()
    # Server, at the edge (issue 13). Defaults: none of it, nothing changes.
    proxy_version: int = 0    # 1 or 2: a PROXY protocol header to the service (proxyheader.py)
    allow: Tuple = ()         # ip_network tuples (access.py): users admitted ...
    deny: Tuple = ()          # ... and refused
    rate_mbit: Optional[float] = None  # per tunnel and direction (ratelimit.py)
    per_user: Optional[int] = None     # concurrent TCP connections per user address
    # Server: the data port (data_port=); 0 picks one at random at start-up, as v1.0.
    data_port: int = 0
    log_format: str = "text"  # "json": one JSON object a log line (log.py)
    wire: str = WIRE_AUTO  # client: the wire spoken, WIRES

    @property
    def servers(self) -> Tuple[Address, ...]:
        """The tunnel addresses to dial, in failover order (at least one)."""
        return self.tunnels or (self.tunnel,)

    def edge_summary(self) -> str:
        """The edge parameters as `--check` and the start-up line show them ('' if none)."""
        parts = []
        if self.proxy_version:
            parts.append("proxy=%d" % self.proxy_version)
        for name in ("allow", "deny"):
            networks = getattr(self, name)
            if networks:
                parts.append("%s=%s" % (name, ",".join(_network_text(n) for n in networks)))
        if self.rate_mbit is not None:
            parts.append("rate=%gMbit/s" % self.rate_mbit)
        if self.per_user is not None:
            parts.append("per_user=%d" % self.per_user)
        return " ".join(parts)


def parse_url(text: str, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Parse a ``server://`` or ``client://`` URL into a Config.

    The shared key comes from the URL's user part or, failing that, from
    NODEPASS_KEY in ``environ``.
    """
    scheme, sep, _ = text.partition("://")
    if not sep:
        raise ConfigError("not a URL: %r (expected server://... or client://...)" % text)
    if scheme not in ROLES:
        raise ConfigError("unknown scheme %r: use server:// or client://" % scheme)
    if _CONTROL_CHARACTER.search(text):
        # Newer Pythons' urlsplit would silently drop tabs and newlines.
        raise ConfigError("bad URL %r: it contains a control character" % text)
    try:
        parts = split_url(text)
    except ValueError as exc:  # an unclosed [IPv6] bracket
        raise ConfigError("bad URL %r: %s" % (text, exc)) from None
    environ = os.environ if environ is None else environ
    auth_key = _auth_key(parts.netloc, environ)
    tunnels = parse_tunnel_addresses(parts.netloc.rpartition("@")[2], scheme)
    target = parse_address(parts.path.lstrip("/"), "target address")
    params = _query_params(parts.query, SERVER_PARAMS if scheme == "server" else CLIENT_PARAMS)
    log_level = params.get("log", "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError("bad log level %r: use one of %s" % (log_level, ", ".join(LOG_LEVELS)))
    tls_mode = _tls_mode(params.get("tls", str(TLS_NONE)))
    crt, key = params.get("crt") or None, params.get("key") or None
    if scheme == "server" and tls_mode == TLS_VERIFIED and not (crt and key):
        raise ConfigError("tls=2 needs both crt=<certificate file> and key=<private key file>")
    if scheme == "server" and tls_mode != TLS_VERIFIED and (crt or key):
        raise ConfigError("crt and key are used only with tls=2")
    udp_mode = params.get("udp", UDP_MODE_FLOW)
    if udp_mode not in UDP_MODES:
        raise ConfigError("bad udp value %r: use flow (one connection per user address where"
                          " the client takes it, the default) or v1 (one connection per"
                          " datagram, as NodePass v1.0)" % udp_mode)
    data_port = _data_port(params.get("data_port", "0"), tunnels[0])
    _check_pool_type(params.get("type", "0"))
    wire = params.get("wire", WIRE_AUTO)
    if wire not in WIRES:
        raise ConfigError("bad wire value %r: use auto (find out per server, the default), 1.0"
                          " (NodePass v1.0) or 1.14 (NodePass v1.14, TCP pool)" % wire)
    return Config(scheme, tunnels[0], target, log_level, tls_mode, crt, key, udp_mode, auth_key,
                  tunnels=tunnels if len(tunnels) > 1 else (), data_port=data_port,
                  log_format=_log_format(params, environ), wire=wire, **_edge_params(params))


def _check_pool_type(text: str) -> None:
    """type= (v1.14): 0, the TCP pool, is the only one served; 1-3 are refused."""
    if text not in POOL_TYPES:
        raise ConfigError("bad type value %r: NodePass v1.14's pool types are 0 (TCP), 1"
                          " (QUIC), 2 (WebSocket), 3 (HTTP/2)" % text)
    if text != "0":
        raise ConfigError("type=%s (%s) is not supported yet: only type=0, the TCP pool"
                          % (text, POOL_TYPES[text]))


def _data_port(text: str, tunnel: Address) -> int:
    """data_port= (server): the port the client dials for data connections, on
    the tunnel address's host; 0 (the default) picks one at random at start-up."""
    if not _ASCII_DIGITS.match(text) or int(text) > 65535:
        raise ConfigError("bad data_port value %r: expected a port from 1 to 65535 (or 0 for a"
                          " random one, the default)" % text)
    if int(text) == tunnel.port:
        raise ConfigError("data_port=%s is the tunnel port: data connections need a port of"
                          " their own, pick another" % text)
    return int(text)


def _log_format(params: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """log_format= from the URL, else NODEPASS_LOG_FORMAT, else text."""
    if "log_format" in params:
        text, where = params["log_format"], "log_format value"
    else:
        text, where = environ.get(LOG_FORMAT_VARIABLE, "").strip(), LOG_FORMAT_VARIABLE
    if not text:
        return LOG_FORMATS[0]
    if text.lower() not in LOG_FORMATS:
        raise ConfigError("bad %s %r: use text (the default) or json (one JSON object a line)"
                          % (where, text))
    return text.lower()


def _network_text(network) -> str:
    """A one-address network as the address, any other as its CIDR."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


PROXY_VERSIONS = ("1", "2")
MAX_RATE_MBIT = 100000.0  # 100 Gbit/s: beyond any link this runs on; a typo above it


def _edge_params(params: Mapping[str, str]) -> dict:
    """proxy=, allow=, deny=, rate=, per_user= (server only; SERVER_PARAMS lets them in)."""
    edge = {}
    if "proxy" in params:
        if params["proxy"] not in PROXY_VERSIONS:
            raise ConfigError("bad proxy value %r: use 1 (PROXY protocol v1, text) or 2 (v2,"
                              " binary)" % params["proxy"])
        edge["proxy_version"] = int(params["proxy"])
    for name in ("allow", "deny"):
        if name in params:
            edge[name] = parse_networks(name, params[name])
    if "rate" in params:
        edge["rate_mbit"] = _rate(params["rate"])
    if "per_user" in params:
        text = params["per_user"]
        if not _ASCII_DIGITS.match(text) or int(text) < 1:
            raise ConfigError("bad per_user value %r: expected a whole number of at least 1"
                              " (concurrent TCP connections from one user address)" % text)
        edge["per_user"] = int(text)
    return edge


def parse_networks(name: str, text: str) -> tuple:
    """A comma-separated list of addresses and CIDRs -> ip_network objects.

    Strict, so that a typo cannot widen a list: no host bits after the prefix
    (10.0.0.1/8), no leading zeros, no empty entries; errors name the entry.
    """
    if not text.strip():
        raise ConfigError("%s= is empty: give addresses or CIDRs (10.0.0.0/8,::1), or leave it"
                          " out" % name)
    networks = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            raise ConfigError("bad %s list %r: an empty entry (two commas?)" % (name, text))
        networks.append(_network(name, entry))
    return tuple(networks)


def _network(name: str, entry: str):
    address, slash, prefix = entry.partition("/")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not (_is_ipv4(address) or (":" in address and "%" not in address and _is_ipv6(address))):
        raise ConfigError("bad %s entry %r: %r is not an IPv4 or IPv6 address"
                          % (name, entry, address))
    longest = 32 if _is_ipv4(address) else 128
    if slash and not (_ASCII_DIGITS.match(prefix) and int(prefix) <= longest):
        raise ConfigError("bad %s entry %r: the prefix length must be a number from 0 to %d"
                          % (name, entry, longest))
    try:
        return ipaddress.ip_network(address + (slash + str(int(prefix)) if slash else ""))
    except ValueError as exc:
        if "host bits" in str(exc):
            wider = ipaddress.ip_network(address + "/" + prefix, strict=False)
            raise ConfigError("bad %s entry %r: host bits set after the prefix (did you mean"
                              " %s?)" % (name, entry, wider)) from None
        raise ConfigError("bad %s entry %r: %s" % (name, entry, exc)) from None


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not re.match(r"(\d+\.?\d*|\.\d+)\Z", text) or not 0 < rate <= MAX_RATE_MBIT:
        raise ConfigError("bad rate value %r: expected Mbit/s per direction, a number above 0"
                          " and at most %d (e.g. rate=8 or rate=0.5)" % (text, MAX_RATE_MBIT))
    return rate


def parse_tunnel_addresses(text: str, role: str) -> Tuple[Address, ...]:
    """One tunnel address, or (client only) a comma-separated failover list."""
    if "," not in text:
        return (parse_address(text, "tunnel address"),)
    if role != "client":
        raise ConfigError("a server listens on one tunnel address, not a list (%r);"
                          " several addresses, for failover, are for client:// only" % text)
    addresses = []  # type: List[Address]
    for number, part in enumerate(text.split(","), 1):
        if not part:
            raise ConfigError("empty tunnel address (number %d) in the list %r" % (number, text))
        address = parse_address(part, "tunnel address")
        if address in addresses:
            raise ConfigError("tunnel address %s is listed twice in %r" % (address, text))
        addresses.append(address)
    return tuple(addresses)


def format_addresses(addresses) -> str:
    """Addresses as the URL writes them, comma-separated."""
    return ",".join(str(address) for address in addresses)


def _auth_key(netloc: str, environ: Mapping[str, str]) -> Optional[bytes]:
    user, at, _ = netloc.rpartition("@")
    if not at:
        key = environ.get(KEY_VARIABLE, "")
        return key.encode("utf-8") if key else None
    if ":" in user:
        raise ConfigError("write the shared key as KEY@host:port (no user:password)")
    key = unquote(user)
    if not key:
        raise ConfigError("empty shared key before '@'")
    return key.encode("utf-8")


def without_key(url: str) -> str:
    """The URL with its shared key removed (to keep it out of process listings)."""
    scheme, sep, rest = url.partition("://")
    netloc_end = len(rest)
    for mark in "/?#":
        if mark in rest:
            netloc_end = min(netloc_end, rest.index(mark))
    netloc = rest[:netloc_end]
    return scheme + sep + netloc.rpartition("@")[2] + rest[netloc_end:]


def parse_address(text: str, what: str, lowest_port: int = 1) -> Address:
    """Parse ``host:port``, ``:port``, ``[v6]:port`` or ``name:port``.

    ``lowest_port=0`` also takes port 0, "any free port", for a listener whose
    address is logged once it is bound (--metrics)."""
    if not text:
        raise ConfigError("missing %s (expected host:port)" % what)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError("bad %s %r (expected [ipv6]:port)" % (what, text))
        if _is_ipv4(host):
            raise ConfigError("bad %s %r: only IPv6 addresses go in brackets, write %s"
                              % (what, text, host + rest))
        if not _is_ipv6(host):
            raise ConfigError("bad %s %r: %r is not an IPv6 address" % (what, text, host))
        return Address(host, _port(rest[1:], what, text, lowest_port))
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ConfigError("bad %s %r: missing :port" % (what, text))
    if ":" in host:
        raise ConfigError("bad %s %r: write IPv6 hosts in brackets, [::1]:port" % (what, text))
    if host and not _HOSTNAME.match(host):
        raise ConfigError("bad %s %r: %r is not a host name or address" % (what, text, host))
    if _DIGITS_AND_DOTS.match(host) and not _is_ipv4(host):
        raise ConfigError("bad %s %r: %r is not an IPv4 address" % (what, text, host))
    return Address(host, _port(port, what, text, lowest_port))


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}\Z")
_ASCII_DIGITS = re.compile(r"[0-9]+\Z")  # str.isdigit() takes "１２" or "²" too
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+\Z")
_IPV4_OCTET = re.compile(r"(0|[1-9][0-9]{0,2})\Z")
_IPV6_ZONE = re.compile(r"[A-Za-z0-9._~-]+\Z")


def _is_ipv4(host: str) -> bool:
    """Dotted decimal, four octets, no leading zeros.

    Written out because ipaddress accepts leading zeros ("010.0.0.1", octal
    to some resolvers) before 3.9.5 and rejects them after.
    """
    octets = host.split(".")
    return len(octets) == 4 and all(_IPV4_OCTET.match(octet) and int(octet) <= 255
                                    for octet in octets)


def _is_ipv6(host: str) -> bool:
    """An IPv6 address, optionally with a %zone (fe80::1%eth0).

    ipaddress takes a zone only from 3.9 on, and its rules for an embedded
    IPv4 tail changed with the leading-zero fix: both are checked here.
    """
    address, percent, zone = host.partition("%")
    if percent and not _IPV6_ZONE.match(zone):
        return False
    if "." in address and not _is_ipv4(address.rpartition(":")[2]):
        return False
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True


def _port(text: str, what: str, whole: str, lowest: int = 1) -> int:
    if not _ASCII_DIGITS.match(text) or not lowest <= int(text) <= 65535:
        raise ConfigError("bad %s %r: port must be a number from %d to 65535"
                          % (what, whole, lowest))
    return int(text)


def _query_params(query: str, allowed: Tuple[str, ...]) -> Mapping[str, str]:
    params = {}
    for name, value in query_pairs(query, keep_blank_values=True):
        if name not in allowed:
            raise ConfigError(
                "unknown URL parameter %r: this mode takes %s" % (name, ", ".join(allowed)))
        value = unquote(value)
        if name in params:
            raise repeated_parameter(name, params[name], value)
        params[name] = value
    return params


def repeated_parameter(name: str, first: str, second: str) -> ConfigError:
    """A parameter given twice: neither value is taken (the last one was, silently)."""
    return ConfigError("URL parameter %r is given twice (%s=%s and %s=%s): give it once"
                       % (name, name, first, name, second))


def _tls_mode(text: str) -> int:
    if not is_tls_mode(text):
        raise ConfigError("bad tls value %r: use 0 (none), 1 (self-signed) or 2 (crt/key)" % text)
    return int(text)


