"""Workload 8: N tunnels in one process vs N processes (issue 12)."""

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import List, Optional, Sequence

from ..base import (
    BenchError,
    Figures,
    HOST,
    ROUTE_READY_TIMEOUT,
    STOP_TIMEOUT,
    TUNNEL_MODES,
    Workload,
    say,
)
from ..peers import exit_reason, join_query, nodepass_env, writes_proxy_header
from ..processes import _signal_group, free_ports, is_listening, proc_rss_kb, wait_until
from ..targets import Target
from .idle import echo_again, open_echoing


# --------------------------------------------------------------------------
# Workloads with a section of their own: many tunnels (issue 12), rate= (issue 13).

TUNNEL_LAYOUTS = ("processes", "one process")


class MultiUrlUnsupported(BenchError):
    """nodepass refused several URLs on one command line (a build from before issue 12)."""


def established_sockets(pids: Sequence[int]) -> int:
    """How many ESTABLISHED TCP sockets the processes pids hold (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as lines:
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "01":
                        inodes.add(fields[9])
    count = 0
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    link = os.readlink(os.path.join(fd_dir, fd))
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        count += 1
    return count


def min_pool_capacity(bench: "Bench") -> int:
    value = bench.options.nodepass_env.get("MIN_POOL_CAPACITY", "16")
    return int(value) if value.isdigit() else 16


def tunnel_mode(bench: "Bench") -> Optional[str]:
    """The tunnel mode the many-tunnels workload runs: tls0, else tls1, if in --modes."""
    for mode in TUNNEL_MODES:
        if mode in bench.modes:
            return mode
    return None


def start_tunnel_side(
    bench: "Bench", label: str, python: str, urls: Sequence[str], one_process: bool
) -> List[subprocess.Popen]:
    env = nodepass_env(bench.options.nodepass_env)
    program = [python, "-m", "nodepass_gevent"]
    if one_process:
        return [bench.procs.start(label, program + list(urls), env)]
    return [
        bench.procs.start("%s%d" % (label, index), program + [url], env)
        for index, url in enumerate(urls)
    ]


def measure_tunnels(
    bench: "Bench", target: Target, mode: str, count: int, layout: str, stack: contextlib.ExitStack
) -> Figures:
    """count tunnels to the echo target, as count server + count client processes or as one
    server and one client process given every URL; RSS of each side once every tunnel
    echoes and every pool is full, then connections spread over all tunnels must echo."""
    scale, options = bench.scale, bench.options
    python = bench.interpreters[mode].path
    one_process = layout == "one process"
    ports = free_ports(2 * count)
    pairs = list(zip(ports[::2], ports[1::2]))  # (tunnel, entry) ports
    server_urls = [
        "server://%s:%d/%s:%d?%s"
        % (HOST, tunnel, HOST, entry,
           join_query("log=" + options.log_level, "tls=" + mode[-1], options.server_query))
        for tunnel, entry in pairs
    ]
    client_urls = [
        "client://%s:%d/%s:%d?%s"
        % (HOST, tunnel, HOST, target.port,
           join_query("log=" + options.log_level, options.client_query))
        for tunnel, _ in pairs
    ]
    label = "tunnels%d-%s-" % (count, "one" if one_process else "many")
    # Many Python processes starting at once on a busy machine: allow each a few seconds.
    deadline = time.monotonic() + ROUTE_READY_TIMEOUT + 2.0 * count
    started = time.monotonic()
    servers = start_tunnel_side(bench, label + "server", python, server_urls, one_process)
    stack.callback(stop_tunnel_side, bench, servers)
    try:
        for tunnel, _ in pairs:
            wait_until(lambda: is_listening(tunnel), deadline - time.monotonic(),
                       "server of tunnel %d" % tunnel, servers, 0.05)
    except BenchError as exc:
        exited = [proc for proc in servers if proc.poll() is not None]
        if one_process and count > 1 and exited and exited[0].returncode == 2:
            raise MultiUrlUnsupported(exit_reason(exited[0], bench.procs.log_tail(exited[0], 40)))
        tails = "".join("\n--- pid %d log tail:\n%s" % (proc.pid, bench.procs.log_tail(proc, 5))
                        for proc in exited[:2])
        raise BenchError(str(exc) + tails)
    clients = start_tunnel_side(bench, label + "client", python, client_urls, one_process)
    stack.callback(stop_tunnel_side, bench, clients)
    everyone = servers + clients
    try:
        for _, entry in pairs:
            wait_until(lambda: target.probe(entry), max(0.1, deadline - time.monotonic()),
                       "tunnel to entry %d" % entry, everyone, 0.05)
    except BenchError as exc:
        tails = "".join("\n--- pid %d log tail:\n%s" % (proc.pid, bench.procs.log_tail(proc, 5))
                        for proc in everyone if proc.poll() is not None)
        raise BenchError(str(exc) + tails)
    startup = time.monotonic() - started
    # Each tunnel: its control connection and a full pool, seen from the client side.
    wanted = count * (1 + min_pool_capacity(bench))
    client_pids = [proc.pid for proc in clients]
    pool = established_sockets(client_pids)
    while pool < wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        pool = established_sockets(client_pids)
    if pool < wanted:
        bench.note("tunnels N=%d, %s: %d of %d control and pool connections up at the deadline"
                   % (count, layout, pool, wanted))
    time.sleep(1.0)  # idle, as the workload says, before memory is read
    server_kb = sum(proc_rss_kb(proc.pid) for proc in servers)
    client_kb = sum(proc_rss_kb(proc.pid) for proc in clients)
    sockets: List[socket.socket] = []
    failed = 0
    try:
        for _, entry in pairs:
            opened, lost = open_echoing(entry, scale.tunnel_echoes, scale.tunnel_echoes,
                                        time.monotonic() + scale.budget)
            sockets += opened
            failed += lost
        failed += len(sockets) - echo_again(sockets, time.monotonic() + scale.budget)
    finally:
        for sock in sockets:
            sock.close()
    total = count * scale.tunnel_echoes
    if failed and bench.strict(mode):
        raise BenchError("%d of %d connections spread over the tunnels did not echo" % (failed, total))
    return {
        "server_mb": server_kb / 1024.0,
        "client_mb": client_kb / 1024.0,
        "startup_s": startup,
        "pool": float(pool),
        "echoing": float(total - failed),
        "connections": float(total),
    }


def stop_tunnel_side(bench: "Bench", procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM all of them first (each drains for a moment), then wait for each."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in running:  # a second SIGTERM after its handlers are gone would kill it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.01, deadline - time.monotonic()))
    for proc in procs:
        status = bench.procs.stop(proc)
        if proc in running and status not in (0, None):
            bench.note("tunnels: pid %d exited with status %s on SIGTERM (expected 0); log tail:\n%s"
                       % (proc.pid, status, bench.procs.log_tail(proc, 5)))


def run_tunnels(bench: "Bench", workload: Workload) -> None:
    """Issue 12: N tunnels in one process vs N processes, for every N of --tunnels."""
    mode = tunnel_mode(bench)
    if mode is None:
        bench.skipped["tunnels"] = "skipped: no tunnel mode (tls0, tls1) in --modes"
        return
    if writes_proxy_header(bench.options.server_query):
        bench.skipped["tunnels"] = "skipped: the echo target cannot read the PROXY header of proxy="
        return
    try:
        target = bench.target(workload.target)
    except (BenchError, OSError) as exc:
        bench.fail(workload, [mode], "workload %d (tunnels): target did not start: %s"
                   % (workload.number, exc))
        return
    for run in range(bench.scale.runs):
        for count in bench.options.tunnels:
            for layout in TUNNEL_LAYOUTS:
                if layout == "one process" and "tunnels-one" in bench.skipped:
                    continue
                what = "workload 8 (tunnels), N=%d, %s, run %d/%d" % (
                    count, layout, run + 1, bench.scale.runs)
                try:
                    with contextlib.ExitStack() as stack:
                        figures = measure_tunnels(bench, target, mode, count, layout, stack)
                except MultiUrlUnsupported as exc:
                    bench.skipped["tunnels-one"] = (
                        "skipped: multi-URL not supported by this build (%s)" % exc)
                    say("%s: %s" % (what, bench.skipped["tunnels-one"]))
                    continue
                except (BenchError, OSError, ValueError) as exc:
                    bench.fail(workload, [mode], "%s: %s" % (what, exc))
                    continue
                for key, value in figures.items():
                    bench.section_values[("tunnels", count, layout, key)].append(value)
                say("%s: %s" % (what, ", ".join("%s=%.4g" % item for item in figures.items())))
