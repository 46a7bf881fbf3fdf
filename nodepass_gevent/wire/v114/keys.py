"""The v1.14 tunnel key, the handshake's bearer token and the TLS fingerprint.

    URL  server://[USER[:password]@]HOST:PORT/...
                   |                     |
                   v                     v
    key = percent-decoded USER  if not empty, else
    key = hex(FNV-1a-32(PORT as written))        8 lowercase hex characters

    bearer = hex(HMAC-SHA256(key, b""))           64 lowercase hex characters
    fp     = "sha256:" + "AB:CD:...:EF"           SHA-256 of the leaf cert, DER,
                                                  32 uppercase byte pairs

The key is kept as bytes: Go's string is the bytes a percent-escape decodes to,
and those bytes are both the HMAC key and the XOR pad of every control line
[contract (b), common.go:getTunnelKey, generateAuthToken]. The bearer has no
nonce, no time and no port: it is the same on every handshake, so it proves
only that the peer knows the key (contract, "Known defects").
"""

import hashlib
import hmac
import re
from typing import Optional
from urllib.parse import unquote_to_bytes

from nodepass_gevent.urls import split_url

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193
BEARER_LENGTH = 64  # hex characters
FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT = re.compile(r"^sha256:[0-9A-F]{2}(:[0-9A-F]{2}){31}$")
_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def fnv1a32(data: bytes) -> int:
    """FNV-1a, 32 bits, as Go's hash/fnv New32a."""
    value = FNV32_OFFSET
    for byte in bytearray(data):
        value = ((value ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return value


def port_string(netloc: str) -> str:
    """The port of a URL's host part exactly as written, as Go's URL.Port().

    "" when there is none (no colon, or an empty port); digits are not
    normalised, so "010101" and "10101" give different keys, as in v1.14.
    """
    host = netloc.rpartition("@")[2]
    if "]:" in host:
        return host.partition("]:")[2]
    if "]" in host or ":" not in host:
        return ""
    return host.partition(":")[2]


def derive_key(user: Optional[str], port: str) -> bytes:
    """The tunnel key from the URL's raw (still percent-encoded) user name and port.

    ValueError for a malformed percent-escape, which Go's url.Parse refuses.
    """
    if user:
        if _PERCENT_ESCAPE.search(user):
            raise ValueError("invalid percent-escape in the tunnel key {!r}".format(user))
        key = unquote_to_bytes(user)
        if key:
            return key
    return "{:08x}".format(fnv1a32(port.encode("ascii", "replace"))).encode("ascii")


def key_from_url(url: str) -> bytes:
    """The key v1.14 derives from a server:// or client:// URL."""
    netloc = split_url(url).netloc
    userinfo, at, _ = netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else None
    return derive_key(user, port_string(netloc))


def bearer_token(key: bytes) -> str:
    """The handshake's bearer: hex of HMAC-SHA256 keyed with the key, of nothing."""
    return hmac.new(key, b"", hashlib.sha256).hexdigest()


def bearer_matches(key: bytes, token: str) -> bool:
    """True if ``token`` is this key's bearer, compared in constant time (hmac.Equal)."""
    expected = bearer_token(key).encode("ascii")
    try:
        given = token.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, expected)


def certificate_fingerprint(der: bytes) -> str:
    """v1.14's fingerprint of a DER certificate: "sha256:" + uppercase pairs joined by ':'."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return FINGERPRINT_PREFIX + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def is_fingerprint(text: str) -> bool:
    return bool(_FINGERPRINT.match(text))
