"""Test helpers: free ports, nodepass processes, echo targets, a test CA.

Everything here is real: sockets on 127.0.0.1 and real child processes. Every
wait has a deadline. Fixtures in conftest.py make sure what starts is stopped.
"""

import datetime
import glob
import hashlib
import json
import ipaddress
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from legacy_python import Interpreter, own_interpreter

HOST = "127.0.0.1"
METRICS_LINE = re.compile(r"Metrics: http://127\.0\.0\.1:(\d+)/metrics")
FAST_ENV = {  # short intervals so recovery tests take seconds
    "REPORT_INTERVAL": "1s",
    "SERVICE_COOLDOWN": "500ms",
    "SHUTDOWN_TIMEOUT": "3s",
    "UDP_READ_TIMEOUT": "2s",
}


def _reserved_tcp_port(family, host: str) -> int:
    """A port the OS picks (bind to 0), left in TIME_WAIT: for 60 s the kernel
    gives it to no outgoing connection as its ephemeral port, while a listener
    that sets SO_REUSEADDR (ours, nginx, HAProxy) still binds it. Without this,
    another process's connect() could take the port between this function and
    the nodepass child's listen ("Address already in use")."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        with socket.socket(family, socket.SOCK_STREAM) as dialer:
            dialer.connect(listener.getsockname()[:2])
            accepted = listener.accept()[0]
            accepted.close()  # this end closes first, so it is the one in TIME_WAIT
        return listener.getsockname()[1]


def free_port(host: str = HOST) -> int:
    """A port free for both TCP and UDP right now (the OS picks it), on an
    IPv4 or an IPv6 host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        port = _reserved_tcp_port(family, host)
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))


def netns_exec(namespace: str) -> List[str]:
    """The prefix that runs a command in a network namespace (ip execs it)."""
    return ["ip", "netns", "exec", namespace]


class ChildProcess:
    """One child process, its output (stdout and stderr) in a log file.

    ``namespace``: run in that network namespace; ``prefix``: through a command
    that runs the rest (``prlimit --nofile=N --``). Both exec, so the pid is
    the child's own. ``env`` is its whole environment (default: this one's).
    The log is ``log_path``, kept, or a temporary file that cleanup() removes.
    """

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                 namespace: Optional[str] = None, prefix: Sequence[str] = (),
                 cwd: Optional[str] = None, log_path: Optional[Path] = None,
                 name: Optional[str] = None) -> None:
        self.name = name or " ".join(argv)
        self.namespace = namespace
        self._temporary_log = log_path is None
        if log_path is None:
            log = tempfile.NamedTemporaryFile(prefix="nodepass-", suffix=".log", delete=False)
        else:
            log = open(str(log_path), "ab")
        self.log_path = Path(log.name)
        command = (netns_exec(namespace) if namespace else []) + list(prefix) + list(argv)
        with log:  # the child has its own copy
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def executable(self) -> str:
        """The binary the process runs (a prefix execs it: the pid is its own)."""
        return os.path.realpath("/proc/%d/exe" % self.pid)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        where = "pid %d, %s" % (self.pid, self.namespace) if self.namespace else \
            "pid %d" % self.pid
        return "--- %s (%s) ---\n%s" % (self.name, where,
                                        "\n".join(self.output().splitlines()[-lines:]))

    def wait_for_output(self, text: str, timeout: float = 10) -> None:
        wait_until(lambda: text in self.output(), timeout, what="%r in the log" % text)

    def send_signal(self, number: int) -> None:
        if self.alive():
            self.proc.send_signal(number)

    def wait(self, timeout: float) -> Optional[int]:
        """The exit status, or None if the process still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, number: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the process and wait for it; kill it if it will not go, and fail."""
        status = self.stop_quietly(number, timeout)
        if status is None:
            raise AssertionError("%s did not stop within %ss:\n%s"
                                 % (self.name, timeout, self.output()[-3000:]))
        return status

    def stop_quietly(self, number: int = signal.SIGTERM, timeout: float = 10) -> Optional[int]:
        """stop() for a teardown: the exit status, None if the process had to be
        killed. Never raises."""
        self.send_signal(number)
        status = self.wait(timeout)
        if status is None:
            self.kill()
        return status

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.wait(5)

    def cleanup(self) -> None:
        self.kill()
        if self._temporary_log:
            try:
                os.unlink(str(self.log_path))
            except OSError:
                pass


