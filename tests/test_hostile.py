"""Hostile input against both roles (issue 5), with real sockets and processes.

Whatever arrives on a port, the attacked process must stay up, say in its log
what happened, keep serving real users, and give back every descriptor the
attack made it open. Our server is attacked on each of its ports: the tunnel
(control) port, the data port (from the client's own address and from
127.0.0.2, which Linux routes on loopback) and the target port, TCP and UDP.
Our client is attacked by ``HostileServer``, a fake NodePass server made of raw
sockets that follows the protocol until a test tells it to misbehave.

Descriptor counts come from /proc/PID/fd, compared with a baseline taken once
the tunnel is warm, FD_SLACK allowed, waiting up to SETTLE_TIMEOUT for
connections to wind down. The pool grows under load and shrinks by one a
second, so a count still high is only a leak if it is high outside the pool
(the pool's idle count comes from the traffic line SIGUSR1 makes a role log).

The one finding still open is a strict xfail (once fixed it XPASSes: drop the
mark): without a key, a silent data connection from the client's own address
is handed a user; the v1.0 wire gives the server no way to tell it apart (with
a key it is refused, see test_auth.py). Tests named as regressions cover
findings fixed in the core.

The soak at the end runs thousands of short connections; NODEPASS_SOAK_SECONDS
makes it run for that long instead (by hand: the default fits in CI).
"""

import contextlib
import os
import queue
import random
import re
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

import pytest

from support import HOST, echo_works, free_port, tcp_exchange, udp_exchange, wait_until

OTHER_HOST = "127.0.0.2"   # routable on Linux loopback, and not the client's address
FD_SLACK = 5               # pool refills move a descriptor count by a few
SETTLE_TIMEOUT = 15.0      # how long connections may take to wind down after an attack
SLOWLORIS_COUNT = 200
ENDLESS_LINE = b"A" * (1024 * 1024)  # 1 MB and never a newline
# The few attacks of the per-interpreter core suite (CI's "-m matrix"): garbage
# on every port, TLS garbage, floods past SEMAPHORE_LIMIT, a server sending the
# client garbage. Each takes seconds; the rest, and the soak, run on one Python.
MATRIX = pytest.mark.matrix
# A TLS record header (handshake, TLS 1.0) in front of noise: gets past a quick
# "is this TLS" sniff and fails inside the handshake.
TLS_GARBAGE_HEAD = b"\x16\x03\x01\x02\x00"
DATA_PORT_LINE = re.compile(r"data port (\d+)")
POOL_IDLE_LINE = re.compile(r"Traffic: .*pool idle=(\d+)")


# -- measuring a process -----------------------------------------------------------

def open_fds(process) -> int:
    return len(os.listdir("/proc/%d/fd" % process.pid))


def rss_kb(process) -> int:
    with open("/proc/%d/status" % process.pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % process.pid)


def pool_idle(process) -> Optional[int]:
    """Idle pooled data connections: the role's status, or (a process started
    without it) the traffic line SIGUSR1 makes it log."""
    if process.status_port is not None:
        return process.status()["pool_idle"]
    seen = len(process.output())
    process.send_signal(signal.SIGUSR1)
    try:
        wait_until(lambda: POOL_IDLE_LINE.search(process.output()[seen:]), 2, interval=0.02,
                   what="a traffic line")
    except AssertionError:
        return None
    return int(POOL_IDLE_LINE.findall(process.output()[seen:])[-1])


class FdBaseline:
    """A warm process's descriptor count, and the part of it outside the pool.

    The pool legitimately grows under load and shrinks by one a second after,
    so a count that stays high is a leak only if it stays high outside the pool.
    """

    def __init__(self, process, what: str) -> None:
        self.process, self.what = process, what
        self.total = max(self._sample() for _ in range(5))
        self.outside_pool = self._outside_pool()

    def _sample(self) -> int:
        time.sleep(0.05)
        return open_fds(self.process)

    def _outside_pool(self) -> int:
        idle = pool_idle(self.process)
        return open_fds(self.process) - (idle or 0)

    def settled(self) -> bool:
        return (open_fds(self.process) <= self.total + FD_SLACK
                or self._outside_pool() <= self.outside_pool + FD_SLACK)

    def assert_settles(self) -> None:
        try:
            wait_until(self.settled, SETTLE_TIMEOUT, interval=0.2,
                       what="%s descriptors back to baseline" % self.what)
        except AssertionError:
            raise AssertionError(
                "%s holds %d descriptors (%d outside its pool), baseline %d (%d), +%d allowed"
                "\n%s" % (self.what, open_fds(self.process), self._outside_pool(), self.total,
                          self.outside_pool, FD_SLACK, self.process.output()[-3000:])) from None


