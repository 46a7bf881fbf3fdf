"""End-to-end tests across a real NAT and stateful firewall, in network namespaces.

    public (server, users) --- nat (MASQUERADE, drops NEW from public) --- private (client, services)

scripts/netns-topology builds the namespaces; scripts/scenarios.py runs the
private services and the user-side checks (the Vagrant VMs run the same code).
Every process runs inside a namespace this module created, as
`ip netns exec NS python -m nodepass_gevent URL` (ip execs, so the Popen pid is
the real process), so all traffic stays inside those namespaces.

A legacy host across the NAT: the download/upload, UDP and link-cut scenarios
also run with the client on the oldest supported Python and the server on the
newest, and the reverse, each at tls=0 and tls=2. Those sides run from venvs
with this checkout pip-installed (tests/legacy_python.py builds them once per
session); the other scenarios run on the test run's own Python.

Needs root. If the topology cannot be built the tests FAIL, never skip; set
NODEPASS_SKIP_NETNS=1 to skip them on purpose (e.g. on a laptop without root).
A pyenv interpreter the legacy runs need that is missing also FAILS them; set
NODEPASS_SKIP_LEGACY=1 to skip just those on purpose.
Run with -s to see the timings and recovery times each test prints.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from legacy_python import (NEWEST, OLDEST, Interpreter, LegacyPythonError, build_venvs,
                           own_interpreter)
from nodepass_gevent.wire.v1.protocol import HEARTBEAT_MISSES  # heartbeats a silent tunnel may miss
from support import ChildProcess, NodepassProcess, netns_exec

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "scripts" / "netns-topology"
SCENARIOS = ROOT / "scripts" / "scenarios.py"

# Small intervals so that faults heal in seconds (Go duration syntax).
REPORT_INTERVAL = 1.0
SERVICE_COOLDOWN = 1.0
SHUTDOWN_TIMEOUT = 4.0
STOP_TIMEOUT = SHUTDOWN_TIMEOUT + 2  # a process that takes longer to stop fails
NODEPASS_ENV = {
    "REPORT_INTERVAL": "%dms" % (REPORT_INTERVAL * 1000),
    "SERVICE_COOLDOWN": "%dms" % (SERVICE_COOLDOWN * 1000),
    "SHUTDOWN_TIMEOUT": "%dms" % (SHUTDOWN_TIMEOUT * 1000),
    "UDP_READ_TIMEOUT": "2s",
}
UNBUFFERED = {"PYTHONUNBUFFERED": "1"}  # every process's log, as it happens
TRANSFER_SIZE = 50 * 1000 * 1000
START_DEADLINE = 20.0  # a fresh tunnel must carry traffic within this

pytestmark = pytest.mark.timeout(120)

# Which Python runs which side of the tunnel. SAME: the test run's own on both.
# The legacy pairs put the oldest supported Python on one side and the newest
# on the other: (server's, client's).
SAME = "same"
LEGACY_CLIENT = "client%s-server%s" % (OLDEST, NEWEST)  # a legacy host behind the NAT
LEGACY_SERVER = "server%s-client%s" % (OLDEST, NEWEST)  # ...and the reverse
LEGACY_PAIRS = {LEGACY_CLIENT: (NEWEST, OLDEST), LEGACY_SERVER: (OLDEST, NEWEST)}
LEGACY_TLS = (0, 2)
# The first legacy test also waits for the two venvs to be built (pip).
LEGACY_TIMEOUT = pytest.mark.timeout(400)


def with_legacy_pairs(tls_levels: Sequence[int]) -> list:
    """(tls, pythons) cases: today's tls levels on the test run's Python (ids
    unchanged), then tls=0 and tls=2 with each legacy pair."""
    cases = [pytest.param(tls, SAME, id=str(tls)) for tls in tls_levels]
    cases += [pytest.param(tls, pair, id="%d-%s" % (tls, pair), marks=LEGACY_TIMEOUT)
              for pair in LEGACY_PAIRS for tls in LEGACY_TLS]
    return cases


# ------------------------------------------------------------------ processes

class Processes:
    """Every process this module starts, each in a namespace with its log in
    ``log_dir``, so that teardown can prove none is left."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: List[ChildProcess] = []

    def start(self, name: str, namespace: str, argv: List[str]) -> ChildProcess:
        """A scenarios.py service or check."""
        return self._track(ChildProcess(argv, dict(os.environ, **UNBUFFERED), namespace,
                                        log_path=self._log_path(name), name=name))

    def start_nodepass(self, name: str, namespace: str, url: str, env: Dict[str, str],
                       python: Interpreter) -> NodepassProcess:
        return self._track(NodepassProcess(url, dict(UNBUFFERED, **env), python=python,
                                           namespace=namespace, log_path=self._log_path(name),
                                           name=name))

    def _log_path(self, name: str) -> Path:
        return self.log_dir / ("%02d-%s.log" % (len(self.started), name))

    def _track(self, process: ChildProcess) -> ChildProcess:
        self.started.append(process)
        return process

    def diagnostics(self) -> str:
        return "\n".join(p.tail() for p in self.started[-4:])

    def stop_all(self) -> List[str]:
        for process in self.started:
            if process.alive():
                process.stop_quietly(timeout=STOP_TIMEOUT)
        return ["%s (pid %d)" % (p.name, p.pid) for p in self.started if p.alive()]