class NodepassProcess(ChildProcess):
    """One `python -m nodepass_gevent URL` child, its output in a file.

    ``url`` may also be the whole argument list (several URLs, --config FILE...).
    """

    def __init__(self, url, env: Optional[Dict[str, str]] = None,
                 prefix: Sequence[str] = (), status: bool = False,
                 python: Optional[Interpreter] = None, namespace: Optional[str] = None,
                 log_path: Optional[Path] = None, name: Optional[str] = None) -> None:
        """``env``: variables on top of this process's environment; ``python``: the
        interpreter, whose rules for the environment and working directory apply
        (legacy_python.py; default: this one, as it is); ``status``: serve
        --metrics on a loopback port of its own, so that ``status()`` reads the
        role's figures instead of its log. The rest as ChildProcess's (the name
        defaults to the URL)."""
        self.url = url
        arguments = [url] if isinstance(url, str) else list(url)
        self._status, self._status_port = status, None
        if status:
            # Port 0: the process binds a port the OS picks and logs it. A port
            # picked here and bound later by the child could be taken in between
            # by another of the suites running at once.
            arguments = ["--metrics=%s:0" % HOST] + arguments
        python = python or own_interpreter()
        full_env = dict(os.environ)
        full_env.update(env or {})
        super().__init__(python.argv("-m", "nodepass_gevent", *arguments),
                         python.environ(full_env), namespace, prefix, python.home, log_path,
                         name or (url if isinstance(url, str) else " ".join(url)))

    @property
    def status_port(self) -> Optional[int]:
        """The --metrics port the process logged (None if started without status=True)."""
        if self._status and self._status_port is None:
            found = []
            wait_until(lambda: self._logged_metrics_port(found) or not self.alive(), 20,
                       what="the metrics address in the log")
            if not found:
                raise AssertionError("%s exited before serving metrics:\n%s"
                                     % (self.url, self.output()[-3000:]))
            self._status_port = found[0]
        return self._status_port

    def _logged_metrics_port(self, found: List[int]) -> bool:
        match = METRICS_LINE.search(self.output())
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    def status(self, timeout: float = 10) -> dict:
        """The lone tunnel's status() (the /status endpoint), once it answers."""
        assert self.status_port is not None, "started without status=True"
        url = "http://%s:%d/status" % (HOST, self.status_port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    return json.loads(reply.read().decode("utf-8"))["tunnels"][0]
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline or not self.alive():
                    raise AssertionError("no /status from %s:\n%s"
                                         % (self.url, self.output()[-3000:])) from None
                time.sleep(0.05)

    def wait_for_status(self, predicate: Callable[[dict], bool], timeout: float = 10,
                        what: str = "status") -> dict:
        """The status once ``predicate`` holds for it."""
        found = []
        wait_until(lambda: predicate(self.status()) and not found.append(self.status()),
                   timeout, interval=0.05, what=what)
        return found[-1]


def run_nodepass(args: List[str], timeout: float = 30,
                 env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run nodepass to completion (for --check, --help, bad input)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "nodepass_gevent"] + args, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          universal_newlines=True, stdin=subprocess.DEVNULL)


# -- targets -------------------------------------------------------------------

class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # Echo until the peer half-closes, then half-close back: this is what
        # proves a half-close crossed the tunnel in both directions.
        try:
            while True:
                chunk = self.request.recv(65536)
                if not chunk:
                    break
                self.request.sendall(chunk)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the user went away (some tests cut connections on purpose)


class _UdpEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class _ThreadingUDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    max_packet_size = 65535


ECHO_POLL_INTERVAL = 0.05  # seconds; see EchoServer


class EchoServer:
    """TCP and UDP echo on one port, in threads of the test process."""

    def __init__(self, host: str = HOST, port: int = 0) -> None:
        port = port or free_port(host)
        self.tcp = _ThreadingTCPServer((host, port), _EchoHandler)
        self.udp = _ThreadingUDPServer((host, port), _UdpEchoHandler)
        self.port = port
        # shutdown() waits for serve_forever to look at its flag, which it does
        # once a poll interval (0.5 s by default): 1 s of every test's teardown.
        self._threads = [threading.Thread(target=server.serve_forever,
                                          kwargs={"poll_interval": ECHO_POLL_INTERVAL},
                                          daemon=True)
                         for server in (self.tcp, self.udp)]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        for server in (self.tcp, self.udp):
            server.shutdown()
            server.server_close()


def tcp_exchange(port: int, payload: bytes, host: str = HOST, timeout: float = 10) -> bytes:
    """Send ``payload``, half-close, and read everything that comes back.

    A thread sends while this one reads, so neither side's buffers fill up.
    """
    def send_then_half_close() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reading side sees the failure too

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sender = threading.Thread(target=send_then_half_close, daemon=True)
        sender.start()
        received = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received.append(chunk)
        sender.join(timeout)
        return b"".join(received)


def udp_exchange(port: int, payload: bytes, host: str = HOST, timeout: float = 5) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        return sock.recvfrom(65535)[0]


def echo_works(port: int, host: str = HOST) -> bool:
    """One short round trip through the tunnel; False instead of an exception."""
    try:
        return tcp_exchange(port, b"ping", host, timeout=3) == b"ping"
    except OSError:
        return False


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- certificates ----------------------------------------------------------------

def make_test_ca(folder: str, names: Sequence[str] = ("localhost",),
                 ips: Sequence[str] = (HOST,)) -> Dict[str, str]:
    """A CA and a server certificate it signed, as PEM files in ``folder``.

    Returns the paths: ``ca`` (trust this), ``crt`` and ``key`` (the server's).
    """
    from nodepass_gevent.copy import tls  # noqa: F401 (filters cryptography's old-Python warning)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodepass test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": os.path.join(folder, "ca.pem"), "crt": os.path.join(folder, "server.crt"),
             "key": os.path.join(folder, "server.key")}
    pem = serialization.Encoding.PEM
    with open(paths["ca"], "wb") as out:
        out.write(ca_cert.public_bytes(pem))
    with open(paths["crt"], "wb") as out:
        out.write(cert.public_bytes(pem))
    with open(paths["key"], "wb") as out:
        out.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return paths


def find_python(minor: int) -> Optional[str]:
    """An interpreter python3.MINOR that really runs, or None."""
    candidates = [shutil.which("python3.%d" % minor)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.%d.*/bin/python3"
                                                      % minor)))
    for candidate in filter(None, candidates):
        try:
            result = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[1])"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    universal_newlines=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.stdout.strip() == str(minor):
            return candidate
    return None


def stop_all(processes: List[ChildProcess]) -> None:
    for process in processes:
        process.cleanup()