def assert_survived(process, *log_texts: str) -> None:
    """Alive, every text in its log (waiting a little), no traceback."""
    assert process.alive(), "process died:\n%s" % process.output()[-3000:]
    for text in log_texts:
        process.wait_for_output(text, timeout=10)
    output = process.output()
    assert "Traceback" not in output and "internal failure" not in output, output[-3000:]


def data_port_of(server) -> int:
    if server.status_port is not None:
        return server.wait_for_status(lambda status: status["data_port"], what="a data port"
                                      )["data_port"]
    server.wait_for_output("data port", timeout=10)
    return int(DATA_PORT_LINE.search(server.output()).group(1))


def assert_serves(port: int, rounds: int = 24) -> None:
    """Every one of ``rounds`` users gets its echo. More rounds than the pool
    holds, so every pooled connection, the attacker's included, reaches the
    front of the server's queue once."""
    failed = [index for index in range(rounds) if not echo_works(port)]
    assert not failed, "users %s of %d got no echo" % (failed, rounds)
    # UDP may lose a datagram while a flood is still draining: retry briefly.
    wait_until(lambda: udp_echo_works(port, b"datagram"), 10, interval=0,
               what="a UDP reply through the tunnel")


def udp_echo_works(port: int, payload: bytes, expected: Optional[bytes] = None) -> bool:
    try:
        return udp_exchange(port, payload, timeout=1) == (payload if expected is None
                                                          else expected)
    except OSError:
        return False


class Baselines:
    """Descriptor baselines of a warm tunnel's two processes."""

    def __init__(self, tunnel) -> None:
        self.tunnel = tunnel
        assert_serves(tunnel.port, rounds=4)
        time.sleep(0.3)  # let the pools refill after the warm-up traffic
        self.server = FdBaseline(tunnel.server, "server")
        self.client = FdBaseline(tunnel.client, "client")

    def assert_recovered(self, *server_log: str) -> None:
        """After an attack: both alive, the server logged it, users served, fds back."""
        assert_survived(self.tunnel.server, *server_log)
        assert_survived(self.tunnel.client)
        assert_serves(self.tunnel.port)
        self.server.assert_settles()
        self.client.assert_settles()


# -- attacks: each returns the sockets it keeps open (the caller closes them) -------

