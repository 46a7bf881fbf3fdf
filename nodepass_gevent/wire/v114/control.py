"""The v1.14 control channel, both roles: pool connection 00000000, signals both ways.

    client                                   server
      | <> ping at once, then every 5 s ---->  |   each side answers the other's with pong
      | <- tcp {remote, id} ------------------ |   take pool conn id, dial the target, relay
      | <> verify {id, fp} (tls 1/2) -------->  |   ours: the NEWEST idle conn, then closed
      | <- flush ----------------------------- |   close every idle pool conn

[contract (e)]. One writer greenlet, so lines never interleave; the reader
gives up after LIVENESS s without a line (3 missed pings), which ends the
session. A bad line is logged and skipped; an unknown action is ignored.
What a signal does to the pool and the target is the role's (``peer``): the
client's is tunnel/client_v114.py, the server's tunnel/server_v114.py. The
two differ only there: the fingerprint a verify carries is the one the
client saw on that connection, or the server's own.
"""

import socket
import time

import gevent
from gevent.event import Event
from gevent.queue import Queue

from nodepass_gevent.base import net
from nodepass_gevent.wire.v114 import signals
from nodepass_gevent.wire.v114.client_session import V114Error

PING_INTERVAL = 5.0   # NP_REPORT_INTERVAL
LIVENESS = 15.0       # 3 x PING_INTERVAL without a line ends the session
READ_SIZE = 4096
VERIFY_WAIT = 5.0     # for a pooled connection to name in our verify


class ControlLost(V114Error):
    """The control channel ended: EOF, silence past LIVENESS, or a failed verify."""


class ControlChannel:
    """Run by ``run()`` until it ends (ControlLost); ``close()`` never raises.

    ``peer`` gives: take(id) -> socket or None (waiting briefly for an id not
    pooled yet), newest_idle() -> id or None, fingerprint(id) -> str,
    launch_tcp(signal), flush(). ``tls_code`` "0" sends no verify. ``role``
    ("Client" or "Server") starts the log lines; ``other`` names the far end
    in them ("the server", "the client").
    """

    def __init__(self, sock: socket.socket, key: bytes, tls_code: str, peer, log,
                 role: str = "Client", other: str = "the server") -> None:
        self.sock, self.key, self.tls_code = sock, key, tls_code
        self.peer, self.log = peer, log
        self.role, self.other = role, other
        self.last_line = time.monotonic()
        # The far end's verify matched (set at once at tls 0): the side that
        # accepts users serves none before it, as v1.14 does.
        self.verified = Event()
        if tls_code == "0":
            self.verified.set()
        self._own_verify = {}  # id -> fp of the connection our verify took
        self._outbox = Queue()
        self._greenlets = []
        self._lost = None

    def run(self) -> None:
        self._greenlets = [gevent.spawn(self._write_forever), gevent.spawn(self._ping_forever)]
        if self.tls_code != "0":
            self._greenlets.append(gevent.spawn(self._send_verify))
        try:
            self._read_forever()
        finally:
            self.close()

    def send(self, signal: signals.Signal) -> None:
        self._outbox.put(signals.encode_signal(signal, self.key))

    def close(self) -> None:
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        net.close_quietly(self.sock)

    # -- writing -----------------------------------------------------------

    def _write_forever(self) -> None:
        try:
            for line in self._outbox:
                self.sock.sendall(line)
        except OSError as exc:
            self._lose("control channel write failed: %s" % net.describe(exc))

    def _ping_forever(self) -> None:
        while True:
            self.send(signals.ping())
            gevent.sleep(PING_INTERVAL)

    def _lose(self, reason: str) -> None:
        """End the session from a helper greenlet: the reader raises ControlLost."""
        self._lost = reason
        net.abort(self.sock)

    # -- reading -----------------------------------------------------------

    def _read_forever(self) -> None:
        self.sock.settimeout(LIVENESS)
        rest = b""
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except socket.timeout:
                raise ControlLost("control channel silent for %.0fs (no ping)" % LIVENESS)
            except OSError as exc:
                raise ControlLost(self._lost or "control channel lost: %s" % net.describe(exc))
            if not data:
                raise ControlLost(self._lost or "control channel closed by %s" % self.other)
            self.last_line = time.monotonic()
            try:
                lines, rest = signals.split_lines(rest + data)
            except signals.SignalError as exc:
                raise ControlLost("control channel: %s" % exc) from None
            for line in lines:
                self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        try:
            signal = signals.decode_signal(line, self.key)
        except signals.UnknownAction as exc:
            self.log.debug("%s: control signal ignored: %s", self.role, exc)
            return
        except signals.SignalError as exc:
            self.log.warning("%s: control line skipped: %s", self.role, exc)
            return
        if signal.action == signals.PING:
            self.send(signals.pong())
        elif signal.action == signals.TCP:
            self.peer.launch_tcp(signal)
        elif signal.action == signals.FLUSH:
            self.peer.flush()
        elif signal.action == signals.VERIFY:
            gevent.spawn(self._check_verify, signal)
        elif signal.action == signals.UDP:
            self.log.warning("%s: UDP on the v1.14 wire is not supported yet; session %s"
                             " dropped", self.role, signal.id)
            gevent.spawn(self._drop, signal.id)

    def _drop(self, name: str) -> None:
        net.close_quietly(self.peer.take(name))

    # -- verify (tls 1/2) ----------------------------------------------------

    def _send_verify(self) -> None:
        """Our verify names the newest idle connection: the Go peer picks the oldest,
        so the two do not collide on one (contract (e), "Bug seen"). It goes out
        as soon as one is pooled, not on a 5 s tick: the far end serves no user
        before it has our verify."""
        name = None
        deadline = time.monotonic() + VERIFY_WAIT
        while name is None and time.monotonic() < deadline:
            name = self.peer.newest_idle()
            if name is None:
                gevent.sleep(0.05)
        if name is None:
            return self._lose("no idle pool connection to send our verify on")
        fingerprint = self.peer.fingerprint(name)
        sock = self.peer.take(name)
        self._own_verify[name] = fingerprint
        net.close_quietly(sock)
        self.send(signals.verify(name, fingerprint))

    def _check_verify(self, signal: signals.Signal) -> None:
        if signal.id in self._own_verify:  # both verified on one connection: fine here
            seen = self._own_verify[signal.id]
        else:
            sock = self.peer.take(signal.id)  # first: it may not have been read yet
            seen = self.peer.fingerprint(signal.id)
            if sock is None:
                return self._lose("verify names pool connection %s, which never came"
                                  % signal.id)
            net.close_quietly(sock)
        if signal.fp != seen:
            return self._lose("TLS certificate fingerprint mismatch on pool connection %s"
                              " (%s says %s, we expect %s)"
                              % (signal.id, self.other, signal.fp, seen))
        self.verified.set()
        self.log.info("%s: TLS certificate fingerprint verified", self.role)
