"""What the tests and the bench both need to run real services on loopback.

Plain standard library and nothing else, so that tests/ and scripts/benchmark/
share these two pieces without either importing the other's internals (the
bench's modules change with its workloads, the tests' helpers with the tests).
Both find this file with scripts/ on sys.path: scripts/bench puts it there,
tests/conftest.py does for the tests.
"""

import socket

# nginx's skeleton for a foreground nginx in its own prefix: every file it would
# write elsewhere (pid, logs, temp bodies) lives under prefix, so it runs unprivileged
# and its directory goes away whole. The caller's directives go inside http { }.
NGINX_SKELETON = """\
daemon off;
master_process {master_process};
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}}}
"""


def nginx_conf(prefix: str, http: str, master_process: bool = False,
               worker_connections: int = 1024) -> str:
    """A whole nginx.conf: the skeleton around http, the directives of its http block."""
    return NGINX_SKELETON.format(
        prefix=prefix,
        master_process="on" if master_process else "off",
        worker_connections=worker_connections,
        http=http,
    )


def read_to_eof(sock: socket.socket, chunk_size: int = 65536) -> bytes:
    """Everything sock receives until the peer's FIN (a socket timeout raises)."""
    chunks = []
    while True:
        chunk = sock.recv(chunk_size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