def attacker_socket(port: int, source: str = HOST, timeout: float = 3.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def send_and_close(port: int, source: str, payload: bytes) -> List[socket.socket]:
    """Send what the peer will take within the socket timeout, then hang up."""
    with attacker_socket(port, source) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass  # refused, reset or stalled: all fine for an attacker
    return []


def random_bytes(port: int, source: str) -> List[socket.socket]:
    return send_and_close(port, source, os.urandom(64 * 1024))


def endless_line(port: int, source: str) -> List[socket.socket]:
    return send_and_close(port, source, ENDLESS_LINE)


def tls_garbage(port: int, source: str) -> List[socket.socket]:
    return send_and_close(port, source, TLS_GARBAGE_HEAD + os.urandom(4096))


def port_probe(port: int, source: str) -> List[socket.socket]:
    """Connect and close at once, as monitoring systems do."""
    return send_and_close(port, source, b"")


def reset_probe(port: int, source: str) -> List[socket.socket]:
    """Connect and abort (RST instead of FIN), as half-open scanners end."""
    sock = attacker_socket(port, source)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return []


def slowloris(port: int, source: str, count: int = SLOWLORIS_COUNT) -> List[socket.socket]:
    """Half-open connections that never say a word."""
    held = []
    try:
        for _ in range(count):
            held.append(attacker_socket(port, source))
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(sockets: List[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


ATTACKS = {"random bytes": random_bytes, "endless line": endless_line, "slowloris": slowloris,
           "port probe": port_probe, "reset probe": reset_probe, "tls garbage": tls_garbage}
EVERY_ATTACK = sorted(ATTACKS)


def run_attacks(tunnel, port: int, source: str, expected_logs: Dict[str, str]) -> None:
    """Each attack in turn against ``port`` from ``source``: while it holds its
    sockets real users are served; after it the server has logged a line
    matching the attack's pattern once more, serves, and is back to its
    descriptor baseline."""
    baselines = Baselines(tunnel)
    for attack, pattern in expected_logs.items():
        def logged() -> int:
            return len(re.findall(pattern, tunnel.server.output()))
        logged_before = logged()
        try:
            held = ATTACKS[attack](port, source)
            try:
                assert_serves(tunnel.port)
            finally:
                close_all(held)
            wait_until(lambda: logged() > logged_before, 10,
                       what="a line matching %r in the server log" % pattern)
            baselines.assert_recovered()
        except AssertionError as exc:
            raise AssertionError("after %s on port %d from %s: %s"
                                 % (attack, port, source, exc)) from None


def every_attack_logs(pattern: str, **exceptions: str) -> Dict[str, str]:
    """Log patterns by attack: ``pattern`` for all but the keyword exceptions
    (``reset_probe=...`` stands for "reset probe")."""
    expected = {attack: pattern for attack in EVERY_ATTACK}
    expected.update({attack.replace("_", " "): text for attack, text in exceptions.items()})
    return expected


# -- our server: the tunnel (control) port ---------------------------------------

@MATRIX
def test_tunnel_port_attacks_are_refused_while_a_client_is_connected(make_tunnel):
    tunnel = make_tunnel()
    run_attacks(tunnel, tunnel.tunnel_port, HOST, every_attack_logs(r"Tunnel: refused "))
    assert tunnel.client.output().count(" open: data port") == 1  # never disturbed


def test_second_client_is_refused_and_the_first_keeps_working(make_tunnel, nodepass):
    tunnel = make_tunnel()
    baselines = Baselines(tunnel)
    intruder = nodepass(tunnel.client_url)
    intruder.wait_for_output("most likely it already serves another client")
    tunnel.server.wait_for_output("refused a second client from")
    assert_serves(tunnel.port)
    intruder.stop()
    baselines.assert_recovered("Tunnel: refused")
    assert " open: data port" not in intruder.output()  # it never learnt the data port


def probe_then_wait(server, probe: Callable, tunnel_port: int) -> None:
    """Probe the tunnel port and wait until the server has seen the probe go
    (its tunnel signal failed to send, or the connection closed)."""
    seen = len(server.output())
    probe(tunnel_port, HOST)
    wait_until(lambda: re.search(r"Tunnel: .*(closed|failed)", server.output()[seen:]), 5,
               what="the server to see the probe come and go")


@pytest.mark.parametrize("probe", ["port probe", "reset probe", "random bytes"])
def test_port_probe_before_the_client_does_not_lock_it_out(nodepass, echo, probe):
    env = {"SERVICE_COOLDOWN": "5s"}  # a probe that triggered it would cost 5 s
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, port), env)
    server.wait_for_output("Server: tunnel")
    baseline = FdBaseline(server, "server")
    probe_then_wait(server, ATTACKS[probe], tunnel_port)
    started = time.monotonic()
    client = nodepass("client://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, echo.port),
                      env)
    wait_until(lambda: echo_works(port), 10, interval=0.02, what="traffic after the probe")
    serving_after = time.monotonic() - started
    print("%s before the client: serving %.2fs after the client started" % (probe, serving_after))
    # Process start-up included (about 0.5 s); a refusal would add the 5 s cooldown.
    assert serving_after < 3.0, "client serving only %.2fs after it started" % serving_after
    assert "cooling down" not in server.output()
    assert "lost" not in client.output()
    assert_survived(server, "Tunnel: client connected from")
    client.stop()
    baseline.assert_settles()


def test_users_are_closed_at_once_after_a_reset_probe(nodepass):
    # Regression: the failed tunnel-signal write left the dead session in
    # place, and users waited POOL_WAIT (5 s) for a client that was not there.
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, port))
    server.wait_for_output("Server: tunnel")
    probe_then_wait(server, reset_probe, tunnel_port)
    with attacker_socket(port, timeout=1.0) as user:
        assert user.recv(16) == b""  # no client: closed at once, as before the probe


def test_keyed_tunnel_port_slowloris_does_not_lock_the_client_out(nodepass, echo):
    # Regression: silent connections held every pending-handshake place for a
    # handshake timeout each, and the keyed client queued behind them.
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://sesame@%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, port))
    server.wait_for_output("Server: tunnel")
    silent = slowloris(tunnel_port, HOST)  # far more than the places for handshakes
    try:
        nodepass("client://sesame@%s:%d/%s:%d" % (HOST, tunnel_port, HOST, echo.port))
        wait_until(lambda: echo_works(port), 3, interval=0.1, what="the keyed client to serve")
    finally:
        close_all(silent)


# -- our server: the data port ---------------------------------------------------

# A reset connection has no peer address left by the time it is logged: "?".
REFUSED_FROM_OTHER_HOST = every_attack_logs(r"Data: refused 127\.0\.0\.2:",
                                            reset_probe=r"Data: refused ")
# From the client's own address a connection gets past the address check. Its
# id write fails if the peer is already gone (reset), or it is pooled and
# dropped when it reaches the front of the pool: which one is a race. Silent
# connections from there (slowloris) are the xfail further down.
NOISE_FROM_CLIENT_ADDRESS = {
    attack: r"is closed or not silent; dropped|Data: handshake with "
    for attack in EVERY_ATTACK if attack != "slowloris"}