# ------------------------------------------------------------------- topology

class Topology:
    """The namespaces and addresses `netns-topology up` reported."""

    def __init__(self, prefix: str, addresses: Dict[str, str], processes: Processes) -> None:
        self.prefix, self.processes = prefix, processes
        self.public = addresses["PUBLIC_NS"]
        self.nat = addresses["NAT_NS"]
        self.private = addresses["PRIVATE_NS"]
        self.server_ip = addresses["SERVER_IP"]
        self.server_name = addresses["SERVER_NAME"]
        self.private_ip = addresses["PRIVATE_IP"]

    def namespaces(self) -> List[str]:
        return [self.public, self.nat, self.private]


def run(argv: List[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def in_namespace(namespace: str, argv: List[str], timeout: float = 30.0) -> str:
    result = run(netns_exec(namespace) + argv, timeout)
    command = " ".join(shlex.quote(arg) for arg in argv)
    assert result.returncode == 0, "%s failed: %s" % (command, result.stderr)
    return result.stdout


def root_namespace_state() -> Dict[str, str]:
    """What this module must leave as it found it in the namespace it runs in."""
    rules = run(["iptables-save"]).stdout.splitlines()
    links = run(["ip", "-o", "link", "show"]).stdout.splitlines()
    return {
        # Comments carry a timestamp and chain lines carry counters: compare rules.
        "iptables rules": "\n".join(r for r in rules if not r.startswith(("#", ":"))),
        "network links": "\n".join(sorted(line.split(":")[1].strip() for line in links)),
    }


def parse_addresses(text: str) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def namespace_pids(namespace: str) -> List[int]:
    return [int(pid) for pid in run(["ip", "netns", "pids", namespace]).stdout.split()]


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    if os.environ.get("NODEPASS_SKIP_NETNS") == "1":
        pytest.skip("NODEPASS_SKIP_NETNS=1: namespace tests skipped on request")
    if os.geteuid() != 0:
        pytest.fail("the namespace suite needs root (set NODEPASS_SKIP_NETNS=1 to skip it)")
    before = root_namespace_state()
    prefix = "np%d" % os.getpid()
    built = run([str(TOPOLOGY), "up", prefix])
    if built.returncode != 0:
        pytest.fail("cannot build the NAT topology:\n%s%s" % (built.stdout, built.stderr))
    topo = Topology(prefix, parse_addresses(built.stdout),
                    Processes(tmp_path_factory.mktemp("netns-logs")))
    try:
        yield topo
    finally:
        _tear_down_and_check(topo, before)


def _tear_down_and_check(topo: Topology, before: Dict[str, str]) -> None:
    problems = ["process still running: %s" % p for p in topo.processes.stop_all()]
    for namespace in topo.namespaces():
        strays = namespace_pids(namespace)
        if strays:
            problems.append("stray processes in %s: %s" % (namespace, strays))
    down = run([str(TOPOLOGY), "down", topo.prefix])
    if down.returncode != 0:
        problems.append("teardown failed: %s" % down.stderr)
    check = run([str(TOPOLOGY), "check", topo.prefix])
    if check.returncode != 0:
        problems.append(check.stdout.strip())
    after = root_namespace_state()
    for what in before:
        if before[what] != after[what]:
            problems.append("the root namespace's %s changed:\n%s\n---\n%s"
                            % (what, before[what], after[what]))
    assert not problems, "the NAT suite left things behind:\n" + "\n".join(problems)


# ------------------------------------------------------------ services, checks

def start_services(topology: Topology) -> ChildProcess:
    """HTTP and UDP echo on one port in the private namespace."""
    port = int(in_namespace(topology.private, [sys.executable, str(SCENARIOS), "free-ports", "1"]))
    address = "%s:%d" % (topology.private_ip, port)
    process = topology.processes.start(
        "services", topology.private, [sys.executable, str(SCENARIOS), "serve", address])
    process.address = address
    check(topology, topology.private, ["ready"], address, "--deadline", "10")
    return process


@pytest.fixture(scope="module")
def services(topology):
    process = start_services(topology)
    yield process.address
    assert process.stop(timeout=STOP_TIMEOUT) == 0, process.tail()


def check(topology: Topology, namespace: str, names: List[str], target: Optional[str],
          *options: str, timeout: float = 90.0) -> Dict[str, dict]:
    """Run scenarios.py checks in a namespace; results by check name."""
    argv = [sys.executable, str(SCENARIOS), "check"] + names
    argv += ["--target", target] if target else []
    result = run(netns_exec(namespace) + argv + list(options), timeout)
    results = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        results[entry["check"]] = entry
        print("  %-10s %s" % (namespace.split("-")[-1], line))
    failed = [r for r in results.values() if not r["ok"]]
    assert result.returncode == 0 and not failed and len(results) == len(names), (
        "checks failed: %s\n%s\n%s\n%s" % (failed or result.stderr, result.stderr,
                                           topology.processes.diagnostics(),
                                           stalled_sockets(topology)))
    return results


def _queued(ss_entry: str) -> bool:
    queues = re.match(r"\s*(\d+)\s+(\d+)\s", ss_entry)  # Recv-Q, Send-Q
    return bool(queues) and (int(queues.group(1)) > 0 or int(queues.group(2)) > 0)


def stalled_sockets(topology: Topology) -> str:
    """TCP sockets with data unacknowledged or in backoff, per namespace: the
    kernel's side of a check that timed out (a tunnel stall shows as queued
    bytes with no backoff; a lossy link as retransmissions backing off)."""
    lines = []
    for namespace in (topology.public, topology.private):
        try:
            states = in_namespace(namespace, ["ss", "-tnio", "state", "established"])
        except (AssertionError, subprocess.SubprocessError, OSError) as error:
            lines.append("--- ss in %s failed: %s" % (namespace, error))
            continue
        entries = states.replace("\n\t", " ").splitlines()[1:]  # past the header
        stuck = [entry for entry in entries if "backoff:" in entry or "unacked:" in entry
                 or _queued(entry)]
        lines.append("--- %s: %d of %d established sockets with queued data or backoff"
                     % (namespace, len(stuck), len(entries)))
        lines.extend(stuck[:30])
    return "\n".join(lines)


def start_check(topology: Topology, namespace: str, names: List[str], target: str,
                *options: str) -> ChildProcess:
    """A check running in the background (its JSON lines land in its log)."""
    argv = [sys.executable, str(SCENARIOS), "check"] + names + ["--target", target]
    return topology.processes.start("check-" + "-".join(names), namespace, argv + list(options))


def results_of(process: ChildProcess) -> Dict[str, dict]:
    lines = process.log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    for entry in entries:
        print("  background %s" % json.dumps(entry, sort_keys=True))
    return {entry["check"]: entry for entry in entries}


# --------------------------------------------------------------------- tunnel

class NamespaceTunnel:
    """A nodepass server in `public` and client in `private`, restartable,
    each run by its own Python (the test run's own unless given)."""

    def __init__(self, topology: Topology, service: str, tls: int, pki: Optional[Dict],
                 server_python: Optional[Interpreter] = None,
                 client_python: Optional[Interpreter] = None,
                 client_settings: Optional[Dict[str, str]] = None) -> None:
        self.topology, self.tls = topology, tls
        self.server_python = server_python or own_interpreter()
        self.client_python = client_python or own_interpreter()
        ports = in_namespace(topology.public, [sys.executable, str(SCENARIOS), "free-ports", "2"])
        self.tunnel_port, target_port = (int(p) for p in ports.split())
        self.target = "%s:%d" % (topology.server_ip, target_port)
        query = "log=info&tls=%d" % tls
        if tls == 2:
            query += "&crt=%s&key=%s" % (pki["server"], pki["key"])
        self.server_url = "server://%s:%d/%s?%s" % (topology.server_ip, self.tunnel_port,
                                                    self.target, query)
        # tls=2: dial by name (mapped in the private namespace's /etc/hosts) and
        # insist on a verified certificate, so a downgrade to 0 or 1 fails the test.
        tunnel_host = topology.server_name if tls == 2 else topology.server_ip
        self.client_url = "client://%s:%d/%s?log=info&tls=%d" % (tunnel_host, self.tunnel_port,
                                                                 service, tls)
        self.client_env = dict(NODEPASS_ENV, **(client_settings or {}))
        if tls == 2:
            self.client_env["SSL_CERT_FILE"] = pki["ca"]
        self.server = self.start_server()
        self.client = self.start_client()

    def start_server(self) -> NodepassProcess:
        python = self.server_python
        self.server = self.topology.processes.start_nodepass(
            "server-tls%d-py%s" % (self.tls, python.label), self.topology.public,
            self.server_url, NODEPASS_ENV, python)
        return self.server

    def start_client(self) -> NodepassProcess:
        python = self.client_python
        self.client = self.topology.processes.start_nodepass(
            "client-tls%d-py%s" % (self.tls, python.label), self.topology.private,
            self.client_url, self.client_env, python)
        return self.client

    def check_pythons(self) -> None:
        """Each side really runs on the Python it was given."""
        for process, python in ((self.server, self.server_python),
                                (self.client, self.client_python)):
            assert process.executable() == python.executable(), (
                "%s runs %s, not Python %s (%s)" % (process.name, process.executable(),
                                                    python.label, python.executable()))

    def wait_ready(self, deadline: float) -> float:
        """Seconds until a user's GET came through (fails past `deadline`)."""
        started = time.monotonic()
        check(self.topology, self.topology.public, ["ready"], self.target,
              "--deadline", str(deadline))
        return time.monotonic() - started

    def control_connection(self) -> str:
        """The client's end of its one tunnel (control) connection, as host:port.

        A new value means the client opened a new tunnel: proof of a reconnect
        that does not depend on log wording.
        """
        # With a state filter, ss prints: Recv-Q Send-Q Local-Address Peer-Address
        lines = in_namespace(self.topology.private, [
            "ss", "-H", "-t", "-n", "state", "established",
            "dst", "%s:%d" % (self.topology.server_ip, self.tunnel_port)]).splitlines()
        assert len(lines) == 1, "expected one tunnel connection, ss shows %s" % lines
        return lines[0].split()[2]

    def user_sessions(self) -> int:
        """Users' TCP connections the server holds open on its target port."""
        port = self.target.rsplit(":", 1)[1]
        lines = in_namespace(self.topology.public, [
            "ss", "-H", "-t", "-n", "state", "established", "sport", "= :" + port])
        return len(lines.splitlines())

    def stop(self) -> None:
        statuses = [(process, process.stop_quietly(timeout=STOP_TIMEOUT))
                    for process in (self.client, self.server)]
        for process, status in statuses:
            assert status == 0, "%s exited with %s\n%s" % (process.name, status, process.tail())


def import_scenarios():
    sys.path.insert(0, str(SCENARIOS.parent))
    try:
        import scenarios
    finally:
        sys.path.remove(str(SCENARIOS.parent))
    return scenarios


@pytest.fixture(scope="module")
def pki(tmp_path_factory, topology):
    return import_scenarios().make_pki(str(tmp_path_factory.mktemp("pki")),
                                       topology.server_ip, topology.server_name)


@pytest.fixture(scope="session")
def legacy_pythons(tmp_path_factory) -> Dict[str, Interpreter]:
    """Venvs on the oldest and the newest Python with the checkout installed,
    built once per session, and only if a legacy test runs."""
    if os.environ.get("NODEPASS_SKIP_LEGACY") == "1":
        pytest.skip("NODEPASS_SKIP_LEGACY=1: legacy-Python runs skipped on request")
    started = time.monotonic()
    try:
        venvs = build_venvs([OLDEST, NEWEST], tmp_path_factory.mktemp("legacy-python"))
    except LegacyPythonError as error:
        pytest.fail("legacy Python: %s" % error)
    print("  venvs for Python %s and %s built in %.1fs"
          % (OLDEST, NEWEST, time.monotonic() - started))
    return venvs


@pytest.fixture
def make_ns_tunnel(topology, services, pki, request):
    tunnels: List[NamespaceTunnel] = []

    def make(tls: int = 0, pythons: str = SAME,
             client_settings: Optional[Dict[str, str]] = None) -> NamespaceTunnel:
        """`pythons`: SAME, or a LEGACY_PAIRS key saying which side runs which Python;
        `client_settings`: environment variables for the client on top of NODEPASS_ENV."""
        sides = [None, None]
        if pythons != SAME:
            venvs = request.getfixturevalue("legacy_pythons")
            sides = [venvs[minor] for minor in LEGACY_PAIRS[pythons]]
        tunnel = NamespaceTunnel(topology, services, tls, pki, *sides,
                                 client_settings=client_settings)
        tunnels.append(tunnel)
        seconds = tunnel.wait_ready(START_DEADLINE)
        tunnel.check_pythons()
        print("  tunnel tls=%d (server on Python %s, client on %s) ready in %.2fs"
              % (tls, tunnel.server_python.label, tunnel.client_python.label, seconds))
        return tunnel

    yield make
    for tunnel in tunnels:
        tunnel.stop()


# ------------------------------------------------------------------ scenarios

def firewall_drops(topology: Topology) -> int:
    """Packets the nat router's firewall rules have dropped so far."""
    rules = in_namespace(topology.nat, ["iptables", "-L", "FORWARD", "-v", "-x", "-n"])
    return sum(int(line.split()[0]) for line in rules.splitlines()
               if "nodepass-test-firewall" in line)


def test_firewall_blocks_direct_connections(topology, services):
    """Without the tunnel, users cannot reach the private service at all."""
    dropped_before = firewall_drops(topology)
    check(topology, topology.public, ["firewall"], None, "--private", services,
          "--blocked-timeout", "1")
    # The public side has a route to the private subnet: the firewall, not a
    # missing route, is what stopped the TCP SYN and the UDP datagram.
    assert firewall_drops(topology) >= dropped_before + 2
    # ...while the private side can open connections to the public side.
    check(topology, topology.private, ["get"], services)


@pytest.mark.parametrize("tls, pythons", with_legacy_pairs([0, 1, 2]))
def test_http_get_upload_download_by_hash(make_ns_tunnel, topology, tls, pythons):
    tunnel = make_ns_tunnel(tls, pythons)
    results = check(topology, topology.public, ["get", "upload", "download"], tunnel.target,
                    "--size", str(TRANSFER_SIZE), "--seed", "tls%d" % tls)
    for name in ("upload", "download"):
        print("  tls=%d %s %s of %d MB: %.1f MB/s"
              % (tls, pythons, name, TRANSFER_SIZE // 10**6,
                 TRANSFER_SIZE / 1e6 / results[name]["seconds"]))


@pytest.mark.parametrize("tls, pythons", with_legacy_pairs([0, 1]))
def test_udp_request_reply(make_ns_tunnel, topology, tls, pythons):
    tunnel = make_ns_tunnel(tls, pythons)
    check(topology, topology.public, ["udp"], tunnel.target, "--datagrams", "50",
          "--udp-max", "4096", "--seed", "udp%d" % tls)


def test_200_concurrent_sessions(make_ns_tunnel, topology):
    tunnel = make_ns_tunnel(0)
    results = check(topology, topology.public, ["concurrent"], tunnel.target,
                    "--sessions", "200", "--session-bytes", "65536")
    assert results["concurrent"]["sessions"] == 200


# ------------------------------------------------------- a bad, not a cut, link

# The router impairs its public link ("wan") while the usual checks run: random
# loss of forwarded packets (both directions), a token-bucket bottleneck (each
# direction), or both. This kernel has no netem
# qdisc, so added delay (and reordering, duplication) is out of reach: the
# only latency is the bottleneck's queue (tbf, up to 400 ms).
IMPAIRMENTS = {
    "loss5": {"loss": 0.05, "rate": None},
    "2mbit": {"loss": 0.0, "rate": "2mbit"},
    "loss5-2mbit": {"loss": 0.05, "rate": "2mbit"},
}
IMPAIR_COMMENT = "nodepass-test-impair"
# ~4 s each way through 2 Mbit/s: longer than the tunnel's silence limit
# (HEARTBEAT_MISSES x REPORT_INTERVAL), so heartbeats starved behind the bulk
# would show as a reconnect (1.5 MB, 6 s, added 20 s to the three runs).
IMPAIRED_SIZE = 1000 * 1000
IMPAIRED_SESSION_BYTES = 4096  # 200 sessions: ~0.8 MB each way
UDP_PROBES = 100
# The 200 sessions arrive at once, and each needs a pooled data connection
# within the server's POOL_WAIT (5 s). With the default pool (16, growing by
# one a second, the v1.0 rule) the rest are dialed during the burst, across the
# bottleneck's 400 ms queue: measured, the last users were served after 4.5 to
# 5.2 s, right at POOL_WAIT (before pool.py refilled per dial, 5 of 200 were
# dropped). So that this test does not ride on that margin, its client keeps a
# pool sized for the burst, dialed before the link is impaired, as an operator
# expecting bursts on a thin link would set MIN_POOL_CAPACITY.
IMPAIRED_POOL = 256
# How long one of the 200 sessions may go without a byte. The burst overflows
# the bottleneck's queue, so a segment can be tail-dropped again and again while
# it lasts, then meets the 5 % loss: TCP retransmits on an exponential backoff
# from an RTO already inflated by the 400 ms queue (about 1 s: 1+2+4+8+16 = 31 s
# after five losses of one segment). At 30 s, 1 of 200 sessions timed out in one CI
# run with both tunnel ends still relaying it (active=1 on each side, nothing
# cut, no reconnect), which is TCP's backoff, not the tunnel: `ss -tnio` sampled
# every 0.3 s over four passing runs showed backoff up to 5 and RTOs up to 10.4 s
# on the server's side. 90 s covers six losses in a row; a stall in the tunnel
# itself still fails the test.
IMPAIRED_IO_TIMEOUT = 90


@contextmanager
def impaired_link(topology: Topology, loss: float, rate: Optional[str]):
    """Impair the router's public link for the duration of the block."""
    undo = []
    try:
        if rate:
            # Both directions shaped in the router, as each leaves it: out of
            # "wan" (private to public) and, for what came in on "wan", out of
            # "lan". A qdisc on the server's own host would make its TCP see
            # local drops (and retry at once) instead of a router's.
            for device in ("wan", "lan"):
                in_namespace(topology.nat, ["tc", "qdisc", "add", "dev", device, "root", "tbf",
                                            "rate", rate, "burst", "32kbit", "latency", "400ms"])
                undo.append((topology.nat, ["tc", "qdisc", "del", "dev", device, "root"]))
        if loss:
            match = ["-m", "statistic", "--mode", "random", "--probability", str(loss),
                     "-m", "comment", "--comment", IMPAIR_COMMENT, "-j", "DROP"]
            in_namespace(topology.nat, ["iptables", "-I", "FORWARD", "1"] + match)
            undo.append((topology.nat, ["iptables", "-D", "FORWARD"] + match))
        yield
    finally:
        for namespace, argv in reversed(undo):
            in_namespace(namespace, argv)


def impair_drops(topology: Topology) -> int:
    """Packets the loss rule has dropped so far (0 without one)."""
    rules = in_namespace(topology.nat, ["iptables", "-L", "FORWARD", "-v", "-x", "-n"])
    return sum(int(line.split()[0]) for line in rules.splitlines() if IMPAIR_COMMENT in line)


def tcp_counters(namespace: str) -> Dict[str, int]:
    """The namespace's TCP MIB (/proc/net/snmp): OutSegs, RetransSegs, ..."""
    rows = [line.split() for line in in_namespace(namespace, ["cat", "/proc/net/snmp"])
            .splitlines() if line.startswith("Tcp:")]
    return {name: int(value) for name, value in zip(rows[0][1:], rows[1][1:])}


def tunnels_opened(tunnel: "NamespaceTunnel") -> int:
    """Tunnels the client has opened so far, by its log (1 means: never reconnected)."""
    return tunnel.client.log_path.read_text(errors="replace").count("Client: tunnel to ")


def wait_for_pool(tunnel: "NamespaceTunnel", size: int, timeout: float = 15.0) -> None:
    """Until the client holds `size` data connections (all but the tunnel's)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = in_namespace(tunnel.topology.private, [
            "ss", "-H", "-t", "-n", "state", "established",
            "dst", tunnel.topology.server_ip]).splitlines()
        if len(lines) - 1 >= size:
            return
        assert time.monotonic() < deadline, "the pool holds %d of %d" % (len(lines) - 1, size)
        time.sleep(0.2)


@pytest.fixture
def link_echo(topology):
    """A UDP (and HTTP) echo on the public side: probes of the link itself, from
    the private side out through the NAT and back."""
    port = int(in_namespace(topology.public, [sys.executable, str(SCENARIOS), "free-ports", "1"]))
    address = "%s:%d" % (topology.server_ip, port)
    process = topology.processes.start(
        "link-echo", topology.public, [sys.executable, str(SCENARIOS), "serve", address])
    check(topology, topology.public, ["ready"], address, "--deadline", "10")
    yield address
    assert process.stop(timeout=STOP_TIMEOUT) == 0, process.tail()


@pytest.mark.parametrize("impairment", list(IMPAIRMENTS))
@pytest.mark.timeout(IMPAIRED_IO_TIMEOUT * 3 + 120)
def test_impaired_link_keeps_bytes_exact_and_tunnel_up(make_ns_tunnel, topology, link_echo,
                                                       impairment):
    """Loss and/or a 2 Mbit/s bottleneck on the router's public link: every TCP
    byte arrives exact, the tunnel never reconnects (its heartbeats still get
    through), UDP through the tunnel loses no more than the link does."""
    tunnel = make_ns_tunnel(0, client_settings={"MIN_POOL_CAPACITY": str(IMPAIRED_POOL)})
    wait_for_pool(tunnel, IMPAIRED_POOL)
    control_before = tunnel.control_connection()
    opened_before = tunnels_opened(tunnel)
    sides = {"server": topology.public, "client": topology.private}
    counters_before = {side: tcp_counters(ns) for side, ns in sides.items()}
    with impaired_link(topology, **IMPAIRMENTS[impairment]):
        started = time.monotonic()
        results = check(topology, topology.public, ["get", "download", "upload", "concurrent"],
                        tunnel.target, "--size", str(IMPAIRED_SIZE), "--seed", impairment,
                        "--sessions", "200", "--session-bytes", str(IMPAIRED_SESSION_BYTES),
                        "--io-timeout", str(IMPAIRED_IO_TIMEOUT), timeout=IMPAIRED_IO_TIMEOUT * 3)
        through_tunnel = check(topology, topology.public, ["udploss"], tunnel.target,
                               "--datagrams", str(UDP_PROBES), "--udp-max", "1024",
                               "--udp-timeout", "2", "--seed", impairment)["udploss"]
        # The link's own loss, both ways, as the tunnel's packets meet it.
        link = check(topology, topology.private, ["udploss"], link_echo,
                     "--datagrams", str(2 * UDP_PROBES), "--udp-max", "1024",
                     "--udp-timeout", "0.5", "--seed", impairment)["udploss"]
        seconds = time.monotonic() - started
        dropped = impair_drops(topology)
    counters = {side: tcp_counters(ns) for side, ns in sides.items()}
    retransmits = {side: counters[side]["RetransSegs"] - counters_before[side]["RetransSegs"]
                   for side in sides}
    sent = {side: counters[side]["OutSegs"] - counters_before[side]["OutSegs"] for side in sides}
    reconnects = tunnels_opened(tunnel) - opened_before
    print("  %s: download %.2f MB/s, upload %.2f MB/s, 200 sessions in %.1fs (all %.1fs);"
          " loss rule dropped %d packets"
          % (impairment, IMPAIRED_SIZE / 1e6 / results["download"]["seconds"],
             IMPAIRED_SIZE / 1e6 / results["upload"]["seconds"],
             results["concurrent"]["seconds"], seconds, dropped))
    for side in sides:  # OutSegs leaves retransmissions out: the share is of both
        print("  %s: %s retransmitted %d TCP segments, %.2f%% of all it sent"
              % (impairment, side, retransmits[side],
                 100.0 * retransmits[side] / max(1, sent[side] + retransmits[side])))
    print("  %s: UDP through the tunnel lost %d/%d (%.1f%%), the link itself %d/%d (%.1f%%);"
          " reconnects %d" % (impairment, through_tunnel["lost"], through_tunnel["datagrams"],
                              100 * through_tunnel["loss"], link["lost"], link["datagrams"],
                              100 * link["loss"], reconnects))
    assert reconnects == 0, "the tunnel flapped:\n%s" % tunnel.client.tail()
    assert tunnel.control_connection() == control_before, "a new tunnel connection"
    # Loosely: the tunnel carries datagrams inside TCP, so it should lose less
    # than the link, never clearly more (3 of 100 allowed for a timeout).
    assert through_tunnel["loss"] <= link["loss"] + 0.03
    if IMPAIRMENTS[impairment]["loss"]:
        assert dropped > 0 and link["lost"] > 0, "the loss rule did not bite"
        assert retransmits["server"] + retransmits["client"] > 0
    if IMPAIRMENTS[impairment]["rate"]:
        # 2 Mbit/s is 0.25 MB/s: the bottleneck really was there, for longer
        # than a silent tunnel would live.
        assert IMPAIRED_SIZE / results["download"]["seconds"] < 0.3e6
        assert results["download"]["seconds"] > HEARTBEAT_MISSES * REPORT_INTERVAL


# How long the router's link stays cut: past the client's silence limit (it
# must notice the dead tunnel and reconnect by itself) and past the server's
# TCP_USER_TIMEOUT on the control connection (same limit), by 2 seconds.
CUT_SECONDS = HEARTBEAT_MISSES * REPORT_INTERVAL + 2
# Once the link is back: the client's next dial comes within SERVICE_COOLDOWN,
# or within the SYN retransmission of a dial that was in flight (1s, then 2s
# apart: <= 2 * SERVICE_COOLDOWN here); the server re-arms SERVICE_COOLDOWN
# after its session ended; the client then fills its pool and the user's GET
# goes through, allowed REPORT_INTERVAL. So with 1s settings the bound is 6s.
RECOVERY_BOUND = 2 * SERVICE_COOLDOWN + SERVICE_COOLDOWN + REPORT_INTERVAL + 2


# Each legacy pair and each tls level meets both kinds of cut (a Latin square:
# four runs, not eight, as each run is mostly CUT_SECONDS of waiting).
LINK_CUT_CASES = [pytest.param(cut, 0, SAME, id=cut) for cut in ("link-down", "blackhole")] + [
    pytest.param(cut, tls, pair, id="%s-tls%d-%s" % (cut, tls, pair), marks=LEGACY_TIMEOUT)
    for cut, tls, pair in (("link-down", 0, LEGACY_CLIENT), ("blackhole", 2, LEGACY_CLIENT),
                           ("blackhole", 0, LEGACY_SERVER), ("link-down", 2, LEGACY_SERVER))]


@pytest.mark.parametrize("cut, tls, pythons", LINK_CUT_CASES)
def test_link_cut_recovers_by_itself(make_ns_tunnel, topology, cut, tls, pythons):
    """The router's public link dies silently for CUT_SECONDS, then comes back."""
    tunnel = make_ns_tunnel(tls, pythons)
    tunnel_before = tunnel.control_connection()
    if cut == "link-down":
        sever = ["ip", "link", "set", "wan", "down"]
        mend = ["ip", "link", "set", "wan", "up"]
    else:  # packets vanish both ways, no ICMP, no link event: a router losing its state
        rule = ["FORWARD", "-i", "wan", "-j", "DROP"]
        back = ["FORWARD", "-o", "wan", "-j", "DROP"]
        sever = ["sh", "-c", "iptables -I %s && iptables -I %s" % (" ".join(rule), " ".join(back))]
        mend = ["sh", "-c", "iptables -D %s && iptables -D %s" % (" ".join(rule), " ".join(back))]
    in_namespace(topology.nat, sever)
    time.sleep(CUT_SECONDS)
    in_namespace(topology.nat, mend)
    recovery = tunnel.wait_ready(RECOVERY_BOUND)
    print("  %s for %.0fs: recovered %.2fs after the link came back (bound %.0fs)"
          % (cut, CUT_SECONDS, recovery, RECOVERY_BOUND))
    assert tunnel.server.alive() and tunnel.client.alive()
    assert tunnel.control_connection() != tunnel_before, "the tunnel was never re-opened"
    # New connections of both kinds work, and bytes are right.
    check(topology, topology.public, ["get", "udp", "download"], tunnel.target,
          "--size", "5000000", "--datagrams", "10")


# A restarted process is ready after its start-up (about a second of Python
# imports), the server's re-arm of SERVICE_COOLDOWN and the client's retry
# every SERVICE_COOLDOWN (its first dial may hit the moment before the listener
# is back), plus pool fill: 2 * SERVICE_COOLDOWN + 4s.
RESTART_BOUND = 2 * SERVICE_COOLDOWN + 4


def test_kill9_client_then_server(make_ns_tunnel, topology):
    tunnel = make_ns_tunnel(0)

    tunnel.client.send_signal(signal.SIGKILL)
    assert tunnel.client.wait(5) == -signal.SIGKILL
    tunnel.start_client()
    seconds = tunnel.wait_ready(RESTART_BOUND)
    print("  client killed -9 and restarted: tunnel back in %.2fs (bound %.0fs)"
          % (seconds, RESTART_BOUND))

    client_before = tunnel.client.pid
    tunnel_before = tunnel.control_connection()
    tunnel.server.send_signal(signal.SIGKILL)
    assert tunnel.server.wait(5) == -signal.SIGKILL
    tunnel.start_server()
    seconds = tunnel.wait_ready(RESTART_BOUND)
    print("  server killed -9 and restarted: client reconnected by itself in %.2fs"
          " (bound %.0fs)" % (seconds, RESTART_BOUND))
    assert tunnel.client.alive() and tunnel.client.pid == client_before
    assert tunnel.control_connection() != tunnel_before
    check(topology, topology.public, ["get", "udp"], tunnel.target, "--datagrams", "5")


PACED_SIZE = 8 * 1000 * 1000
PACED_RATE = 4 * 1000 * 1000  # the download lasts about 2s, well inside SHUTDOWN_TIMEOUT


@pytest.mark.parametrize("role", ["server", "client"])
def test_sigterm_during_transfer(make_ns_tunnel, topology, role):
    """SIGTERM drains: a transfer that fits the grace period ends intact, an idle
    session is cut at SHUTDOWN_TIMEOUT, the process exits 0, nothing is left."""
    tunnel = make_ns_tunnel(0)
    download = start_check(topology, topology.public, ["download"], tunnel.target,
                           "--size", str(PACED_SIZE), "--rate", str(PACED_RATE),
                           "--seed", "sigterm")
    idle = start_check(topology, topology.public, ["hold"], tunnel.target,
                       "--deadline", str(SHUTDOWN_TIMEOUT + 5))
    # Python start-up of the two checks takes a while on a busy machine: wait
    # until the server holds both sessions, then let the download flow a bit.
    deadline = time.monotonic() + 10
    while tunnel.user_sessions() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tunnel.user_sessions() == 2, "the two user sessions did not open"
    time.sleep(0.3)
    assert download.alive() and idle.alive()

    process = tunnel.server if role == "server" else tunnel.client
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    status = process.wait(SHUTDOWN_TIMEOUT + 3)
    exit_seconds = time.monotonic() - sent
    print("  %s got SIGTERM mid-transfer: exit status %s after %.2fs (SHUTDOWN_TIMEOUT %.0fs)"
          % (role, status, exit_seconds, SHUTDOWN_TIMEOUT))
    assert status == 0, process.tail()
    assert exit_seconds <= SHUTDOWN_TIMEOUT + 2

    for background in (download, idle):
        assert background.wait(15) is not None, "%s still running" % background.name
    results = results_of(download)
    results.update(results_of(idle))
    assert results["download"]["ok"], results["download"]
    assert results["hold"]["ok"], results["hold"]
    assert results["hold"]["held_seconds"] <= SHUTDOWN_TIMEOUT + 2 + 0.3

    # The namespace holds nothing of ours but the services.
    namespace = topology.public if role == "server" else topology.private
    expected = [] if role == "server" else [p.pid for p in topology.processes.started
                                            if p.name == "services"]
    assert sorted(namespace_pids(namespace)) == sorted(expected)
    # The other side is still up; the tunnel's own teardown stops it (exit 0).
    other = tunnel.client if role == "server" else tunnel.server
    assert other.alive(), other.tail()


# ------------------------------------------------------ the Vagrant client VM

VM_SERVER_IP, VM_CLIENT_IP = "192.168.56.10", "192.168.56.11"  # as in the Vagrantfile


@pytest.fixture
def vagrant_layout(topology):
    """The client VM's layout, rehearsed: `netns-topology up --uplink` moves a NIC
    of the caller's namespace into the nat namespace (on the VM, its NIC on the
    private network). Here that NIC is one end of a veth pair made for the
    purpose, whose other end sits in PREFIX-public, playing the server VM."""
    prefix = topology.prefix + "v"
    server_vm, uplink = prefix + "-public", prefix + "up"
    run(["ip", "netns", "add", server_vm])
    try:
        in_namespace(server_vm, ["ip", "link", "set", "lo", "up"])
        made = run(["ip", "link", "add", uplink, "type", "veth",
                    "peer", "name", "eth1", "netns", server_vm])
        assert made.returncode == 0, made.stderr
        in_namespace(server_vm, ["ip", "addr", "add", VM_SERVER_IP + "/24", "dev", "eth1"])
        in_namespace(server_vm, ["ip", "link", "set", "eth1", "up"])
        built = run([str(TOPOLOGY), "up", prefix, "--uplink", uplink,
                     "--uplink-addr", VM_CLIENT_IP + "/24", "--server-ip", VM_SERVER_IP])
        assert built.returncode == 0, built.stderr
        addresses = parse_addresses(built.stdout)
        addresses["PUBLIC_NS"] = server_vm
        layout = Topology(prefix, addresses, topology.processes)
        # As vagrant-nat does on the server VM: a route to the private subnet,
        # so that only the client VM's firewall keeps users out.
        in_namespace(server_vm, ["ip", "route", "add", addresses["PRIVATE_NET"],
                                 "via", VM_CLIENT_IP])
        yield layout
    finally:
        for process in topology.processes.started:
            if process.namespace.startswith(prefix + "-"):
                process.stop_quietly(timeout=STOP_TIMEOUT)
        run([str(TOPOLOGY), "down", prefix])
        run(["ip", "link", "del", uplink])  # only there if "up" failed before moving it


def test_vagrant_client_vm_layout(vagrant_layout, tmp_path):
    """What scripts/vagrant-nat sets up, with the seeded test CA made twice, as the
    two VMs make it: the client trusts its own copy, the server uses the other."""
    layout = vagrant_layout
    scenarios = import_scenarios()
    seed = "vagrant-nodepass-nat-test"
    server_pki = scenarios.make_pki(str(tmp_path / "server"), VM_SERVER_IP,
                                    layout.server_name, seed=seed)
    client_pki = scenarios.make_pki(str(tmp_path / "client"), VM_SERVER_IP,
                                    layout.server_name, seed=seed)
    services = start_services(layout)
    check(layout, layout.public, ["firewall"], None, "--private", services.address,
          "--blocked-timeout", "1")
    tunnel = NamespaceTunnel(layout, services.address, 2, dict(server_pki, ca=client_pki["ca"]))
    seconds = tunnel.wait_ready(START_DEADLINE)
    print("  vagrant layout: tls=2 tunnel ready in %.2fs" % seconds)
    check(layout, layout.public, ["get", "udp", "download"], tunnel.target,
          "--size", "5000000", "--datagrams", "10")
    tunnel.stop()
    assert services.stop(timeout=STOP_TIMEOUT) == 0


def test_vagrantfile_validates(tmp_path):
    """`vagrant validate` needs neither a box nor a provider; its state goes to tmp."""
    if not shutil.which("vagrant"):
        pytest.skip("vagrant is not installed (apt-get install vagrant)")
    env = dict(os.environ, VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
               VAGRANT_HOME=str(tmp_path / "home"), VAGRANT_CHECKPOINT_DISABLE="1")
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert "validated successfully" in result.stdout
