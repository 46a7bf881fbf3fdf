"""The PROXY protocol header (HAProxy's, v1 and v2) that tells the service who the user is.

With ``proxy=1`` or ``proxy=2`` the server writes one header as the first
bytes of the data connection it hands to a TCP user, right after the launch
signal; the client forwards it to the service like any other byte, so a
v1.0 client needs no change. The service (nginx ``proxy_protocol``, HAProxy
``accept-proxy``, Postfix, ...) reads it and logs the user, not the client.

    v1 (text, at most 107 bytes):
        "PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\r\n"
        "PROXY TCP6 <src ip> <dst ip> <src port> <dst port>\r\n"
        "PROXY UNKNOWN\r\n"                     addresses not known / mixed

    v2 (binary):
        +------------------------------------+---------+--------+------------+-----------+
        | signature (12)                     | ver_cmd | family | length (2, | addresses |
        | 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A| (1)     | (1)    | big-endian)| (length)  |
        +------------------------------------+---------+--------+------------+-----------+
        ver_cmd 0x21 = version 2, PROXY; 0x20 = version 2, LOCAL (no addresses)
        family  0x11 = TCP over IPv4: src ip (4), dst ip (4), src port (2), dst port (2)
                0x21 = TCP over IPv6: src ip (16), dst ip (16), src port (2), dst port (2)
                0x00 = UNSPEC, with LOCAL and length 0

"src" is the user's address, "dst" the address the user connected to (the
server's target_addr as the user saw it). An IPv4 user on a dual-stack
listener arrives as ::ffff:a.b.c.d and is written as TCP4. When either end
is unknown, or the two are of different families, v1 says UNKNOWN and v2
LOCAL, as HAProxy itself does: the receiver then uses the connection's own
addresses. UDP gets no header (the spec's DGRAM form has no consumer that
reads it from a stream; see docs/protocol.md).

Pure functions: addresses in, bytes out.
"""

import socket
import struct
from typing import Optional, Tuple

VERSIONS = (1, 2)

V1_PREFIX = b"PROXY "
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_MAX_LENGTH = 107  # the spec's bound, CRLF included

V2_SIGNATURE = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
V2_PROXY = 0x21      # version 2 (high nibble), command PROXY (low nibble)
V2_LOCAL = 0x20      # version 2, command LOCAL
V2_TCP4 = 0x11       # AF_INET (high nibble), STREAM (low nibble)
V2_TCP6 = 0x21       # AF_INET6, STREAM
V2_UNSPEC = 0x00
V2_FIXED = struct.Struct("!12sBBH")  # signature, ver_cmd, family, length
V2_LOCAL_HEADER = V2_FIXED.pack(V2_SIGNATURE, V2_LOCAL, V2_UNSPEC, 0)
V2_PORTS = struct.Struct("!HH")

IPV4_MAPPED = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96

# (source packed ip, source port, destination packed ip, destination port),
# both ips 4 bytes or both 16: _same_family()'s answer.
Addresses = Tuple[bytes, int, bytes, int]


def encode(version: int, source: Optional[tuple], destination: Optional[tuple]) -> bytes:
    """The header of ``version`` (1 or 2) for a TCP user at ``source`` that
    connected to ``destination``, (ip, port, ...) as getpeername() gives them;
    either may be None (unknown)."""
    addresses = _same_family(source, destination)
    if version == 1:
        return encode_v1(addresses)
    if version == 2:
        return encode_v2(addresses)
    raise ValueError("PROXY protocol version must be 1 or 2, not %r" % (version,))


def encode_v1(addresses: Optional[Addresses]) -> bytes:
    """v1 text; None: UNKNOWN."""
    if addresses is None:
        return V1_UNKNOWN
    source_ip, source_port, destination_ip, destination_port = addresses
    family = socket.AF_INET if len(source_ip) == 4 else socket.AF_INET6
    return ("PROXY %s %s %s %d %d\r\n" % ("TCP4" if family == socket.AF_INET else "TCP6",
                                          socket.inet_ntop(family, source_ip),
                                          socket.inet_ntop(family, destination_ip),
                                          source_port, destination_port)).encode("ascii")


def encode_v2(addresses: Optional[Addresses]) -> bytes:
    """v2 binary; None: LOCAL."""
    if addresses is None:
        return V2_LOCAL_HEADER
    source_ip, source_port, destination_ip, destination_port = addresses
    block = source_ip + destination_ip + V2_PORTS.pack(source_port, destination_port)
    family = V2_TCP4 if len(source_ip) == 4 else V2_TCP6
    return V2_FIXED.pack(V2_SIGNATURE, V2_PROXY, family, len(block)) + block


def packed_ip(host: str) -> Optional[bytes]:
    """The address as 4 or 16 bytes (IPv4-mapped IPv6 as its 4, a %zone dropped),
    or None if ``host`` is not an IP address. inet_pton, not ipaddress: this runs
    once per user, and is several times cheaper."""
    try:
        if ":" not in host:
            return socket.inet_pton(socket.AF_INET, host)
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except (OSError, ValueError):
        return None
    return packed[12:] if packed[:12] == IPV4_MAPPED else packed


def _same_family(source: Optional[tuple], destination: Optional[tuple]
                 ) -> Optional[Addresses]:
    """Both ends as packed ips of one family, or None if that cannot be had."""
    if source is None or destination is None:
        return None
    source_ip, destination_ip = packed_ip(source[0]), packed_ip(destination[0])
    if source_ip is None or destination_ip is None or len(source_ip) != len(destination_ip):
        return None
    return source_ip, int(source[1]), destination_ip, int(destination[1])