@MATRIX
def test_data_port_attacks_from_another_address_are_refused(make_tunnel):
    tunnel = make_tunnel()
    run_attacks(tunnel, data_port_of(tunnel.server), OTHER_HOST, REFUSED_FROM_OTHER_HOST)


def test_silent_data_connection_from_another_address_gets_no_id(make_tunnel):
    tunnel = make_tunnel()
    with attacker_socket(data_port_of(tunnel.server), OTHER_HOST) as intruder:
        assert intruder.recv(16) == b""  # closed at once, no id, no pool slot
    assert_serves(tunnel.port)


def test_data_port_noise_from_the_client_address_is_never_handed_to_users(make_tunnel):
    # Same address as the client, so the server cannot tell it apart and gives
    # it an id; it talks out of turn or hangs up, so the liveness check drops
    # it when it reaches the front of the pool.
    tunnel = make_tunnel()
    run_attacks(tunnel, data_port_of(tunnel.server), HOST, NOISE_FROM_CLIENT_ADDRESS)


@pytest.mark.xfail(strict=True, reason="docs/protocol.md, 'Silent data connections', a "
                   "v1.0 limit without a key: a silent connection to the data port from the "
                   "client's own address gets an id, is pooled and handed a real user "
                   "(with a key it is refused: test_auth.py)")
def test_silent_data_connection_from_the_client_address_is_not_handed_users(make_tunnel):
    tunnel = make_tunnel()
    with attacker_socket(data_port_of(tunnel.server), HOST) as intruder:
        assert len(intruder.recv(16)) == 8  # it was given an id
        intruder.settimeout(0.2)
        assert_serves(tunnel.port)
        with pytest.raises(socket.timeout):  # and no user's bytes
            intruder.recv(16)


@pytest.mark.parametrize("source", [pytest.param(HOST, marks=MATRIX), OTHER_HOST])
def test_tls_data_port_attacks(make_tunnel, source):
    tunnel = make_tunnel(tls=1)
    if source == OTHER_HOST:
        expected = REFUSED_FROM_OTHER_HOST
    else:  # from the client's address: past the address check, fails in the handshake
        expected = every_attack_logs(r"Data: handshake with ")
    run_attacks(tunnel, data_port_of(tunnel.server), source, expected)


# -- our server: the target port (where users arrive) ------------------------------

@MATRIX
def test_target_port_relays_noise_byte_exact(make_tunnel):
    # To the server, noise on the target port is a user like any other: it must
    # reach the private service unchanged and come back unchanged.
    tunnel = make_tunnel()
    baselines = Baselines(tunnel)
    noise = os.urandom(64 * 1024)
    assert tcp_exchange(tunnel.port, noise) == noise
    assert tcp_exchange(tunnel.port, ENDLESS_LINE, timeout=20) == ENDLESS_LINE
    port_probe(tunnel.port, HOST)
    reset_probe(tunnel.port, HOST)
    baselines.assert_recovered("Target: tcp user")


def test_target_port_slowloris_does_not_starve_real_users(make_tunnel):
    tunnel = make_tunnel()
    run_attacks(tunnel, tunnel.port, HOST, {"slowloris": r"Target: tcp user"})


def test_target_udp_noise_and_oversized_datagrams(make_tunnel):
    tunnel = make_tunnel()
    baselines = Baselines(tunnel)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        for size in [0, 1, 8192, 8193, 65507] + [random.randint(1, 9000) for _ in range(50)]:
            attacker.sendto(os.urandom(size), (HOST, tunnel.port))
    # Larger than UDP_DATA_BUF_SIZE (8192) on the v1.0 wire: dropped whole and
    # counted (test_udp_large.py), never cut, never a crash; small ones still pass.
    wait_until(lambda: udp_echo_works(tunnel.port, b"small"), 10, interval=0,
               what="a small datagram after the noise")
    dropped = tunnel.server.status()["udp_too_large_datagrams"]
    assert dropped >= 1  # 8193 and 65507 came first in the burst: in the queue
    assert not udp_echo_works(tunnel.port, os.urandom(20000))
    tunnel.server.wait_for_status(lambda status: status["udp_too_large_datagrams"]
                                  == dropped + 1, what="the 20000 bytes counted")
    baselines.assert_recovered("Target: udp user")


# -- our server: limits --------------------------------------------------------------

