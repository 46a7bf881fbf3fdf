"""A NodePass v1.0 peer written from docs/protocol.md alone, with raw sockets and threads.

``ReferenceServer`` plays a v1.0 server for our client; ``ReferenceClient`` a
v1.0 client for our server. They do what v1.0 does and no more (single reads
for UDP, no extensions), and they record the bytes they saw so tests can
check them against the contract.
"""

import os
import queue
import re
import socket
import ssl
import threading
import time
from typing import Dict, List, Optional
from urllib.parse import urlsplit

HOST = "127.0.0.1"
TUNNEL_SIGNAL = re.compile(rb"^//(\d+)#([012])\n$")
LAUNCH_SIGNAL = re.compile(rb"^//([0-9a-f]{8})#([12])\n$")
# Go's TLS keeps writing after reading a bare TCP FIN; OpenSSL 3 does so only
# with SSL_OP_IGNORE_UNEXPECTED_EOF. Without it OpenSSL 3 answers the FIN with
# a fatal decode_error alert, which ends the other direction too. Pythons
# before 3.10 lack the constant although they may link OpenSSL 3.
IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF",
                                0x80 if ssl.OPENSSL_VERSION_INFO >= (3,) else 0)


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways, passing EOF on as a half-close; close both at the end."""
    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR) if not isinstance(dst, ssl.SSLSocket) else \
                socket.socket.shutdown(dst, socket.SHUT_WR)
        except OSError:
            pass
    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join(30)
    a.close()
    b.close()


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(128)
    return sock


def _thread(target, *args) -> None:
    def run() -> None:
        try:
            target(*args)
        except (OSError, ValueError, queue.Empty):
            pass  # the peer was closed under it: the end of the test
    threading.Thread(target=run, daemon=True).start()


class ReferenceServer:
    """v1.0 server: one client, pooled data connections, launch signals."""

    def __init__(self, tls_mode: int = 0, cert: Optional[Dict[str, str]] = None,
                 launch_before_id: bool = False) -> None:
        self.tls_mode = tls_mode
        self.context = None
        if tls_mode:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert["crt"], cert["key"])
            self.context.options |= IGNORE_UNEXPECTED_EOF
        # Signal a launch as soon as the id is written, before the client has
        # surely read it (docs/protocol.md, "Signal before id").
        self.launch_before_id = launch_before_id
        self.tunnel = _listener()
        self.data = _listener()
        self.target = _listener()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((HOST, self.target.getsockname()[1]))
        self.pool = queue.Queue()
        self.control = None  # type: Optional[socket.socket]
        self.control_received = b""
        self.lock = threading.Lock()
        self.closed = False
        _thread(self._accept_control)
        _thread(self._accept_data)
        _thread(self._accept_users)
        _thread(self._serve_udp)

    @property
    def tunnel_port(self) -> int:
        return self.tunnel.getsockname()[1]

    @property
    def port(self) -> int:
        return self.target.getsockname()[1]

    def _accept_control(self) -> None:
        self.control, _ = self.tunnel.accept()
        self._signal(b"//%d#%d\n" % (self.data.getsockname()[1], self.tls_mode))
        _thread(self._heartbeat)
        while True:  # a v1.0 client never writes here; record anything it does
            data = self.control.recv(4096)
            if not data:
                return
            self.control_received += data

    def _signal(self, line: bytes) -> None:
        with self.lock:
            self.control.sendall(line)

    def _heartbeat(self) -> None:
        while not self.closed:
            time.sleep(1)
            try:
                self._signal(b"\n")
            except OSError:
                return

    def _accept_data(self) -> None:
        while True:
            conn, _ = self.data.accept()
            _thread(self._file_data, conn)

    def _file_data(self, conn: socket.socket) -> None:
        if self.context:
            conn = self.context.wrap_socket(conn, server_side=True)
        connection_id = os.urandom(4).hex()
        id_written = threading.Event()
        if self.launch_before_id:
            # Pool it first, write its id a little later: a launch for it may
            # reach the client before the id does.
            self.pool.put((connection_id, conn, id_written))
            time.sleep(0.05)
        conn.sendall(connection_id.encode())
        id_written.set()
        if not self.launch_before_id:
            self.pool.put((connection_id, conn, id_written))

    def _take(self, kind: bytes):
        connection_id, conn, id_written = self.pool.get(timeout=10)
        self._signal(b"//%s#%s\n" % (connection_id.encode(), kind))
        id_written.wait(5)  # user bytes may only follow the id on the wire
        return conn

    def _accept_users(self) -> None:
        while True:
            user, _ = self.target.accept()
            _thread(lambda u=user: _relay(u, self._take(b"1")))

    def _serve_udp(self) -> None:
        while True:
            datagram, peer = self.udp.recvfrom(65535)
            _thread(self._udp_exchange, datagram, peer)

    def _udp_exchange(self, datagram: bytes, peer) -> None:
        conn = self._take(b"2")
        conn.sendall(datagram)
        conn.settimeout(5)
        reply = conn.recv(8192)  # v1.0: one read
        self.udp.sendto(reply, peer)
        conn.close()

    def close(self) -> None:
        self.closed = True
        for sock in (self.tunnel, self.data, self.target, self.udp, self.control):
            if sock is not None:
                sock.close()


class ReferenceClient:
    """v1.0 client: reads signals, keeps a pool, serves launches. ``udp_buffer``:
    its UDP_DATA_BUF_SIZE, the one read a datagram and its reply get each."""

    def __init__(self, tunnel_port: int, target_port: int, pool_size: int = 8,
                 udp_buffer: int = 8192) -> None:
        self.target_port, self.udp_buffer = target_port, udp_buffer
        self.pool_size = pool_size
        self.control = socket.create_connection((HOST, tunnel_port), timeout=10)
        self.reader = self.control.makefile("rb")
        self.first_line = self.reader.readline()
        # As v1.0 does: parse it as a URL and read host and fragment only.
        signal = urlsplit(self.first_line.decode().strip())
        self.data_port, self.tls_mode = int(signal.hostname), int(signal.fragment)
        self.context = None
        if self.tls_mode:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
            self.context.options |= IGNORE_UNEXPECTED_EOF
        self.lines = []  # type: List[bytes]
        self.ids_seen = []  # type: List[bytes]
        self.pool = {}  # type: Dict[str, socket.socket]
        self.pool_lock = threading.Lock()
        self.closed = False
        _thread(self._fill_pool)
        _thread(self._read_signals)

    def _dial(self) -> None:
        conn = socket.create_connection((HOST, self.data_port), timeout=10)
        if self.context:
            conn = self.context.wrap_socket(conn)
        raw = b""
        while len(raw) < 8:
            chunk = conn.recv(8 - len(raw))
            if not chunk:
                conn.close()
                return
            raw += chunk
        self.ids_seen.append(raw)
        conn.settimeout(None)
        with self.pool_lock:
            self.pool[raw.decode()] = conn

    def _fill_pool(self) -> None:
        while not self.closed:
            with self.pool_lock:
                missing = self.pool_size - len(self.pool)
            for _ in range(missing):
                try:
                    self._dial()
                except OSError:
                    break
            time.sleep(0.05)

    def _take(self, connection_id: str) -> Optional[socket.socket]:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with self.pool_lock:
                conn = self.pool.pop(connection_id, None)
            if conn is not None:
                return conn
            time.sleep(0.01)
        return None

    def _read_signals(self) -> None:
        self.control.settimeout(None)
        while not self.closed:
            try:
                line = self.reader.readline()
            except (OSError, ValueError):
                return
            if not line:
                return
            self.lines.append(line)
            match = LAUNCH_SIGNAL.match(line)
            if match:
                conn = self._take(match.group(1).decode())
                if conn is not None:
                    handler = self._tcp if match.group(2) == b"1" else self._udp
                    _thread(handler, conn)

    def _tcp(self, conn: socket.socket) -> None:
        target = socket.create_connection((HOST, self.target_port), timeout=10)
        target.settimeout(None)
        _relay(conn, target)

    def _udp(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        datagram = conn.recv(self.udp_buffer)  # v1.0: one read, cut to the buffer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
            target.settimeout(5)
            target.sendto(datagram, (HOST, self.target_port))
            reply = target.recv(self.udp_buffer)
        conn.sendall(reply)
        conn.close()

    def close(self) -> None:
        self.closed = True
        self.control.close()
        with self.pool_lock:
            for conn in self.pool.values():
                conn.close()
