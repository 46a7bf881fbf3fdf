"""Shared-key authentication: challenge-response with HMAC-SHA256 (an extension).

Switched on by a key in the URL (``server://KEY@host:port/...``, the same on
both sides) or NODEPASS_KEY. Without a key not one byte differs from v1.0.
With a key, nothing is revealed before the peer has proved it knows the key:

  tunnel                                      server
    | <-- "//0?auth=hmac-sha256&nonce=<Ns>#0\\n"  |  challenge (v1.0 clients read port 0
    |                                          |  and give up)
    | --> "//<Nc>?mac=<M1>#auth\\n" ---------->  |  M1 = HMAC(key, client|Ns|Nc)
    | <-- "//<port>?auth=hmac-sha256&mac=<M2>#<tls>\\n"
    |                                          |  M2 = HMAC(key, server|Nc|Ns|port|tls)
    |     or "//0?error=auth#0\\n", then close  |
  data connection (after TLS, before the id)
    | <-- "<Nd>" (32 hex) --------------------  |
    | --> "<M3>" (64 hex) -------------------->  |  M3 = HMAC(key, data|Nd)
    | <-- "<id>" (8 hex), as in v1.0 ---------  |

The lines and lengths are defined in protocol.py; this module adds the MACs.
Nonces are 16 random bytes as 32 hex characters, fresh on every connection,
so a recorded handshake is worthless. M2 also covers the port and the TLS
mode, so the plain-text tunnel signal cannot be rewritten. MACs are compared
in constant time.
"""

import binascii
import hashlib
import hmac
import os
from typing import Optional

from nodepass_gevent.wire.v1 import protocol
from nodepass_gevent.wire.v1.protocol import AUTH_NONCE_LENGTH, FIELD_MAC

_LABEL_CLIENT, _LABEL_SERVER, _LABEL_DATA = b"nodepass client", b"nodepass server", b"nodepass data"


class AuthError(Exception):
    """The peer does not know our key, or does not ask for one when we have one."""


def new_nonce() -> str:
    return binascii.hexlify(os.urandom(AUTH_NONCE_LENGTH // 2)).decode("ascii")


def _mac(key: bytes, label: bytes, *parts: object) -> str:
    message = b"|".join([label] + [str(part).encode("ascii") for part in parts])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _same(expected: str, received: Optional[str]) -> bool:
    return received is not None and hmac.compare_digest(expected.encode(),
                                                        received.encode("ascii", "replace"))


def is_nonce(text: str) -> bool:
    return protocol.is_lower_hex(text, AUTH_NONCE_LENGTH)


# -- the tunnel handshake (its lines are protocol.py's) -----------------------------

def client_response(key: bytes, server_nonce: str, client_nonce: str) -> bytes:
    mac = _mac(key, _LABEL_CLIENT, server_nonce, client_nonce)
    return protocol.encode_auth_response(client_nonce, mac)


def check_client_response(key: bytes, server_nonce: str, line: bytes) -> Optional[str]:
    """The client's nonce if its response proves the key, else None."""
    try:
        signal = protocol.parse_signal(line)
    except protocol.ProtocolError:
        return None
    if signal.kind != protocol.KIND_AUTH or not is_nonce(signal.host):
        return None
    expected = _mac(key, _LABEL_CLIENT, server_nonce, signal.host)
    return signal.host if _same(expected, signal.query.get(FIELD_MAC)) else None


def encode_tunnel_signal(key: bytes, client_nonce: str, server_nonce: str, data_port: int,
                         tls_mode: int, udp_flow: bool = False) -> bytes:
    """The tunnel signal with the server's proof, offering UDP flows if ``udp_flow``."""
    mac = _mac(key, _LABEL_SERVER, client_nonce, server_nonce, data_port, tls_mode)
    return protocol.encode_tunnel_signal(data_port, tls_mode, udp_flow, mac)


def check_tunnel_signal(key: bytes, client_nonce: str, server_nonce: str,
                        signal: protocol.Signal) -> bool:
    expected = _mac(key, _LABEL_SERVER, client_nonce, server_nonce, signal.host, signal.kind)
    return _same(expected, signal.query.get(FIELD_MAC))


# -- data connections ----------------------------------------------------------------

def data_response(key: bytes, data_nonce: str) -> bytes:
    return _mac(key, _LABEL_DATA, data_nonce).encode("ascii")


def check_data_response(key: bytes, data_nonce: str, response: bytes) -> bool:
    return _same(_mac(key, _LABEL_DATA, data_nonce), response.decode("ascii", "replace"))