@MATRIX
def test_tcp_flood_past_semaphore_limit_waits_and_is_served_after(make_tunnel):
    tunnel = make_tunnel(env={"SEMAPHORE_LIMIT": "8"})
    baselines = Baselines(tunnel)
    flood = slowloris(tunnel.port, HOST, count=100)  # 8 take the slots, 92 wait
    try:
        waiting = attacker_socket(tunnel.port)
        flood.append(waiting)
        waiting.sendall(b"patient")
        waiting.settimeout(1.0)
        with pytest.raises(socket.timeout):  # neither served nor refused: queued
            waiting.recv(16)
        close_all(flood[:-1])
        # 92 queued users go through 8 places first, each with its own data connection:
        # seconds on an idle machine, more with 8 interpreters' suites at once (the matrix).
        waiting.settimeout(30)
        assert waiting.recv(16) == b"patient"  # served once the flood left
    finally:
        close_all(flood)
    baselines.assert_recovered()
    # Every flood connection was accepted in turn, none dropped on the floor.
    users = tunnel.server.output().count("Target: tcp user")
    assert users >= 101, "only %d users reached the tunnel" % users
    # Those who gave up in the backlog cost no data connection.
    assert "left while waiting for a place" in tunnel.server.output()
    assert_waits_counted(tunnel.server)


@MATRIX
def test_udp_flood_past_semaphore_limit(make_tunnel):
    tunnel = make_tunnel(env={"SEMAPHORE_LIMIT": "8"})
    baselines = Baselines(tunnel)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        for _ in range(2000):
            attacker.sendto(b"flood", (HOST, tunnel.port))
    baselines.assert_recovered("Target: udp user")
    assert_waits_counted(tunnel.server)


def assert_waits_counted(server) -> None:
    """Users that found the 8 places taken: counted on /status, and warned of."""
    assert server.status()["semaphore_waits"] > 0
    assert "Target: SEMAPHORE_LIMIT (8) reached: new users wait for a free place" in \
        server.output()


def test_accept_loops_survive_running_out_of_descriptors(nodepass, echo):
    tunnel_port, port = free_port(), free_port()
    server = nodepass("server://%s:%d/%s:%d?log=debug" % (HOST, tunnel_port, HOST, port),
                      prefix=["prlimit", "--nofile=128:128", "--"])
    client = nodepass("client://%s:%d/%s:%d" % (HOST, tunnel_port, HOST, echo.port))
    wait_until(lambda: echo_works(port), 15, what="traffic through the tunnel")
    with open("/proc/%d/limits" % server.pid) as limits:
        assert re.search(r"Max open files\s+128\s+128", limits.read())
    baseline = FdBaseline(server, "server")
    # Each idle user costs the server two descriptors (user and data connection).
    idle_users = slowloris(port, HOST, count=150)
    try:
        server.wait_for_output("accept failed (Too many open files)", timeout=15)
        assert server.alive()
    finally:
        close_all(idle_users)
    released = time.monotonic()
    wait_until(lambda: echo_works(port), 20, interval=0.2, what="traffic after EMFILE")
    print("EMFILE: serving %.2fs after the idle users left; %d accept failures logged"
          % (time.monotonic() - released, server.output().count("accept failed")))
    assert_survived(server)
    assert_survived(client)
    baseline.assert_settles()


# -- our client against a hostile server -------------------------------------------

HEARTBEAT_EVERY = 0.5  # the fake server's heartbeat; the client's REPORT_INTERVAL is 1s


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(256)
    return sock


