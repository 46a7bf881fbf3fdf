"""A NodePass v1.14 peer written from the wire-v114 contract, with raw sockets and threads.

``ReferenceServer`` plays a v1.14 server for our client, ``ReferenceClient`` a
v1.14 client for our server; each speaks the TCP transport (type=0) at tls 0 or
1, in reverse (flow "-") or forward (flow "+") mode, and carries TCP users and UDP sessions. The
bytes come from nodepass_gevent.wire.v114, whose encoders the captures pin down
(tests/test_wire_v114.py), so this peer writes what Go v1.14 writes. Like v1.14
it takes one pool connection per user, pings every ``ping_interval`` from both
ends, and at tls 1 sends its own verify and serves users only after the peer's.
Unlike v1.14 it picks the *newest* idle connection for its verify and accepts a
peer's verify that names a connection it already took for its own (the
contract's "verify race"). It records what it saw for tests to check: the
handshake statuses, every signal, refusals of bad lines.

Not here yet: flush on errors, the adaptive pool (the client
keeps ``min`` idle connections), tls=2, modes 0 and client mode 1.
"""

import collections
import socket
import ssl
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

from reference_peer import HOST, IGNORE_UNEXPECTED_EOF, _listener, _relay, _thread
from nodepass_gevent.wire.v114 import handshake, ids, keys, signals

POOL_GET_TIMEOUT = 5.0   # seconds to wait for an idle or a named connection [pool:*Get]
HANDSHAKE_TIMEOUT = 5.0
LIVENESS = 15.0          # 3 x the report interval without a line ends the session
UDP_READ_SIZE = 16384    # one read of a pool connection is one datagram (no framing)
UDP_IDLE = 30.0          # the first side idle this long ends a UDP session


class _Pool:
    """Idle pool connections by id, oldest first."""

    def __init__(self) -> None:
        self.idle = collections.OrderedDict()  # type: Dict[str, socket.socket]
        self.changed = threading.Condition()

    def put(self, name: str, conn: socket.socket) -> None:
        with self.changed:
            self.idle[name] = conn
            self.changed.notify_all()

    def __len__(self) -> int:
        return len(self.idle)

    def _wait_for(self, pick, timeout: float):
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                name = pick()
                if name is not None:
                    return name, self.idle.pop(name)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, None
                self.changed.wait(left)

    def oldest(self, timeout: float = POOL_GET_TIMEOUT):
        return self._wait_for(lambda: next(iter(self.idle), None), timeout)

    def newest(self, timeout: float = POOL_GET_TIMEOUT):
        return self._wait_for(lambda: next(reversed(self.idle), None) if self.idle else None,
                              timeout)

    def named(self, name: str, timeout: float = POOL_GET_TIMEOUT) -> Optional[socket.socket]:
        return self._wait_for(lambda: name if name in self.idle else None, timeout)[1]

    def close(self) -> None:
        with self.changed:
            for conn in self.idle.values():
                conn.close()
            self.idle.clear()


