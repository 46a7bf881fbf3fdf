"""Reconnect storms: 300 kills, 300 network cuts, 300 server restarts, no growth.

Each storm runs one long-lived process (the one measured) and beats on it:

- the client killed with SIGKILL and restarted 300 times against one server;
- the network between one client and one server cut 300 times (a forwarder
  owned by the test sits on 127.0.0.2 between them: most cuts reset every
  connection it carries both ways, every tenth one instead stops carrying
  bytes without a word, so the client must notice the silence by itself);
- the server killed (mostly SIGKILL, every fifth time SIGTERM) and restarted
  300 times against one client.

The long-lived process's greenlets, open descriptors and resident memory are
read at a quiet moment (no tunnel open: its peer dead or the forwarder
refusing) after a warm-up, and again after the storm; the end must be within
a small bound of the start, and a 1 MB transfer must work afterwards. Every
30th cycle also moves bytes through the tunnel mid-storm. The figures come
from the process itself: NODEPASS_DEBUG_COUNTS=1 and SIGUSR2 (debug.py).

The restarted side starts by fork from tests/storm_launcher.py (the imports
done once), so that a cycle costs tens of milliseconds, not 0.3 s of imports.
Run with -s to see the figures.
"""

import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List

import pytest

from support import FAST_ENV, HOST, echo_works, free_port, sha256, tcp_exchange, udp_exchange

pytestmark = [pytest.mark.storm, pytest.mark.timeout(150)]