def _is_silent(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def _read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


class HostileServer:
    """A fake NodePass server: plays by docs/protocol.md until told otherwise.

    ``tunnel_signals`` lists first lines for the next control connections (a
    good signal once it runs out); ``data_mode`` says what a data connection
    gets: "id" (8 hex characters), "silent", "short" (4 and a hang-up) or
    "garbage" (8 bytes that are not hex). ``silence()`` stops heartbeats on the
    current control connection.
    """

    def __init__(self) -> None:
        self.tunnel, self.data = _listener(), _listener()
        self.tunnel_port = self.tunnel.getsockname()[1]
        self.data_port = self.data.getsockname()[1]
        self.tunnel_signals: List[bytes] = []
        self.data_mode = "id"
        self.controls: List[Tuple[float, socket.socket]] = []  # (accepted at, socket)
        self.data_accepted = 0
        self.pool: queue.Queue = queue.Queue()  # (id, socket), the id written
        self._silenced: Set[socket.socket] = set()
        self._held: List[socket.socket] = []  # data connections it never gave an id
        self._write_lock = threading.Lock()
        self.closed = False
        for loop in (self._accept_controls, self._accept_data):
            threading.Thread(target=loop, daemon=True).start()

    @property
    def control(self) -> socket.socket:
        return self.controls[-1][1]

    def good_signal(self) -> bytes:
        return b"//%d#0\n" % self.data_port

    def send(self, data: bytes) -> None:
        with self._write_lock:
            self.control.sendall(data)

    def silence(self) -> None:
        """Stop heartbeats on the current control connection."""
        self._silenced.add(self.control)

    def hang_up(self) -> None:
        """Close the current control connection (the client reconnects)."""
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)
        self.control.close()

    def _accept_controls(self) -> None:
        while True:
            try:
                control, _ = self.tunnel.accept()
            except OSError:
                return
            first = self.tunnel_signals.pop(0) if self.tunnel_signals else self.good_signal()
            self.controls.append((time.monotonic(), control))
            try:
                control.sendall(first)
            except OSError:
                continue
            threading.Thread(target=self._heartbeat, args=(control,), daemon=True).start()

    def _heartbeat(self, control: socket.socket) -> None:
        while not self.closed:
            time.sleep(HEARTBEAT_EVERY)
            if control in self._silenced:
                return
            try:
                with self._write_lock:
                    control.sendall(b"\n")
            except OSError:
                return

    def _accept_data(self) -> None:
        while True:
            try:
                conn, _ = self.data.accept()
            except OSError:
                return
            self.data_accepted += 1
            connection_id = os.urandom(4).hex().encode()
            try:
                if self.data_mode == "id":
                    conn.sendall(connection_id)
                    self.pool.put((connection_id, conn))
                elif self.data_mode == "silent":
                    self._held.append(conn)
                elif self.data_mode == "short":
                    conn.sendall(connection_id[:4])
                    conn.close()
                else:
                    conn.sendall(b"ZZ\x00 \xff!?#")
                    self._held.append(conn)
            except OSError:
                conn.close()

    def launch_tcp(self, payload: bytes, timeout: float = 5.0, data_lead: float = 0.0,
                   pooled: Optional[Tuple[bytes, socket.socket]] = None) -> bytes:
        """Launch a pooled connection and pass ``payload`` through it and back.

        ``data_lead``: write the payload that many seconds before the launch
        signal, as a loaded server's bytes may overtake its signal.
        ``pooled``: launch this (id, socket), taken off ``pool`` earlier.
        """
        connection_id, conn = pooled or self.next_pooled(timeout)
        with conn:
            conn.settimeout(timeout)
            if data_lead:
                conn.sendall(payload)
                time.sleep(data_lead)
            self.send(b"//%s#1\n" % connection_id)
            if not data_lead:
                conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            return _read_to_eof(conn)

    def next_pooled(self, timeout: float) -> Tuple[bytes, socket.socket]:
        """The oldest (id, socket) the client still holds."""
        while True:
            connection_id, conn = self.pool.get(timeout=timeout)
            if _is_silent(conn):
                return connection_id, conn
            conn.close()  # the client dropped it (a flushed pool)

    def serves(self) -> bool:
        try:
            return self.launch_tcp(b"ping") == b"ping"
        except (OSError, queue.Empty):
            return False

    def close(self) -> None:
        self.closed = True
        for listener in (self.tunnel, self.data):
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() threads
            listener.close()
        sockets = [control for _, control in self.controls] + self._held
        while not self.pool.empty():
            sockets.append(self.pool.get_nowait()[1])
        close_all(sockets)


class HostileSetup:
    """Our client against a HostileServer, serving, with its descriptor baseline."""

    def __init__(self, nodepass, echo, fake: HostileServer, env=None) -> None:
        self.fake = fake
        self.client = nodepass("client://%s:%d/%s:%d?log=debug" % (
            HOST, fake.tunnel_port, HOST, echo.port), env)
        self.wait_serving()
        time.sleep(0.3)  # let the pool refill after the first launch
        self.baseline = FdBaseline(self.client, "client")

    def wait_serving(self, timeout: float = 15) -> None:
        wait_until(self.fake.serves, timeout, interval=0.1, what="the client to serve")

    def assert_recovered(self, *log_texts: str) -> None:
        assert_survived(self.client, *log_texts)
        self.wait_serving(timeout=10)
        for _ in range(10):
            assert self.fake.launch_tcp(b"after the attack") == b"after the attack"
        self.baseline.assert_settles()


@pytest.fixture
def hostile_server():
    servers = []

    def start() -> HostileServer:
        servers.append(HostileServer())
        return servers[-1]
    yield start
    for server in servers:
        server.close()


@pytest.fixture
def hostile(nodepass, echo, hostile_server):
    """``hostile(env=None)`` -> HostileSetup: our client serving a fake server, an
    echo target."""
    return lambda env=None: HostileSetup(nodepass, echo, hostile_server(), env)


GARBAGE_LINES = [
    b"hello\n", b"GET / HTTP/1.1\r\n", b"//\n", b"//#1\n", b"//?x=1#1\n", b"#1\n",
    b"\xff\xfe\xfd\n", b"\x00" * 64 + b"\n", b"//[::1#1\n", b"//a b#1\n", b"//\x01\x02#1\n",
    b"////////#1\n", b"//%zz#1\n", b"//\xc3\xa9t\xc3\xa9#1\n", b"\t \r\n",
]


