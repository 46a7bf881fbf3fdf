#!/usr/bin/env python3
"""NAT scenarios shared by tests/test_netns.py and the Vagrant VMs.

Glossary (as in docs/protocol.md): the *server* side is where users arrive (the
public namespace, or the server VM); the *private* side sits behind the NAT and
firewall and runs the nodepass client and the services it exposes.

Private side, one process serving both on the same port number (a nodepass
client forwards TCP and UDP to one target address):
    scenarios.py serve HOST:PORT
        HTTP over TCP:  GET /           -> HELLO
                        GET /blob?size=N&seed=S[&rate=R] -> N pattern bytes
                                        (at about R bytes per second)
                        PUT /upload     -> {"size": N, "sha256": HEX} of the body
                        POST /echo      -> the body
        UDP:            every datagram is sent back as it is

User side, one JSON line per check, exit status 0 only if every check passed:
    scenarios.py check CHECK... --target HOST:PORT [--private HOST:PORT] [options]
        firewall    a direct TCP connection and UDP query to --private must fail
        ready       retry GET / through the tunnel until it works (--deadline)
        get         GET / returns HELLO
        download    GET /blob, sha256 of what arrived == sha256 of the pattern
        upload      PUT /upload of the pattern, the service's sha256 must match
        udp         --datagrams requests, each reply equal to its request
        concurrent  --sessions TCP sessions open at once, each echoing its own bytes
        hold        an unfinished request must be cut by the far end within --deadline

Test PKI for tls=2 (needs the cryptography package):
    scenarios.py make-pki DIR --ip IP --name NAME [--seed TEXT]

Only the standard library is needed except for make-pki, and the code stays
valid for Python 3.8, the oldest interpreter a VM box may bring.
"""
import argparse
import hashlib
import http.client
import http.server
import json
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

HELLO = b"hello from the private side\n"
CHUNK_SIZE = 1 << 20
IO_TIMEOUT = 30.0  # seconds without progress before a check gives up


# ---------------------------------------------------------------- pattern data

def pattern_chunks(size: int, seed: str) -> Iterator[bytes]:
    """Yield `size` pseudo-random bytes, the same for the same seed.

    Both ends generate the pattern independently, so neither has to trust a
    hash the other one sent: a byte lost, added or moved changes the digest.
    """
    for index, offset in enumerate(range(0, size, CHUNK_SIZE)):
        length = min(CHUNK_SIZE, size - offset)
        rng = random.Random("%s:%d" % (seed, index))
        yield rng.getrandbits(8 * length).to_bytes(length, "little")


def pattern_sha256(size: int, seed: str) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


def paced(chunks: Iterator[bytes], bytes_per_second: int) -> Iterator[bytes]:
    """Re-slice `chunks` and hold them back to about `bytes_per_second`.

    A paced download lasts a known time, so a test can act while it runs.
    """
    started = time.monotonic()
    sent = 0
    for chunk in chunks:
        for offset in range(0, len(chunk), 1 << 16):
            piece = chunk[offset:offset + (1 << 16)]
            delay = started + sent / bytes_per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent += len(piece)
            yield piece


