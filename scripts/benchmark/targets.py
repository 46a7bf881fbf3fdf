"""The services behind every route (an echo server, iperf3, nginx) and a route
to one of them: directly, through socat or through a nodepass pair.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

from .base import HOST
from .loadgen import run_iperf3
from .processes import (
    free_port,
    is_listening,
    proc_children,
    proc_cpu_split,
    proc_rss_kb,
    proc_tree_pss_kb,
    wait_until,
)


# --------------------------------------------------------------------------
# Targets: the services behind the routes.

ECHO_SERVER = r"""
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(4096)
listener.setblocking(False)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
udp.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, "accept")
sel.register(udp, selectors.EVENT_READ, "udp")
unsent = {}

def close(conn):
    sel.unregister(conn)
    unsent.pop(conn, None)
    conn.close()

def send(conn, data):
    try:
        sent = conn.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        close(conn)
        return
    if sent < len(data):  # wait until it drains before reading more
        unsent[conn] = data[sent:]
        sel.modify(conn, selectors.EVENT_WRITE, "conn")
    elif conn in unsent:
        del unsent[conn]
        sel.modify(conn, selectors.EVENT_READ, "conn")

while True:
    for key, mask in sel.select():
        sock = key.fileobj
        if key.data == "accept":
            for _ in range(64):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    break
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, "conn")
        elif key.data == "udp":
            for _ in range(64):
                try:
                    data, peer = sock.recvfrom(65535)
                    sock.sendto(data, peer)
                except OSError:
                    break
        elif mask & selectors.EVENT_WRITE:
            send(sock, unsent[sock])
        else:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                send(sock, data)
            else:
                close(sock)
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/html;
    # The request/response workload keeps its connections for the whole run.
    keepalive_requests 1000000000;
    keepalive_timeout 120s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        # For tunnels whose server writes a PROXY header first (proxy=1|2, issue 13).
        listen {host}:{proxy_port} proxy_protocol backlog=4096;
        root {prefix}/www;
        location = {rr_path} {{
            default_type text/plain;
            return 200 "{rr_body}";
        }}
    }}
}}
"""

STATIC_PAGE = b"<!doctype html><title>bench</title>" + b"<p>nodepass-gevent bench page</p>\n" * 16
# The request/response workload's tiny reply (nginx adds about 150 bytes of headers).
RR_PATH = "/rr"
RR_BODY = "ok"
# Sizes on the wire as ab 2.3 and nginx 1.22 send them (with a 5-digit port in Host:).
RR_REQUEST_BYTES = 109
RR_REPLY_BYTES = 149


class Target:
    """A service the routes lead to; probe() tells whether a route reaches it."""

    name = ""
    udp = False

    def __init__(self, bench: "Bench") -> None:
        self.bench = bench
        self.port = 0
        self.proxy_port = 0  # where it reads a PROXY protocol header first (0: nowhere)
        self.procs: List[subprocess.Popen] = []

    def probe(self, port: int) -> bool:
        raise NotImplementedError

    def probe_udp(self, port: int) -> bool:
        return True


class EchoTarget(Target):
    """A small Python echo server: TCP and UDP on the same port number."""

    name = "echo"
    udp = True

    def start(self) -> None:
        self.port = free_port(with_udp=True)
        proc = self.bench.procs.start(
            "echo", [sys.executable, "-c", ECHO_SERVER, HOST, str(self.port)]
        )
        self.procs.append(proc)
        wait_until(
            lambda: self.probe(self.port) and self.probe_udp(self.port), 10, "echo target", [proc]
        )

    def probe(self, port: int) -> bool:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"probe\n")
            return _recv_exactly(sock, 6) == b"probe\n"

    def probe_udp(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.connect((HOST, port))
            sock.send(b"probe")
            return sock.recv(64) == b"probe"


class IperfTarget(Target):
    name = "iperf3"

    def start(self) -> None:
        self.port = free_port()
        proc = self.bench.procs.start("iperf3", ["iperf3", "-s", "-B", HOST, "-p", str(self.port)])
        self.procs.append(proc)
        wait_until(lambda: is_listening(self.port), 10, "iperf3 target", [proc])

    def probe(self, port: int) -> bool:
        run_iperf3(port, 1, False, ("-n", "64K"), 10)
        return True


class NginxTarget(Target):
    name = "nginx"

    def start(self) -> None:
        # nginx started by root runs its workers as an unprivileged user: they
        # must be able to pass through the bench's directory and read the page.
        os.chmod(self.bench.workdir, 0o711)
        prefix = tempfile.mkdtemp(prefix="nginx-", dir=self.bench.workdir)
        os.chmod(prefix, 0o755)
        os.mkdir(os.path.join(prefix, "www"))
        os.chmod(os.path.join(prefix, "www"), 0o755)
        with open(os.path.join(prefix, "www", "index.html"), "wb") as page:
            page.write(STATIC_PAGE)
        self.port = free_port()
        self.proxy_port = free_port()
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as out:
            out.write(
                NGINX_CONF.format(
                    prefix=prefix,
                    host=HOST,
                    port=self.port,
                    proxy_port=self.proxy_port,
                    rr_path=RR_PATH,
                    rr_body=RR_BODY,
                )
            )
        proc = self.bench.procs.start(
            "nginx", ["nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")]
        )
        self.procs.append(proc)
        wait_until(lambda: self.probe(self.port), 10, "nginx target", [proc])

    def probe(self, port: int) -> bool:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"GET /index.html HTTP/1.0\r\nHost: bench\r\n\r\n")
            reply = _recv_all(sock)
        return reply.startswith(b"HTTP/1.1 200") and reply.endswith(STATIC_PAGE)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# --------------------------------------------------------------------------
# Routes: direct, socat, or a nodepass pair in front of a target.


class Route:
    """One way from the bench to a target; roles name the processes that relay."""

    def __init__(
        self,
        mode: str,
        port: int,
        roles: Sequence[Tuple[str, subprocess.Popen]] = (),
        metrics_urls: Sequence[str] = (),
    ) -> None:
        self.mode = mode
        self.port = port
        self.roles = list(roles)
        self.metrics_urls = list(metrics_urls)  # scraped while a workload measures the route

    @property
    def pids(self) -> List[int]:
        return [proc.pid for _, proc in self.roles]

    def cpu_split(self) -> Optional[Tuple[float, float]]:
        """(user, system) CPU seconds of the relay processes so far; None for direct."""
        if not self.roles:
            return None
        splits = [proc_cpu_split(pid) for pid in self.pids]
        return sum(user for user, _ in splits), sum(system for _, system in splits)

    def memory_kb(self) -> Optional[float]:
        """VmRSS of the nodepass processes; for socat the PSS of all its forks."""
        if self.mode == "direct":
            return None
        if self.mode == "socat":
            return float(sum(proc_tree_pss_kb(pid) for pid in self.pids))
        return float(sum(proc_rss_kb(pid) for pid in self.pids))

    def settle(self, timeout: float = 3.0) -> None:
        """Let socat's per-connection children finish, so their CPU time is counted."""
        if self.mode != "socat":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(proc_children(pid) for pid in self.pids):
            time.sleep(0.05)