class _Peer:
    """What both ends share once the control channel is up (contract (e), (f))."""

    def __init__(self, key: bytes, tls: str, ping_interval: float) -> None:
        self.key = key
        self.tls = tls
        self.ping_interval = ping_interval
        self.pool = _Pool()
        self.control = None  # type: Optional[socket.socket]
        self.write_lock = threading.Lock()
        self.verified = threading.Event()  # the peer's verify matched (tls 1)
        self.own_verify_ids = set()
        self.received = []  # type: List[signals.Signal]
        self.refused_lines = []  # type: List[str]
        self.failures = []  # type: List[str]
        self.closed = False
        self.listener = None  # type: Optional[socket.socket]  (the user side's)
        self.target = None  # type: Optional[Tuple[str, int]]  (the dialing side's)
        self.udp = None  # type: Optional[socket.socket]  (the user side's, on its port)
        self.udp_sessions = {}  # type: Dict[Tuple[str, int], socket.socket]
        self.udp_idle = UDP_IDLE

    # -- control -------------------------------------------------------------

    def _start_control(self, conn: socket.socket) -> None:
        self.control = conn
        conn.settimeout(LIVENESS)
        _thread(self._read_control)
        _thread(self._ping)
        if self.tls != "0":
            _thread(self._send_verify)
        else:
            self.verified.set()

    def send(self, signal: signals.Signal) -> None:
        with self.write_lock:
            self.control.sendall(signals.encode_signal(signal, self.key))

    def _ping(self) -> None:
        while not self.closed:
            self.send(signals.ping())
            time.sleep(self.ping_interval)

    def _read_control(self) -> None:
        rest = b""
        while not self.closed:
            data = self.control.recv(4096)  # socket.timeout (OSError) after LIVENESS
            if not data:
                self.failures.append("control closed")
                return self.close()
            lines, rest = signals.split_lines(rest + data)
            for line in lines:
                try:
                    signal = signals.decode_signal(line, self.key)
                except signals.SignalError as error:
                    self.refused_lines.append(str(error))
                    continue
                self.received.append(signal)
                self._on_signal(signal)

    def _on_signal(self, signal: signals.Signal) -> None:
        if signal.action == signals.PING:
            self.send(signals.pong())
        elif signal.action == signals.TCP:
            _thread(self._dial_for, signal)
        elif signal.action == signals.UDP:
            _thread(self._relay_udp_for, signal)
        elif signal.action == signals.VERIFY:
            _thread(self._check_verify, signal)
        elif signal.action == signals.FLUSH:
            self.pool.close()

    # -- verify (tls 1) ------------------------------------------------------

    def _send_verify(self) -> None:
        time.sleep(self.ping_interval)
        name, conn = self.pool.newest()
        if conn is None:
            return self.failures.append("no idle connection to verify")
        self.own_verify_ids.add(name)
        self.send(signals.verify(name, self._fingerprint_on(name, conn)))
        conn.close()

    def _check_verify(self, signal: signals.Signal) -> None:
        # Our own verify may have taken this connection already: no wait for it.
        conn = None if signal.id in self.own_verify_ids else self.pool.named(signal.id)
        if conn is None and signal.id not in self.own_verify_ids:
            self.failures.append("verify names unknown connection " + signal.id)
            return self.close()
        if signal.fp != self._expected_fingerprint(signal.id, conn):
            self.failures.append("verify fingerprint mismatch on " + signal.id)
            return self.close()
        if conn is not None:
            conn.close()
        self.verified.set()

    def _fingerprint_on(self, name: str, conn) -> str:
        raise NotImplementedError

    def _expected_fingerprint(self, name: str, conn) -> str:
        raise NotImplementedError

    # -- users ---------------------------------------------------------------

    def _open_user_side(self) -> None:
        """Users arrive on one port, over TCP and UDP (contract (g))."""
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((HOST, self.listener.getsockname()[1]))
        _thread(self._accept_users)
        _thread(self._receive_datagrams)

    def _receive_datagrams(self) -> None:
        while not self.closed:
            datagram, address = self.udp.recvfrom(65535)
            conn = self.udp_sessions.get(address)
            if conn is None:
                _thread(self._open_udp_session, address, datagram)
            else:
                conn.sendall(datagram)  # raw, as v1.14: no length, no framing

    def _open_udp_session(self, address, datagram: bytes) -> None:
        if not self.verified.wait(POOL_GET_TIMEOUT * 3):
            return
        name, conn = self.pool.oldest()
        if conn is None:
            return
        self.udp_sessions[address] = conn
        self.send(signals.udp("{}:{}".format(*address[:2]), name))
        conn.sendall(datagram)
        conn.settimeout(self.udp_idle)
        try:
            while True:
                reply = conn.recv(UDP_READ_SIZE)
                if not reply:
                    break
                self.udp.sendto(reply, address)
        except OSError:
            pass  # idle for udp_idle, or closed: the session ends
        finally:
            self.udp_sessions.pop(address, None)
            conn.close()

    def _relay_udp_for(self, signal: signals.Signal) -> None:
        conn = self.pool.named(signal.id)
        if conn is None:
            return self.failures.append("udp names unknown connection " + signal.id)
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target.connect(self.target)
        for sock in (conn, target):
            sock.settimeout(self.udp_idle)

        def pump(read, write) -> None:
            try:
                while True:
                    data = read(UDP_READ_SIZE)
                    if not data:
                        break
                    write(data)
            except OSError:
                pass
            finally:  # the first pump to end ends the session
                conn.close()
                target.close()
        _thread(pump, target.recv, conn.sendall)
        pump(conn.recv, target.send)

    def _accept_users(self) -> None:
        while not self.closed:
            user, address = self.listener.accept()
            _thread(self._launch, user, "{}:{}".format(*address[:2]))

    def _launch(self, user: socket.socket, remote: str) -> None:
        if not self.verified.wait(POOL_GET_TIMEOUT * 3):
            return user.close()
        name, conn = self.pool.oldest()
        if conn is None:
            return user.close()  # v1.14 drops the user when no connection comes
        self.send(signals.tcp(remote, name))
        _relay(user, conn)

    def _dial_for(self, signal: signals.Signal) -> None:
        conn = self.pool.named(signal.id)
        if conn is None:
            return self.failures.append("tcp names unknown connection " + signal.id)
        try:
            target = socket.create_connection(self.target, timeout=5)
        except OSError:
            return conn.close()  # v1.14 says nothing back: the user sees a close
        target.settimeout(None)
        _relay(conn, target)

    def close(self) -> None:
        self.closed = True
        for sock in (self.control, self.listener, self.udp):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self.pool.close()


