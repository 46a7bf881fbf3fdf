"""The v1.14 client's pool connections: dial the tunnel port, TLS 1.3 if told, read the id.

    client                                  server (the same tunnel port)
      | -- TCP connect ---------------------> |
      | <== TLS 1.3 (tls=1: no checks) ====> |   tls=2: verified, server_hostname = sni
      | <-- 4 bytes: the connection id ------ |   "00000000" is the control channel

[contract (d)]. The first connection the server names 00000000 is not pooled:
it goes to ``on_control`` and the dial goes on to another one. The peer
certificate's fingerprint is kept per id for the verify signals (control.py).
"""

import socket
import ssl
from typing import Callable, Dict, Optional, Tuple

from nodepass_gevent.base import net
from nodepass_gevent.config import Address
from nodepass_gevent.copy import readers, tls, tlsstream
from nodepass_gevent.wire.v114 import ids
from nodepass_gevent.wire.v114.keys import certificate_fingerprint

CONNECT_TIMEOUT = 5.0   # NP_TCP_DIAL_TIMEOUT
TLS_TIMEOUT = 5.0       # NP_HANDSHAKE_TIMEOUT
TLS_VERIFIED = "2"  # the handshake reply's tls code for a verified certificate


def client_context(tls_code: str) -> Optional[ssl.SSLContext]:
    """v1.0's client context for that mode (copy/tls.py: no checks at tls=1, the
    system roots at tls=2, a bare FIN ends a stream), held to TLS 1.3 as v1.14 is."""
    context = tls.client_context(int(tls_code))
    return None if context is None else tls.require_tls_1_3(context)


class PoolDialer:
    """``dialer()`` is one pool connection, (id name, socket), for tunnel.pool.ClientPool."""

    def __init__(self, address: Address, tls_code: str, sni: str,
                 on_control: Callable[[socket.socket], None]) -> None:
        self.address = address
        self.tls_code = tls_code
        self.sni = sni
        self.context = client_context(tls_code)
        self.on_control = on_control
        self.fingerprints = {}  # type: Dict[str, str]  (id -> peer cert seen on it)

    def __call__(self) -> Tuple[str, socket.socket]:
        while True:
            name, sock = self._dial_one()
            if name != ids.CONTROL_NAME:
                return name, sock
            self.on_control(sock)

    def forget(self, name: str) -> Optional[str]:
        """The fingerprint seen on ``name``, now dropped (its connection is gone)."""
        return self.fingerprints.pop(name, None)

    def _dial_one(self) -> Tuple[str, socket.socket]:
        sock = net.dial_tcp(self.address, CONNECT_TIMEOUT)
        try:
            fingerprint = ""
            if self.context is not None:
                sock.settimeout(TLS_TIMEOUT)
                server_name = self.sni if self.tls_code == TLS_VERIFIED else None
                # A TLSStream, not an SSLSocket: the copy engines know it (relay.py).
                sock = tlsstream.client_handshake(sock, self.context, server_name)
                fingerprint = certificate_fingerprint(sock.getpeercert(binary_form=True))
            sock.settimeout(ids.ID_READ_TIMEOUT)
            name = ids.id_name(readers.recv_exactly(sock, ids.ID_BYTES))
            sock.settimeout(None)
        except BaseException:
            net.close_quietly(sock)
            raise
        if fingerprint:
            self.fingerprints[name] = fingerprint
        return name, sock

