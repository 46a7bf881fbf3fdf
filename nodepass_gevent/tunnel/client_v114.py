"""The client role on the NodePass v1.14 wire (``wire=1.14``), TCP pool, reverse mode.

    session   client_session.open_tunnel   the GET handshake -> flow, max, tls, type
    pool      pool.ClientPool + pool_dial.PoolDialer   the first id 00000000 is control
    control   control.ControlChannel       ping/pong, tcp, verify, flush
    launches  tcp.launch, in the client's semaphore

client.Client runs one of these per session (its _serve_session picks the
wire); its reconnect loop handles the V114Error this raises when it ends.
"""

from typing import Optional

from gevent.event import AsyncResult

from nodepass_gevent.base import net
from nodepass_gevent.config import Address
from nodepass_gevent.tunnel import tcp
from nodepass_gevent.tunnel.pool import ClientPool
from nodepass_gevent.wire.v114 import client_session, control, handshake, pool_dial

CONTROL_WAIT = 10.0  # v1.14: 5 s for a pooled connection, then 5 s for id 0
TLS_NAMES = {"0": "plain", "1": "self-signed, checked by verify", "2": "verified"}

V114Error = client_session.V114Error
WireMismatch = client_session.WireMismatch


class V114Session:
    """One v1.14 session of ``client`` with ``server``; the attributes client.status reads."""

    def __init__(self, client, server: Address, sock=None) -> None:
        """``sock``: the tunnel connection, if wire detection dialed it already."""
        self.client, self.server = client, server
        self.key = client_session.key_for(client.config.auth_key, server.port)
        self.config = client_session.open_tunnel(server, self.key, sock=sock)
        self.tls_code = self.config.tls
        self.tls_mode = int(self.tls_code)
        if self.tls_mode < client.config.tls_mode:
            raise V114Error("tunnel to %s: the server offers tls=%d, below this client's"
                            " tls=%d" % (server, self.tls_mode, client.config.tls_mode))
        self.data_port = server.port  # one port for everything
        self._control_sock = AsyncResult()
        # tls=2 checks the name the Host header carries: "none" for an IP, as v1.14.
        sni = handshake.server_name(server.host)
        self.dialer = pool_dial.PoolDialer(server, self.tls_code, sni, self._control_sock.set)
        self.pool = None  # type: Optional[ClientPool]
        self.channel = None  # type: Optional[control.ControlChannel]

    @property
    def last_line(self) -> float:
        return self.channel.last_line if self.channel is not None else 0.0

    @property
    def control(self):
        """The control connection (pool id 00000000), as the v1 session's ``control``."""
        return self.channel.sock if self.channel is not None else None

    def serve(self) -> None:
        """Open the pool and the control channel, then serve until the channel ends."""
        client = self.client
        settings = client.settings
        self.pool = client.pool = ClientPool(
            self.dialer, settings.min_pool_capacity,
            max(settings.min_pool_capacity, self.config.max), client)
        self.pool.start()
        sock = self._control_sock.wait(CONTROL_WAIT)
        if sock is None:
            raise V114Error("tunnel to %s: no control connection (id 00000000) within %.0fs"
                            % (self.server, CONTROL_WAIT))
        self.channel = control.ControlChannel(sock, self.key, self.tls_code, self, client.log)
        client.log.info("Client: tunnel to %s open (v1.14 wire, tls=%s %s, type=0, flow -,"
                        " server max=%d)%s", self.server, self.tls_code,
                        TLS_NAMES[self.tls_code], self.config.max, client._on_server())
        client.opened_session()
        self.channel.run()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self._control_sock.ready():
            net.close_quietly(self._control_sock.get())

    # -- what the control channel asks of the role ----------------------------

    def take(self, name: str):
        return self.pool.take(name)

    def newest_idle(self) -> Optional[str]:
        return self.pool.newest_id()

    def fingerprint(self, name: str) -> str:
        """The peer certificate seen on ``name``, asked once, when it is taken."""
        return self.dialer.forget(name) or ""

    def flush(self) -> None:
        self.client.log.info("Client: the server asked for a flush: %d idle pool connections"
                             " closed", self.pool.idle)
        self.pool.flush()
        self.dialer.fingerprints.clear()  # of the connections just closed

    def launch_tcp(self, signal) -> None:
        self.client.launches.spawn(self._run_tcp, signal.id)

    def _run_tcp(self, name: str) -> None:
        data = self.pool.take(name)
        self.dialer.forget(name)
        if data is None:
            return
        client = self.client
        tcp.launch(data, client.target, client.stats, client.target_watch)