class ReferenceServer(_Peer):
    """A v1.14 server on a port of its own; users (flow "-") or a target (flow "+")."""

    def __init__(self, flow: str = "-", tls: str = "0", key: Optional[bytes] = None,
                 max_pool: int = 1024, target: Optional[Tuple[str, int]] = None,
                 ping_interval: float = 5.0) -> None:
        self.tunnel = _listener()
        port = str(self.tunnel.getsockname()[1])
        super().__init__(key or keys.derive_key(None, port), tls, ping_interval)
        self.flow, self.max_pool = flow, max_pool
        self.statuses = []  # type: List[int]
        self.context = None
        if tls != "0":
            from support import make_test_ca
            cert = make_test_ca(tempfile.mkdtemp(prefix="np-v114-"))
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert["crt"], cert["key"])
            self.context.options |= IGNORE_UNEXPECTED_EOF
            with open(cert["crt"]) as pem:
                self.fingerprint = keys.certificate_fingerprint(
                    ssl.PEM_cert_to_DER_cert(pem.read()))
        if flow == handshake.FLOW_REVERSE:
            self.listener = _listener()
        else:
            self.target = target
        _thread(self._serve)

    @property
    def tunnel_port(self) -> int:
        return self.tunnel.getsockname()[1]

    @property
    def user_port(self) -> int:
        return self.listener.getsockname()[1]

    def _serve(self) -> None:
        while not self._handshake_once(*self.tunnel.accept()):
            pass
        first = True
        while not self.closed:
            conn, _ = self.tunnel.accept()
            if self.context is not None:
                conn.settimeout(HANDSHAKE_TIMEOUT)
                conn = self.context.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            raw = ids.CONTROL_ID if first else ids.new_id()
            if first:
                conn.sendall(raw)
                self._start_control(conn)
                if self.listener is not None:
                    self._open_user_side()
            else:
                self.pool.put(ids.id_name(raw), conn)  # pooled before the client knows it
                conn.sendall(raw)
            first = False

    def _handshake_once(self, conn: socket.socket, address) -> bool:
        """Answer one request; True once one passed (contract (c))."""
        conn.settimeout(HANDSHAKE_TIMEOUT)
        buffer, reply, passed = b"", b"", False
        try:
            while handshake.head_end(buffer) is None:
                data = conn.recv(4096)
                if not data:
                    return False
                buffer += data
            request = handshake.parse_request(buffer[:handshake.head_end(buffer)])
            status = handshake.judge_request(request, self.key)
            if status == handshake.OK:
                reply = handshake.encode_reply(handshake.TunnelConfig(
                    self.flow, self.max_pool, self.tls, handshake.POOL_TYPE_TCP))
                passed = True
            else:
                reply = handshake.encode_refusal(status)
            self.statuses.append(status)
        except handshake.BadRequest as error:
            self.statuses.append(error.status)
            reply = handshake.encode_bad_request(error)
        except OSError:
            return False
        finally:
            try:
                conn.sendall(reply)
            except OSError:
                pass
            conn.close()
        return passed

    def _fingerprint_on(self, name, conn) -> str:
        return self.fingerprint

    def _expected_fingerprint(self, name, conn) -> str:
        return self.fingerprint