@MATRIX
def test_client_skips_garbage_lines(hostile):
    setup = hostile()
    lines = GARBAGE_LINES + [os.urandom(random.randint(1, 200)).replace(b"\n", b"") + b"\n"
                             for _ in range(200)]
    setup.fake.send(b"".join(lines))
    setup.assert_recovered("Client: skipped a bad signal")
    assert setup.client.output().count(" open: data port") == 1  # the tunnel held


def test_client_skips_overlong_lines(hostile):
    setup = hostile()
    rss_before = rss_kb(setup.client)
    setup.fake.send(b"//" + b"a" * (4 * 1024 * 1024) + b"#1\n")  # 4 MB, one line
    setup.fake.send(b"B" * (1024 * 1024) + b"\n")
    setup.assert_recovered("signal longer than 4096 bytes")
    assert rss_kb(setup.client) - rss_before < 10 * 1024, "the long line was buffered"


UNKNOWN_KINDS = [b"", b"0", b"4", b"9", b"11", b"tcp", b"1x", b"-1"]


def test_client_ignores_unknown_kinds(hostile):
    setup = hostile()
    # Each names a connection the client holds: acting on a kind would use it up.
    named = [setup.fake.next_pooled(timeout=5) for _ in UNKNOWN_KINDS]
    for (connection_id, _), kind in zip(named, UNKNOWN_KINDS):
        setup.fake.send(b"//%s#%s\n" % (connection_id, kind))
    setup.assert_recovered(*("ignored signal of unknown kind %r" % kind.decode()
                             for kind in UNKNOWN_KINDS))
    output = setup.client.output()
    assert output.count("ignored signal of unknown kind") == len(UNKNOWN_KINDS)
    assert "Pool: no data connection with id" not in output
    assert output.count(" open: data port") == 1  # the tunnel held
    for pooled in named:  # every one still pooled and unused: it serves a real launch
        assert setup.fake.launch_tcp(b"still pooled", pooled=pooled) == b"still pooled"


def test_client_flushes_its_pool_after_a_flood_of_unknown_ids(hostile):
    setup = hostile()
    dialed_before = setup.fake.data_accepted
    flood = b"".join(b"//%s#%s\n" % (os.urandom(4).hex().encode(), random.choice((b"1", b"2")))
                     for _ in range(1000))
    setup.fake.send(flood)
    setup.assert_recovered("Pool: no data connection with id",
                           "launches named unknown ids; flushing the pool")
    assert setup.fake.data_accepted > dialed_before + 8  # it threw its pool away and refilled


BAD_TUNNEL_SIGNALS = [b"//0#0\n", b"//70000#0\n", b"//abc#0\n", b"//1234#7\n", b"\n",
                      b"//1234\n", b"x" * 10000 + b"\n", b"\xff\xfe\n"]


@MATRIX
def test_client_refuses_bad_tunnel_signals_and_reconnects(hostile):
    setup = hostile(env={"SERVICE_COOLDOWN": "100ms"})  # a reconnect per bad signal
    setup.fake.tunnel_signals.extend(BAD_TUNNEL_SIGNALS)
    setup.fake.hang_up()  # the client reconnects, and meets each bad signal in turn
    lost = "Client: tunnel to 127.0.0.1:%d lost" % setup.fake.tunnel_port  # it was open
    refused = "Client: tunnel to 127.0.0.1:%d did not open" % setup.fake.tunnel_port
    setup.assert_recovered(lost, refused)  # the good signal after the bad ones
    assert len(setup.fake.controls) == 1 + len(BAD_TUNNEL_SIGNALS) + 1
    assert setup.client.output().count(lost) == 1  # the hang-up; a bad signal is no loss
    assert setup.client.output().count(refused) >= len(BAD_TUNNEL_SIGNALS)
    assert setup.client.output().count(" open: data port") == 2


def test_client_with_a_data_port_nobody_listens_on_backs_off(hostile):
    setup = hostile()
    setup.fake.tunnel_signals.append(b"//%d#0\n" % free_port())
    setup.fake.hang_up()
    setup.client.wait_for_output("Pool: data connection failed", timeout=10)
    time.sleep(2)  # a few rounds of failing dials and back-off
    failures = setup.client.output().count("Pool: data connection failed")
    print("data port closed: %d failed dials in about 2s" % failures)
    # Failing dials hold no descriptors (an empty pool is below the baseline),
    # and back off rather than spin.
    assert open_fds(setup.client) <= setup.baseline.total + FD_SLACK
    assert failures < 200, "%d failed dials in about 2s: no back-off" % failures
    setup.fake.hang_up()  # the next session gets a good signal
    setup.assert_recovered()


