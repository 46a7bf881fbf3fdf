"""v1.14 pool connection ids: 4 bytes the server writes first on every pool connection.

    client                              server
      | -- TCP connect (+ TLS 1.3) ----> |
      | <-- b1 15 57 62 ---------------- |   4 raw bytes from crypto/rand
      |                                  |   named "b1155762" (lowercase hex) in signals

    00 00 00 00 ("00000000") is the first connection a server session accepts:
    the control channel. Every later one gets a random id.

The client reads exactly 4 bytes (60 s deadline) [contract (d),
pool:handleConnection, generateID, createConnection]. Go draws ids at random
and does not skip zero or a live id; we do, so that an id names one connection.
"""

import binascii
import os
from typing import Callable, Container

ID_BYTES = 4
ID_NAME_LENGTH = 2 * ID_BYTES
CONTROL_ID = b"\x00" * ID_BYTES
CONTROL_NAME = "00000000"
ID_READ_TIMEOUT = 60.0  # seconds the client waits for the 4 bytes [pool:createConnection]
_HEX_DIGITS = frozenset("0123456789abcdef")


def id_name(raw: bytes) -> str:
    """The name signals use for a connection id: 8 lowercase hex characters."""
    if len(raw) != ID_BYTES:
        raise ValueError("a pool connection id is {} bytes, not {}".format(ID_BYTES, len(raw)))
    return binascii.hexlify(raw).decode("ascii")


def id_bytes(name: str) -> bytes:
    """The 4 bytes a name stands for; ValueError unless 8 lowercase hex characters."""
    if not is_id_name(name):
        raise ValueError("not a pool connection id: {!r}".format(name))
    return binascii.unhexlify(name)


def is_id_name(name: str) -> bool:
    return len(name) == ID_NAME_LENGTH and set(name) <= _HEX_DIGITS


def new_id(taken: Container[bytes] = (), random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh random id: never the control id, never one in ``taken``."""
    while True:
        raw = random_bytes(ID_BYTES)
        if raw != CONTROL_ID and raw not in taken:
            return raw