class ReferenceClient(_Peer):
    """A v1.14 client of a server's tunnel port, keeping ``min_pool`` idle connections.

    Flow "-": it dials ``target`` for each tcp signal. Flow "+": it listens for
    users on a port of its own (``user_port``) and signals the server.
    """

    def __init__(self, server_port: int, target: Optional[Tuple[str, int]] = None,
                 key: Optional[bytes] = None, min_pool: int = 4, host: str = HOST,
                 ping_interval: float = 5.0, retry_after: float = 0.5) -> None:
        super().__init__(key or keys.derive_key(None, str(server_port)), "0", ping_interval)
        self.server = (host, server_port)
        self.target, self.min_pool, self.retry_after = target, min_pool, retry_after
        self.statuses = []  # type: List[int]
        self.config = None  # type: Optional[handshake.TunnelConfig]
        self.peer_fingerprints = {}  # type: Dict[str, str]
        self.ready = threading.Event()
        _thread(self._run)

    @property
    def user_port(self) -> int:
        return self.listener.getsockname()[1]

    def _run(self) -> None:
        while not self.closed and self.config is None:
            self.config = self._handshake()
            if self.config is None:
                time.sleep(self.retry_after)  # v1.14 waits 3 s and tries again, forever
        if self.config is None:
            return  # closed before a handshake passed
        self.tls = self.config.tls
        if self.config.flow == handshake.FLOW_FORWARD:
            self.listener = _listener()
        while not self.closed:
            if self.control is None or len(self.pool) < self.min_pool:
                self._dial_one()
            else:
                time.sleep(0.05)

    def _handshake(self) -> Optional[handshake.TunnelConfig]:
        try:
            conn = socket.create_connection(self.server, timeout=HANDSHAKE_TIMEOUT)
        except OSError:
            return None
        try:
            conn.sendall(handshake.encode_request(self.key, handshake.server_name(self.server[0])))
            buffer, reply = b"", None
            while reply is None:
                data = conn.recv(4096)
                buffer += data
                reply = handshake.parse_reply(buffer, eof=not data)
        except (OSError, handshake.HandshakeError) as error:
            self.failures.append("handshake: {}".format(error))
            return None
        finally:
            conn.close()
        self.statuses.append(reply.status)
        return handshake.parse_config(reply.body) if reply.status == handshake.OK else None

    def _dial_one(self) -> None:
        conn = socket.create_connection(self.server, timeout=60)
        peer_fp = ""
        if self.tls != "0":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.options |= IGNORE_UNEXPECTED_EOF
            conn = context.wrap_socket(conn)  # tls=1: no SNI check, no verification
            peer_fp = keys.certificate_fingerprint(conn.getpeercert(binary_form=True))
        raw = b""
        while len(raw) < ids.ID_BYTES:
            data = conn.recv(ids.ID_BYTES - len(raw))
            if not data:
                return conn.close()
            raw += data
        conn.settimeout(None)
        name = ids.id_name(raw)
        if name == ids.CONTROL_NAME:
            self._start_control(conn)
            if self.listener is not None:
                self._open_user_side()
            self.ready.set()
            return
        self.peer_fingerprints[name] = peer_fp
        self.pool.put(name, conn)

    def _fingerprint_on(self, name, conn) -> str:
        return self.peer_fingerprints[name]

    def _expected_fingerprint(self, name, conn) -> str:
        return self.peer_fingerprints.get(name, "")