@pytest.mark.parametrize("data_mode", ["silent", "short", "garbage"])
def test_client_survives_data_connections_without_a_good_id(hostile, data_mode):
    setup = hostile()
    setup.fake.data_mode = data_mode
    for _ in range(setup.fake.pool.qsize()):  # use the pool up: the client dials again
        assert setup.fake.launch_tcp(b"use it up") == b"use it up"
    setup.client.wait_for_output("Pool: data connection failed", timeout=10)
    setup.fake.data_mode = "id"
    setup.assert_recovered()


def test_client_replaces_pooled_connections_the_server_dropped(hostile):
    # Regression: they stayed in the pool in CLOSE_WAIT, never redialed, and
    # the tunnel stalled (a firewall timing idle connections out does this).
    setup = hostile()
    dropped = 0
    while not setup.fake.pool.empty():
        setup.fake.pool.get_nowait()[1].close()
        dropped += 1
    dialed_before = setup.fake.data_accepted
    wait_until(lambda: setup.fake.data_accepted >= dialed_before + dropped, 5,
               what="the client to redial the %d connections the server dropped" % dropped)


def test_client_keeps_a_pooled_connection_whose_data_arrives_before_its_launch(hostile):
    setup = hostile()
    # 1.5 s: longer than the pool's one-second round, so a sweep runs in between.
    assert setup.fake.launch_tcp(b"early bytes", data_lead=1.5) == b"early bytes"
    assert_survived(setup.client)


def test_client_reconnects_when_heartbeats_stop(hostile):
    setup = hostile()
    setup.fake.silence()
    silent_since = time.monotonic()
    wait_until(lambda: len(setup.fake.controls) == 2, 10, what="the client to reconnect")
    reconnected_after = setup.fake.controls[1][0] - silent_since
    print("heartbeats stopped: client reconnected after %.2fs" % reconnected_after)
    # REPORT_INTERVAL=1s: three missed heartbeats, then SERVICE_COOLDOWN=500ms.
    assert 2.0 < reconnected_after < 3 * 1.0 + 0.5 + 1.0, reconnected_after
    setup.assert_recovered("no heartbeat from the server for 3.0s")


# -- soak --------------------------------------------------------------------------

SOAK_SECONDS = float(os.environ.get("NODEPASS_SOAK_SECONDS", "0"))  # 0: a fixed count
SOAK_CONNECTIONS = 5000
SOAK_PARALLEL = 32
SOAK_RSS_GROWTH_KB = 20 * 1024


def run_soak(port: int, connections: int, seconds: float) -> Dict[str, int]:
    """Short connections, SOAK_PARALLEL at a time, each with a payload of its own."""
    counts = {"ok": 0, "corrupt": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds if seconds else None
    tickets = iter(range(10 ** 9 if seconds else connections))
    errors: List[str] = []

    def worker() -> None:
        while True:
            with lock:
                index = next(tickets, None)
            if index is None or (deadline is not None and time.monotonic() > deadline):
                return
            payload = b"%d:" % index + os.urandom(random.randint(1, 4096))
            try:
                outcome = "ok" if tcp_exchange(port, payload, timeout=10) == payload \
                    else "corrupt"
            except OSError as exc:
                outcome = "failed"
                errors.append(repr(exc))
            with lock:
                counts[outcome] += 1

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(SOAK_PARALLEL)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join((seconds or 120) + 30)
    assert not any(thread.is_alive() for thread in workers), "soak workers hung"
    counts["errors"] = len(errors)
    if errors:
        print("soak errors (first 5): %s" % errors[:5])
    return counts


@pytest.mark.timeout(SOAK_SECONDS + 150)
def test_soak_short_connections_keep_descriptors_and_memory_flat(make_tunnel):
    tunnel = make_tunnel()
    run_soak(tunnel.port, 500, 0)  # warm-up: pools sized, allocator arenas grown
    baselines = Baselines(tunnel)
    rss_before = {role: rss_kb(getattr(tunnel, role)) for role in ("server", "client")}
    started = time.monotonic()
    counts = run_soak(tunnel.port, SOAK_CONNECTIONS, SOAK_SECONDS)
    elapsed = time.monotonic() - started
    assert counts["corrupt"] == 0 and counts["failed"] == 0, counts
    assert counts["ok"] >= (1 if SOAK_SECONDS else SOAK_CONNECTIONS)
    baselines.assert_recovered()
    rss_growth = {role: rss_kb(getattr(tunnel, role)) - rss_before[role]
                  for role in ("server", "client")}
    print("soak: %d connections in %.1fs (%.0f/s); RSS growth kB %s; descriptors "
          "server %d -> %d, client %d -> %d"
          % (counts["ok"], elapsed, counts["ok"] / elapsed, rss_growth,
             baselines.server.total, open_fds(tunnel.server), baselines.client.total,
             open_fds(tunnel.client)))
    for role, growth in rss_growth.items():
        assert growth < SOAK_RSS_GROWTH_KB, "%s RSS grew by %d kB" % (role, growth)
