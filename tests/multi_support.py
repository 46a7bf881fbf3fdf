"""Helpers for the many-tunnels tests: tunnels files, the --metrics endpoint,
a paced long transfer, a TLS look at a data port, a NOTIFY_SOCKET.

All real: HTTP to the process's own endpoint, sockets on 127.0.0.1.
"""

import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

from support import HOST, free_port, wait_until


def tunnel_ports(count: int) -> List[Dict[str, int]]:
    """``count`` pairs of free ports: {"tunnel": ..., "target": ...}."""
    return [{"tunnel": free_port(), "target": free_port()} for _ in range(count)]


def http_get(port: int, path: str, timeout: float = 5):
    """(status code, body text) of GET http://127.0.0.1:port/path; (0, error) if unreachable."""
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (HOST, port, path),
                                    timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (OSError, ValueError) as error:
        return 0, str(error)


def statuses(metrics_port: int) -> Dict[str, dict]:
    """The process's /status, by tunnel name ({} while it does not answer)."""
    code, body = http_get(metrics_port, "/status")
    if code != 200:
        return {}
    return {tunnel["name"]: tunnel for tunnel in json.loads(body)["tunnels"]}


def wait_states(metrics_port: int, expected: Dict[str, str], timeout: float = 30,
                processes=()) -> None:
    """Wait until /status shows every named tunnel in its state; on failure the
    states and the end of each of ``processes``' logs."""
    def reached() -> bool:
        now = statuses(metrics_port)
        return all(now.get(name, {}).get("state") == state for name, state in expected.items())
    try:
        wait_until(reached, timeout, interval=0.2, what="states %r" % expected)
    except AssertionError:
        logs = "".join("\n--- log:\n" + process.output()[-3000:] for process in processes)
        raise AssertionError("states never became %r: %r%s"
                             % (expected, statuses(metrics_port), logs)) from None


def port_refuses(port: int) -> bool:
    """Nothing listens on the port. A port of the ephemeral range with no
    listener can still "accept": the kernel may pick that very port as the
    source, and TCP connects the socket to itself (simultaneous open)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            return sock.getsockname() == sock.getpeername()
    except OSError:
        return True


class PacedTransfer(threading.Thread):
    """Sends ``size`` bytes through an echo tunnel in chunks over ``seconds``,
    reading the echo as it comes; ``result()`` is what came back."""

    def __init__(self, port: int, size: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.payload = bytes(range(256)) * (size // 256)
        self.seconds = seconds
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.received = []  # type: List[bytes]
        self.error = None  # type: Optional[BaseException]
        self._reader = threading.Thread(target=self._read, daemon=True)

    def run(self) -> None:
        self._reader.start()
        chunk = 64 * 1024
        pause = self.seconds / max(1, len(self.payload) // chunk)
        try:
            for start in range(0, len(self.payload), chunk):
                self.sock.sendall(self.payload[start:start + chunk])
                time.sleep(pause)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.error = error

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.received.append(data)
        except OSError as error:
            self.error = error

    def result(self, timeout: float) -> bytes:
        self.join(timeout)
        self._reader.join(timeout)
        self.sock.close()
        return b"".join(self.received)


def served_certificate(port: int) -> bytes:
    """The DER certificate a TLS data port presents (nothing verified)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with context.wrap_socket(raw) as sock:
            return sock.getpeercert(binary_form=True)


def pem_to_der(path: str) -> bytes:
    with open(path) as stream:
        return ssl.PEM_cert_to_DER_cert(stream.read())


class NotifySocket:
    """A NOTIFY_SOCKET as systemd binds it: a Unix datagram socket (abstract name)."""

    def __init__(self, label: str) -> None:
        self.name = "@nodepass-test-%s-%d-%f" % (label, id(self), time.time())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages = []  # type: List[str]

    def receive(self, timeout: float) -> Optional[str]:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except socket.timeout:
            return None
        self.messages.append(message)
        return message

    def wait_for(self, assignment: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if message is not None and assignment in message.split("\n"):
                return message
        raise AssertionError("no %s within %.0fs; got %r" % (assignment, timeout,
                                                             self.messages))

    def close(self) -> None:
        self.sock.close()