CYCLES = 300
WARMUP_CYCLES = 10
TRAFFIC_EVERY = 30       # a transfer through the tunnel every so many cycles,
TRAFFIC_AT = 5           # first in the warm-up (gevent opens its thread pool's pipe then)
BLACKHOLE_EVERY = 10     # network storm: every tenth cut is silent
SIGTERM_EVERY = 5        # server storm: every fifth stop is graceful
COOLDOWN = 0.05  # SERVICE_COOLDOWN below, in seconds
STORM_ENV = {
    # Fast cycles: a dead tunnel is noticed after 3 * 200 ms of silence, and
    # both sides wait 50 ms before taking or dialing a new one.
    "REPORT_INTERVAL": "200ms",
    "SERVICE_COOLDOWN": "50ms",
    "SHUTDOWN_TIMEOUT": "1s",
    "UDP_READ_TIMEOUT": "1s",
    "MIN_POOL_CAPACITY": "4",
    "NODEPASS_DEBUG_COUNTS": "1",
    "PYTHONUNBUFFERED": "1",
}
# Growth allowed between the two quiet moments. One leaked greenlet or
# descriptor per cycle would be 300; a few are transient (a retry's dial).
GREENLET_GROWTH = 10
FD_GROWTH = 2
RSS_GROWTH_KB = 4096
FORWARDER_HOST = "127.0.0.2"  # the client's view of the server, across the "network"
LAUNCHER = os.path.join(os.path.dirname(__file__), "storm_launcher.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def storm_env() -> Dict[str, str]:
    env = dict(os.environ, **FAST_ENV)
    env.update(STORM_ENV)
    return env


# ------------------------------------------------------------------ processes

class LogWatch:
    """Follows a growing log file; waits for the next line containing a text."""

    def __init__(self, path: str) -> None:
        self.path, self._offset, self._pending = path, 0, ""

    def _read(self) -> None:
        try:
            with open(self.path, "r", errors="replace") as log:
                log.seek(self._offset)
                chunk = log.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk.encode("utf-8", "replace"))
        self._pending += chunk

    def next_line(self, pattern: str, timeout: float = 10.0) -> str:
        """The next complete line matching regex ``pattern`` (consumed with all before it)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            lines = self._pending.split("\n")
            for number, line in enumerate(lines[:-1]):  # the last one may be incomplete
                if regex.search(line):
                    self._pending = "\n".join(lines[number + 1:])
                    return line
            # Keep only the incomplete tail: every whole line was looked at.
            self._pending = lines[-1]
            if time.monotonic() > deadline:
                raise AssertionError("no line matching %r in %s within %.0fs; last lines:\n%s"
                                     % (pattern, self.path, timeout, tail(self.path)))
            time.sleep(0.003)

    def skip_to_end(self) -> None:
        self._read()
        self._pending = ""


def tail(path: str, lines: int = 25) -> str:
    with open(path, "r", errors="replace") as log:
        return "\n".join(log.read().splitlines()[-lines:])


class Launcher:
    """tests/storm_launcher.py: starts nodepass children by fork, reaps them."""

    def __init__(self, env: Dict[str, str]) -> None:
        env = dict(env, PYTHONPATH=os.pathsep.join(
            filter(None, [ROOT, env.get("PYTHONPATH", "")])))
        self.proc = subprocess.Popen([sys.executable, LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, universal_newlines=True,
                                     bufsize=1)
        self.children = set()

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer and not answer.startswith("error"), "launcher: %r -> %r" % (line, answer)
        return answer

    def start(self, url: str, log_path: str) -> int:
        pid = int(self._ask("start %s %s" % (log_path, url)))
        self.children.add(pid)
        return pid

    def stop(self, pid: int, number: int = signal.SIGKILL) -> int:
        """Signal a child and reap it: its exit status (negative: the signal)."""
        os.kill(pid, number)
        status = int(self._ask("wait %d" % pid))
        self.children.discard(pid)
        return status

    def close(self) -> None:
        for pid in list(self.children):
            self.stop(pid)
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()


class LongLived:
    """The measured process: an ordinary `python -m nodepass_gevent URL` child."""

    def __init__(self, url: str, log_path: str, env: Dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nodepass_gevent", url],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        self.watch = LogWatch(log_path)
        self.debug_watch = LogWatch(log_path)

    def figures(self) -> Dict[str, int]:
        """Its own count of greenlets, fds and RSS (SIGUSR2, debug.py)."""
        assert self.proc.poll() is None, "exited with %s:\n%s" % (self.proc.returncode,
                                                                  tail(self.log_path))
        self.debug_watch.skip_to_end()
        self.proc.send_signal(signal.SIGUSR2)
        line = self.debug_watch.next_line(r"Debug: greenlets=", timeout=10)
        return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def launcher():
    started = Launcher(storm_env())
    yield started
    started.close()


@pytest.fixture
def long_lived():
    started = []

    def start(url: str, log_path: str) -> LongLived:
        process = LongLived(url, log_path, storm_env())
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# ------------------------------------------------------------------ the network

class Forwarder:
    """A TCP relay in one thread of the test: FORWARDER_HOST:port -> HOST:port.

    ``cut()`` resets every connection it carries, both ways (a router that
    rebooted); ``blackhole()`` keeps them open but drops all their bytes from
    then on (a router that lost its state, silently); ``refuse(True)`` resets
    new connections at once (no way through). Half-closes pass through.
    """

    BUFFER_LIMIT = 1 << 18  # bytes held per direction before reading stops

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._requests = []  # (function, args, done event, result list)
        self._listeners = []  # type: List[socket.socket]
        self.pairs = set()
        self.refusing = False
        self.connections = 0  # accepted and connected upstream
        self._running = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # -- the test's side
    def forward(self, port: int) -> None:
        self._call(self._listen, port)

    def cut(self) -> int:
        return self._call(lambda: len([pair.reset() for pair in list(self.pairs)]))

    def blackhole(self) -> int:
        return self._call(lambda: len([setattr(pair, "stalled", True)
                                       for pair in list(self.pairs)]))

    def refuse(self, refusing: bool) -> None:
        self._call(setattr, self, "refusing", refusing)

    def close(self) -> None:
        if self._running:
            self._call(self._shutdown)
            self._thread.join(5)
        self._wake_reader.close()
        self._wake_writer.close()

    def _call(self, function, *args):
        done, result = threading.Event(), []
        with self._lock:
            self._requests.append((function, args, done, result))
        self._wake_writer.send(b"x")
        assert done.wait(10), "the forwarder's thread is stuck"
        return result[0]

    # -- its thread
    def _loop(self) -> None:
        while self._running:
            for key, mask in self._selector.select(1.0):
                if key.data is None:
                    self._run_requests()
                else:
                    key.data(key.fileobj, mask)
        self._selector.close()

    def _run_requests(self) -> None:
        try:
            self._wake_reader.recv(4096)
        except BlockingIOError:
            pass
        with self._lock:
            requests, self._requests = self._requests, []
        for function, args, done, result in requests:
            result.append(function(*args))
            done.set()

    def _listen(self, port: int) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((FORWARDER_HOST, port))
        listener.listen(128)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._selector.register(listener, selectors.EVENT_READ,
                                lambda sock, mask: self._accept(sock, port))

    def _accept(self, listener: socket.socket, port: int) -> None:
        try:
            down, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        if self.refusing:
            _reset(down)
            return
        try:
            up = socket.create_connection((HOST, port), timeout=2)
        except OSError:
            _reset(down)
            return
        self.connections += 1
        self.pairs.add(_Pair(self, down, up))

    def _shutdown(self) -> None:
        for pair in list(self.pairs):
            pair.reset()
        for listener in self._listeners:
            self._selector.unregister(listener)
            listener.close()
        self._running = False


class _Pair:
    """One relayed connection: ``down`` (the client's side) and ``up`` (the server's)."""

    def __init__(self, forwarder: Forwarder, down: socket.socket, up: socket.socket) -> None:
        self.forwarder, self.socks = forwarder, (down, up)
        self.outgoing = {down: bytearray(), up: bytearray()}  # to write to each
        self.reading = {down: True, up: True}
        self.shut_pending = {down: False, up: False}  # SHUT_WR once drained
        self.stalled = False
        self.closed = False
        for sock in self.socks:
            sock.setblocking(False)
            forwarder._selector.register(sock, selectors.EVENT_READ, self._ready)

    def _other(self, sock: socket.socket) -> socket.socket:
        return self.socks[1] if sock is self.socks[0] else self.socks[0]

    def _ready(self, sock: socket.socket, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(sock)
            if mask & selectors.EVENT_READ:
                self._read(sock)
        except OSError:
            self.reset()
            return
        if not self.closed:
            self._update()

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        other = self._other(sock)
        if data:
            if not self.stalled:
                self.outgoing[other] += data
            return
        self.reading[sock] = False
        self.shut_pending[other] = True
        self._flush(other)

    def _flush(self, sock: socket.socket) -> None:
        pending = self.outgoing[sock]
        if pending:
            try:
                del pending[:sock.send(pending)]
            except BlockingIOError:
                pass
        if not pending and self.shut_pending[sock]:
            self.shut_pending[sock] = False
            sock.shutdown(socket.SHUT_WR)

    def _update(self) -> None:
        if not any(self.reading.values()) and not any(self.outgoing.values()):
            self._close(_close_quietly)
            return
        for sock in self.socks:
            events = 0
            if (self.reading[sock]
                    and len(self.outgoing[self._other(sock)]) < Forwarder.BUFFER_LIMIT):
                events |= selectors.EVENT_READ
            if self.outgoing[sock]:
                events |= selectors.EVENT_WRITE
            registered = sock in self.forwarder._selector.get_map()
            if events and registered:
                self.forwarder._selector.modify(sock, events, self._ready)
            elif events:
                self.forwarder._selector.register(sock, events, self._ready)
            elif registered:
                self.forwarder._selector.unregister(sock)

    def reset(self) -> None:
        self._close(_reset)

    def _close(self, closer) -> None:
        if self.closed:
            return
        self.closed = True
        self.forwarder.pairs.discard(self)
        for sock in self.socks:
            if sock in self.forwarder._selector.get_map():
                self.forwarder._selector.unregister(sock)
            closer(sock)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    _close_quietly(sock)


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


@pytest.fixture
def forwarder():
    started = Forwarder()
    yield started
    started.close()


# ------------------------------------------------------------------- checks

def transfer_works(port: int, size: int, seed: int) -> None:
    payload = random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")
    echoed = tcp_exchange(port, payload, timeout=20)
    assert len(echoed) == size and sha256(echoed) == sha256(payload), (
        "%d of %d bytes came back, %s" % (len(echoed), size,
                                         "equal" if echoed == payload[:len(echoed)] else "wrong"))
    datagram = b"storm-%d" % seed
    assert udp_exchange(port, datagram, timeout=5) == datagram


def wait_served(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not echo_works(port):
        assert time.monotonic() < deadline, "no traffic through the tunnel in %.0fs" % timeout
        time.sleep(0.02)


def assert_bounded(what: str, start: Dict[str, int], end: Dict[str, int]) -> None:
    print("  %s: start %s" % (what, start))
    print("  %s: end   %s" % (what, end))
    growth = {name: end[name] - start[name] for name in ("greenlets", "fds", "rss_kb")}
    print("  %s: growth greenlets %+d, fds %+d, rss %+d KB"
          % (what, growth["greenlets"], growth["fds"], growth["rss_kb"]))
    assert growth["greenlets"] <= GREENLET_GROWTH, (what, start, end)
    assert growth["fds"] <= FD_GROWTH, (what, start, end)
    assert growth["rss_kb"] <= RSS_GROWTH_KB, (what, start, end)


class Sessions:
    """The server's tunnel sessions as its log tells them: opened minus ended."""

    OPENED = r"Tunnel: client connected from"
    ENDED = r"Tunnel: client \S+ disconnected;|Tunnel: connection from \S+ closed"

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path

    def open_now(self) -> int:
        with open(self.log_path, "r", errors="replace") as log:
            text = log.read()
        return len(re.findall(self.OPENED, text)) - len(re.findall(self.ENDED, text))

    def wait_none(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.open_now() != 0:
            assert time.monotonic() < deadline, "the server still holds a session:\n%s" \
                % tail(self.log_path)
            time.sleep(0.02)


def settle() -> None:
    """Let the last closes and the cooldown pass before counting."""
    time.sleep(4 * COOLDOWN + 0.2)


# ------------------------------------------------------------------- storms

def storm(cycle, quiet_figures, last_cycle_is_quiet: bool = False):
    """WARMUP_CYCLES, the figures at a quiet moment, CYCLES, the figures again:
    (start, end, seconds). With ``last_cycle_is_quiet`` the last cycle of each
    run is ``quiet_figures(number)``'s own (it cycles into the quiet moment)."""
    last = 1 if last_cycle_is_quiet else 0
    started = time.monotonic()
    for number in range(WARMUP_CYCLES - last):
        cycle(number)
    start = quiet_figures(WARMUP_CYCLES - last)
    for number in range(CYCLES - last):
        cycle(number)
    end = quiet_figures(CYCLES - last)
    return start, end, time.monotonic() - started


def restarted_side_carries_a_transfer(launcher: Launcher, url: str, log_path: str,
                                      user_port: int, seed: int) -> None:
    """After the storm the restarted side, started once more, carries 1 MB (and
    a datagram) through the long-lived one, and stops cleanly on SIGTERM."""
    pid = launcher.start(url, log_path)
    wait_served(user_port)
    transfer_works(user_port, 1000 * 1000, seed)
    assert launcher.stop(pid, signal.SIGTERM) == 0, tail(log_path)


def tunnel_open_then_traffic_or_a_pause(client_watch: LogWatch, user_port: int, number: int,
                                        rng: random.Random) -> None:
    """A cycle's middle, once the long-lived client has opened its tunnel: every
    TRAFFIC_EVERY-th cycle a transfer through it, else a random pause (the
    cycle's cut or kill then lands during or after the pool fill)."""
    client_watch.next_line(r"Client: tunnel to .* open")
    if number % TRAFFIC_EVERY == TRAFFIC_AT:
        wait_served(user_port)
        transfer_works(user_port, 65536, number)
    else:
        time.sleep(rng.uniform(0, 0.03))


def urls(echo_port: int, tunnel_host: str = HOST):
    tunnel_port, user_port = free_port(), free_port()
    server = "server://%s:%d/%s:%d?log=info" % (HOST, tunnel_port, HOST, user_port)
    client = "client://%s:%d/%s:%d?log=info" % (tunnel_host, tunnel_port, HOST, echo_port)
    return server, client, tunnel_port, user_port


def test_client_killed_and_restarted_300_times(tmp_path, echo, launcher, long_lived):
    server_url, client_url, _, user_port = urls(echo.port)
    server = long_lived(server_url, str(tmp_path / "server.log"))
    server.watch.next_line(r"Server: tunnel .* data port")
    sessions = Sessions(server.log_path)
    client_log = str(tmp_path / "clients.log")
    client_watch = LogWatch(client_log)
    rng = random.Random(5)

    def client_cycle(number: int) -> None:
        pid = launcher.start(client_url, client_log)
        if number % 7 == 3:
            time.sleep(rng.uniform(0, 0.02))  # killed before (or while) its tunnel opens
        else:
            client_watch.next_line(r"Client: tunnel to .* open")
            if number % TRAFFIC_EVERY == TRAFFIC_AT:
                transfer_works(user_port, 65536, number)
            else:
                time.sleep(rng.uniform(0, 0.03))  # during or after the pool fill
        assert launcher.stop(pid) == -signal.SIGKILL
        client_watch.skip_to_end()

    def quiet_figures(_number: int) -> Dict[str, int]:
        sessions.wait_none()
        settle()
        return server.figures()

    start, end, seconds = storm(client_cycle, quiet_figures)
    with open(server.log_path) as log:
        connected = log.read().count("Tunnel: client connected from")
    print("  %d client kills in %.1fs; the server saw %d tunnels"
          % (CYCLES + WARMUP_CYCLES, seconds, connected))
    assert_bounded("server (300 client kills)", start, end)
    restarted_side_carries_a_transfer(launcher, client_url, client_log, user_port, 1)
    assert server.proc.poll() is None


def test_network_cut_300_times(tmp_path, echo, forwarder, long_lived):
    server_url, client_url, tunnel_port, user_port = urls(echo.port, FORWARDER_HOST)
    server = long_lived(server_url, str(tmp_path / "server.log"))
    data_port = int(re.search(r"data port (\d+)",
                              server.watch.next_line(r"Server: tunnel .* data port")).group(1))
    forwarder.forward(tunnel_port)
    forwarder.forward(data_port)
    sessions = Sessions(server.log_path)
    client = long_lived(client_url, str(tmp_path / "client.log"))
    rng = random.Random(7)
    silent_cuts = 0

    def cut_cycle(number: int) -> None:
        nonlocal silent_cuts
        tunnel_open_then_traffic_or_a_pause(client.watch, user_port, number, rng)
        if number % BLACKHOLE_EVERY == BLACKHOLE_EVERY - 1:
            forwarder.blackhole()
            silent_cuts += 1
        else:
            forwarder.cut()

    def quiet_figures(_number: int) -> Dict[str, Dict[str, int]]:
        forwarder.refuse(True)
        forwarder.cut()
        sessions.wait_none()
        settle()
        figures = {"server": server.figures(), "client": client.figures()}
        forwarder.refuse(False)
        return figures

    start, end, seconds = storm(cut_cycle, quiet_figures)
    print("  %d cuts (%d silent) in %.1fs; %d connections crossed the forwarder"
          % (CYCLES + WARMUP_CYCLES, silent_cuts, seconds, forwarder.connections))
    assert_bounded("server (300 network cuts)", start["server"], end["server"])
    assert_bounded("client (300 network cuts)", start["client"], end["client"])
    wait_served(user_port)
    transfer_works(user_port, 1000 * 1000, 2)
    assert server.proc.poll() is None and client.proc.poll() is None


def test_server_restarted_300_times(tmp_path, echo, launcher, long_lived):
    server_url, client_url, _, user_port = urls(echo.port)
    server_log = str(tmp_path / "servers.log")
    client = long_lived(client_url, str(tmp_path / "client.log"))
    rng = random.Random(11)
    graceful = 0

    def server_cycle(number: int, stay_down: bool = False) -> None:
        nonlocal graceful
        pid = launcher.start(server_url, server_log)
        tunnel_open_then_traffic_or_a_pause(client.watch, user_port, number, rng)
        if number % SIGTERM_EVERY == SIGTERM_EVERY - 1:
            assert launcher.stop(pid, signal.SIGTERM) == 0, tail(server_log)
            graceful += 1
        else:
            assert launcher.stop(pid) == -signal.SIGKILL
        if stay_down:  # quiet: the client has seen the tunnel go and retries in vain
            client.watch.next_line(r"Client: (tunnel to .* lost|the server closed)|"
                                   r"reconnecting in", timeout=10)

    def quiet_figures(number: int) -> Dict[str, int]:
        server_cycle(number, stay_down=True)
        settle()
        return client.figures()

    start, end, seconds = storm(server_cycle, quiet_figures, last_cycle_is_quiet=True)
    print("  %d server restarts (%d by SIGTERM) in %.1fs"
          % (CYCLES + WARMUP_CYCLES, graceful, seconds))
    assert_bounded("client (300 server restarts)", start, end)
    restarted_side_carries_a_transfer(launcher, server_url, server_log, user_port, 3)
    assert client.proc.poll() is None
