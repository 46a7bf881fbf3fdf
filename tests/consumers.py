"""Real PROXY protocol consumers for the tests: Debian's nginx and HAProxy, on loopback.

Each runs in the foreground (nginx ``daemon off; master_process off``,
``haproxy -db``) from a temp directory with its own config, answers any HTTP
request with 200 "ok", and logs, one line per request, the client address and
port it took from the PROXY header (``$proxy_protocol_addr:$proxy_protocol_port``
for nginx, ``%ci:%cp`` for HAProxy, whose log goes to stderr). Both accept v1
and v2 headers on the same port. ``close()`` stops the process by its pid.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import List, Optional

from loopback import nginx_conf
from support import HOST, free_port, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# The http block of nginx's conf (loopback.nginx_conf puts the rest around it).
NGINX_HTTP = """\
    log_format proxied '$proxy_protocol_addr:$proxy_protocol_port via $remote_addr';
    access_log {prefix}/access.log proxied;
    server {{
        listen {listen} proxy_protocol backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
"""

HAPROXY_CONF = """\
global
    log stderr format raw local0
    maxconn 1024
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend users
    bind {listen} accept-proxy
    log-format "%ci:%cp via %fi"
    http-request return status 200 content-type text/plain string ok
"""


def _listen(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class Consumer:
    """One consumer process; ``port`` takes PROXY-headed HTTP."""

    name = ""

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self.port = free_port(host)
        self.prefix = tempfile.mkdtemp(prefix="%s-pp-" % self.name)
        self._output = open(os.path.join(self.prefix, "output.log"), "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._output,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(self._listening, 10, what="%s listening" % self.name)
        except AssertionError:
            self.close()
            raise

    def command(self) -> List[str]:
        raise NotImplementedError

    def log_text(self) -> str:
        raise NotImplementedError

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("%s exited: %s" % (self.name, self._read("output.log")))
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            return probe.connect_ex((self.host, self.port)) == 0

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.prefix, name), "r", errors="replace") as log:
                return log.read()
        except OSError:
            return ""

    def wait_for_line(self, text: str, timeout: float = 10) -> None:
        try:
            wait_until(lambda: text in self.log_text(), timeout, what="%r in %s's log"
                       % (text, self.name))
        except AssertionError:
            raise AssertionError("%r not in %s's log:\n%s" % (text, self.name,
                                                            self.log_text()[-2000:])) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._output.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


class Nginx(Consumer):
    name = "nginx"

    def command(self) -> List[str]:
        conf = os.path.join(self.prefix, "nginx.conf")
        with open(conf, "w") as out:
            http = NGINX_HTTP.format(prefix=self.prefix, listen=_listen(self.host, self.port))
            out.write(nginx_conf(self.prefix, http))
        return [NGINX, "-p", self.prefix, "-c", conf, "-e", os.path.join(self.prefix, "error.log")]

    def log_text(self) -> str:
        return self._read("access.log")


class HAProxy(Consumer):
    name = "haproxy"

    def command(self) -> List[str]:
        conf = os.path.join(self.prefix, "haproxy.cfg")
        with open(conf, "w") as out:
            out.write(HAPROXY_CONF.format(listen=_listen(self.host, self.port)))
        return [HAPROXY, "-db", "-f", conf]

    def log_text(self) -> str:
        return self._read("output.log")


def http_get(port: int, host: str = HOST, source: Optional[str] = None, timeout: float = 10,
             prefix: bytes = b"") -> tuple:
    """One HTTP/1.0 GET from ``source`` (an address of this host); (reply, (ip, port) used)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
        local = sock.getsockname()[:2]
        sock.sendall(prefix + b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        parts = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            parts.append(chunk)
        return b"".join(parts), local