def parse_hostport(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- private side

class ServiceHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # 200 sessions per second of access log helps nobody

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/":
            self._reply(HELLO)
        elif url.path == "/blob":
            query = parse_qs(url.query)
            size = int(query.get("size", ["0"])[0])
            seed = query.get("seed", ["0"])[0]
            rate = int(query.get("rate", ["0"])[0])
            chunks = pattern_chunks(size, seed)
            self._reply_stream(size, paced(chunks, rate) if rate else chunks)
        else:
            self._reply(b"not found\n", status=404)

    def do_PUT(self):
        if urlsplit(self.path).path != "/upload":
            return self._reply(b"not found\n", status=404)
        digest = hashlib.sha256()
        size = 0
        for chunk in self._body_chunks():
            digest.update(chunk)
            size += len(chunk)
        body = {"size": size, "sha256": digest.hexdigest()}
        self._reply(json.dumps(body).encode() + b"\n")

    def do_POST(self):
        if urlsplit(self.path).path != "/echo":
            return self._reply(b"not found\n", status=404)
        self._reply(b"".join(self._body_chunks()))

    def _body_chunks(self) -> Iterator[bytes]:
        remaining = int(self.headers.get("Content-Length", "0"))
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                raise ConnectionError("request body cut after %d bytes short" % remaining)
            remaining -= len(chunk)
            yield chunk

    def _reply(self, body: bytes, status: int = 200):
        self._reply_stream(len(body), iter([body]), status)

    def _reply_stream(self, size: int, chunks: Iterator[bytes], status: int = 200):
        self.send_response(status)
        self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(chunk)
        self.close_connection = True


# http.server.ThreadingHTTPServer, spelled out: Python 3.6 has none.
class ServiceHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    # 200 sessions arrive at once through the tunnel: the default backlog of 5
    # would make the kernel drop SYNs and turn a concurrency test into a timing one.
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True


def run_udp_echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def serve(address: Tuple[str, int]) -> int:
    """Serve HTTP and UDP echo on `address` until SIGTERM or SIGINT."""
    http_server = ServiceHTTPServer(address, ServiceHandler)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(address)
    threading.Thread(target=run_udp_echo, args=(udp,), daemon=True).start()

    def stop(signum, frame):
        # shutdown() waits for serve_forever to return: run it off this thread.
        threading.Thread(target=http_server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("serving HTTP and UDP echo on %s:%d" % address, flush=True)
    http_server.serve_forever(poll_interval=0.2)
    http_server.server_close()
    udp.close()
    return 0


# ------------------------------------------------------------------- user side

class CheckFailed(Exception):
    pass


def http_request(target: Tuple[str, int], method: str, path: str,
                 body=None, headers: Optional[Dict[str, str]] = None,
                 timeout: float = IO_TIMEOUT) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(target[0], target[1], timeout=timeout)
    connection.request(method, path, body=body, headers=headers or {})
    return connection.getresponse()


def check_firewall(args) -> dict:
    """The private service must be unreachable directly from the user side."""
    if args.private is None:
        raise CheckFailed("the firewall check needs --private HOST:PORT")
    tcp_error = None
    try:
        socket.create_connection(args.private, timeout=args.blocked_timeout).close()
    except OSError as error:
        tcp_error = type(error).__name__
    if tcp_error is None:
        raise CheckFailed("direct TCP connection to %s:%d succeeded" % args.private)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(args.blocked_timeout)
        udp.sendto(b"are you there?", args.private)
        try:
            udp.recvfrom(65535)
            raise CheckFailed("direct UDP query to %s:%d was answered" % args.private)
        except OSError as error:
            udp_error = type(error).__name__
    return {"tcp": tcp_error, "udp": udp_error}


def check_ready(args) -> dict:
    """Retry GET / until it works; the time it took is the recovery time."""
    deadline = time.monotonic() + args.deadline
    attempts = 0
    last_error = ""
    while True:
        attempts += 1
        try:
            response = http_request(args.target, "GET", "/", timeout=2.0)
            if response.status == 200 and response.read() == HELLO:
                return {"attempts": attempts}
            last_error = "status %d" % response.status
        except (OSError, http.client.HTTPException) as error:
            last_error = "%s: %s" % (type(error).__name__, error)
        if time.monotonic() >= deadline:
            raise CheckFailed("not ready after %.1fs, %d attempts, last: %s"
                              % (args.deadline, attempts, last_error))
        time.sleep(0.1)


def check_get(args) -> dict:
    response = http_request(args.target, "GET", "/")
    body = response.read()
    if response.status != 200 or body != HELLO:
        raise CheckFailed("GET / returned %d %r" % (response.status, body[:80]))
    return {"status": response.status}


def check_download(args) -> dict:
    path = "/blob?size=%d&seed=%s&rate=%d" % (args.size, args.seed, args.rate)
    response = http_request(args.target, "GET", path)
    digest = hashlib.sha256()
    received = 0
    while True:
        chunk = response.read(1 << 16)
        if not chunk:
            break
        digest.update(chunk)
        received += len(chunk)
    expected = pattern_sha256(args.size, args.seed)
    if response.status != 200 or received != args.size or digest.hexdigest() != expected:
        raise CheckFailed("download: status %d, %d of %d bytes, sha256 %s"
                          % (response.status, received, args.size,
                             "matches" if digest.hexdigest() == expected else "differs"))
    return {"bytes": received, "sha256": expected}


def check_upload(args) -> dict:
    headers = {"Content-Length": str(args.size), "Content-Type": "application/octet-stream"}
    response = http_request(args.target, "PUT", "/upload",
                            body=pattern_chunks(args.size, args.seed), headers=headers)
    answer = json.loads(response.read().decode() or "{}")
    expected = pattern_sha256(args.size, args.seed)
    if answer.get("size") != args.size or answer.get("sha256") != expected:
        raise CheckFailed("upload: service got %r, expected size %d sha256 %s"
                          % (answer, args.size, expected))
    return {"bytes": args.size, "sha256": expected}


def check_udp(args) -> dict:
    rng = random.Random(args.seed)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(args.udp_timeout)
        for number in range(args.datagrams):
            # Sizes up to the service's read buffer, below a single MTU too.
            request = ("%d:" % number).encode() + os.urandom(rng.randint(1, args.udp_max))
            udp.sendto(request, args.target)
            try:
                reply, _ = udp.recvfrom(65535)
            except socket.timeout:
                raise CheckFailed("datagram %d (%d bytes): no reply within %.1fs"
                                  % (number, len(request), args.udp_timeout))
            if reply != request:
                raise CheckFailed("datagram %d: reply of %d bytes differs from request of %d"
                                  % (number, len(reply), len(request)))
    return {"datagrams": args.datagrams}


def check_udploss(args) -> dict:
    """Measure, rather than demand: --datagrams requests of up to --udp-max
    bytes, one at a time, each given --udp-timeout for its reply; the share
    never answered in time is the loss.

    Fails only past --max-loss, or on a reply that is no request's copy. A late
    reply (to an earlier request, already counted lost) is skipped.
    """
    rng = random.Random(args.seed)
    sent = set()
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for number in range(args.datagrams):
            request = ("%d:" % number).encode() + os.urandom(rng.randint(1, args.udp_max))
            sent.add(request)
            udp.sendto(request, args.target)
            deadline = time.monotonic() + args.udp_timeout
            while time.monotonic() < deadline:
                udp.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    reply, _ = udp.recvfrom(65535)
                except socket.timeout:
                    break
                if reply == request:
                    answered += 1
                    break
                if reply not in sent:
                    raise CheckFailed("datagram %d: a reply of %d bytes that is no request's"
                                      " copy" % (number, len(reply)))
    lost = args.datagrams - answered
    loss = lost / args.datagrams if args.datagrams else 0.0
    if loss > args.max_loss:
        raise CheckFailed("%d of %d datagrams unanswered (%.1f%%, more than %.1f%%)"
                          % (lost, args.datagrams, 100 * loss, 100 * args.max_loss))
    return {"datagrams": args.datagrams, "lost": lost, "loss": round(loss, 4)}


def check_hold(args) -> dict:
    """Open a session, leave its request unfinished, time how long until it is cut.

    Passes only if the far end closes it within --deadline: used while a
    nodepass process shuts down, to see open connections cut at its grace limit.
    """
    with socket.create_connection(args.target, timeout=IO_TIMEOUT) as session:
        session.sendall(b"GET / HTTP/1.1\r\n")  # no blank line: never complete
        opened = time.monotonic()
        session.settimeout(args.deadline)
        try:
            leftover = session.recv(65536)
        except socket.timeout:
            raise CheckFailed("session still open after %.1fs" % args.deadline)
        except ConnectionResetError:
            leftover = b""
    if leftover:
        raise CheckFailed("got %d bytes on an unfinished request" % len(leftover))
    return {"held_seconds": round(time.monotonic() - opened, 3)}


def echo_session(target: Tuple[str, int], payload: bytes, all_connected: threading.Barrier,
                 io_timeout: float) -> None:
    connection = http.client.HTTPConnection(target[0], target[1], timeout=io_timeout)
    connection.connect()
    # Every session holds its tunnel connection open before any sends, so all
    # of them really are concurrent.
    all_connected.wait(timeout=io_timeout)
    connection.request("POST", "/echo", body=payload,
                       headers={"Content-Type": "application/octet-stream"})
    response = connection.getresponse()
    echoed = response.read()
    connection.close()
    if response.status != 200 or echoed != payload:
        raise CheckFailed("echo of %d bytes came back as %d bytes (status %d)"
                          % (len(payload), len(echoed), response.status))


def check_concurrent(args) -> dict:
    all_connected = threading.Barrier(args.sessions)
    errors: List[str] = []

    def session(number: int) -> None:
        payload = os.urandom(args.session_bytes - number)  # a different length each
        try:
            echo_session(args.target, payload, all_connected, args.io_timeout)
        except Exception as error:  # noqa: BLE001 - every failure is reported below
            all_connected.abort()
            errors.append("session %d: %s: %s" % (number, type(error).__name__, error))

    # Daemon threads: a hung session must not keep the check process alive.
    threads = [threading.Thread(target=session, args=(n,), daemon=True)
               for n in range(args.sessions)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.io_timeout * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        errors.append("sessions still running after %.0fs" % (args.io_timeout * 2))
    if errors:
        # The first error is the cause; the others are mostly the broken barrier.
        raise CheckFailed("%d of %d sessions failed; first: %s"
                          % (len(errors), args.sessions, errors[0]))
    return {"sessions": args.sessions, "bytes_each_way": sum(
        args.session_bytes - n for n in range(args.sessions))}


CHECKS: Dict[str, Callable[[argparse.Namespace], dict]] = {
    "firewall": check_firewall,
    "ready": check_ready,
    "get": check_get,
    "download": check_download,
    "upload": check_upload,
    "udp": check_udp,
    "concurrent": check_concurrent,
    "hold": check_hold,
    "udploss": check_udploss,
}


def run_checks(args) -> int:
    if args.target is None and set(args.checks) - {"firewall"}:
        print("scenarios.py: --target HOST:PORT is needed by %s" % " ".join(args.checks),
              file=sys.stderr)
        return 2
    failed = 0
    for name in args.checks:
        started = time.monotonic()
        result: dict = {"check": name, "ok": True}
        try:
            result.update(CHECKS[name](args))
        except (CheckFailed, OSError, http.client.HTTPException, ValueError,
                threading.BrokenBarrierError) as error:
            result.update(ok=False, error="%s: %s" % (type(error).__name__, error))
            failed += 1
        result["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(result, sort_keys=True), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------- PKI

def make_pki(directory: str, ip: str, name: str, seed: Optional[str] = None) -> Dict[str, str]:
    """Write a test CA (ca.pem) and a server certificate for `ip` and `name`.

    With a seed, the CA key is derived from it, so two machines that cannot
    share files (the Vagrant VMs) get the same CA: the client VM writes only
    ca.pem, the server VM the server certificate signed by that key. A seeded
    key is public by construction: for test rigs only.
    """
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    curve = ec.SECP256R1()
    if seed is None:
        ca_key = ec.generate_private_key(curve)
    else:
        scalar = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big")
        ca_key = ec.derive_private_key(scalar % (2 ** 255) + 1, curve)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodepass test CA")])
    # Fixed dates and serial keep a seeded CA certificate identical everywhere.
    not_before = datetime.datetime(2020, 1, 1)
    not_after = datetime.datetime(2099, 1, 1)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(curve)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    paths = {kind: os.path.join(directory, kind + ".pem") for kind in ("ca", "server", "key")}
    pem = serialization.Encoding.PEM
    with open(paths["ca"], "wb") as out:
        out.write(ca_cert.public_bytes(pem))
    with open(paths["server"], "wb") as out:
        out.write(server_cert.public_bytes(pem))
    with open(os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        out.write(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# ------------------------------------------------------------------------- CLI

def free_ports(count: int) -> List[int]:
    """Ports the OS hands out that are free for both TCP and UDP right now."""
    ports: List[int] = []
    while len(ports) < count:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("0.0.0.0", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("0.0.0.0", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
    return ports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    commands.required = True  # 3.6: not an argument of add_subparsers

    serve_cmd = commands.add_parser("serve", help="private services: HTTP and UDP echo")
    serve_cmd.add_argument("address", type=parse_hostport)

    check = commands.add_parser("check", help="user-side checks, one JSON line each")
    check.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    check.add_argument("--target", type=parse_hostport,
                       help="the nodepass server's target address (where users arrive)")
    check.add_argument("--private", type=parse_hostport,
                       help="the private service's own address (for the firewall check)")
    check.add_argument("--size", type=int, default=50 * 1000 * 1000)
    check.add_argument("--seed", default="nodepass")
    check.add_argument("--rate", type=int, default=0,
                       help="download pace in bytes per second (0: as fast as it goes)")
    check.add_argument("--deadline", type=float, default=30.0)
    check.add_argument("--blocked-timeout", type=float, default=2.0)
    check.add_argument("--datagrams", type=int, default=50)
    check.add_argument("--udp-max", type=int, default=4096)
    check.add_argument("--udp-timeout", type=float, default=5.0)
    check.add_argument("--max-loss", type=float, default=1.0,
                       help="udploss: the largest share of unanswered datagrams that passes")
    check.add_argument("--sessions", type=int, default=200)
    check.add_argument("--io-timeout", type=float, default=IO_TIMEOUT,
                       help="seconds a concurrent session may go without progress")
    check.add_argument("--session-bytes", type=int, default=64 * 1024)

    pki = commands.add_parser("make-pki", help="test CA and server certificate for tls=2")
    pki.add_argument("directory")
    pki.add_argument("--ip", required=True)
    pki.add_argument("--name", required=True)
    pki.add_argument("--seed")

    ports = commands.add_parser("free-ports", help="print free TCP+UDP port numbers")
    ports.add_argument("count", type=int)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.address)
    if args.command == "check":
        return run_checks(args)
    if args.command == "make-pki":
        print(json.dumps(make_pki(args.directory, args.ip, args.name, args.seed)))
        return 0
    print(" ".join(str(port) for port in free_ports(args.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
