"""The report's description of the machine and of the set-up the figures come from."""

import contextlib
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from .base import PING_WARMUP, PYTHONS_TOLERANCE, REPO_ROOT, UDP_PAYLOAD_SIZE
from .peers import nodepass_env
from .runner import Bench
from .targets import RR_REPLY_BYTES, RR_REQUEST_BYTES, STATIC_PAGE


def command_output(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    try:
        done = subprocess.run(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return "not available"
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[0].strip() if lines else "not available"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return "unknown CPU"


def memory_size() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as info:
            return "%.1f GiB" % (int(info.readline().split()[1]) / 1048576.0)
    return "?"


def machine_summary(bench: Bench) -> str:
    """The machine in one line, for the top of the report (## Machine has the rest)."""
    commit = command_output(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"])
    pythons = sorted({i.version for i in bench.interpreters.values()}) or [platform.python_version()]
    return ("Machine: %s, %d logical cores, %s; %s %s; commit %s; tunnel on Python %s; "
            "load average %.2f at the start, %.2f at the end (1 min)."
            % (cpu_name(), os.cpu_count() or 0, memory_size(), platform.system(),
               platform.release(), commit, ", ".join(pythons), bench.load_at_start[0],
               os.getloadavg()[0]))


def machine_lines(bench: Bench) -> List[str]:
    cpu, memory = cpu_name(), memory_size()
    env = nodepass_env({})
    commit = command_output(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"])
    # Only the package measured counts: a changed test or README does not change a figure.
    dirty = command_output(
        ["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no", "nodepass_gevent"]
    )
    commit += (
        " (nodepass_gevent/ has uncommitted changes)" if dirty not in ("", "not available") else ""
    )
    tunnel_python = sorted(set(bench.interpreters.values()), key=lambda i: i.version_tuple)
    first = tunnel_python[0].path if tunnel_python else sys.executable
    pythons = ["- tunnel %s" % interpreter.describe() for interpreter in tunnel_python]
    return [
        "- CPU: %s, %d logical cores; memory %s" % (cpu, os.cpu_count() or 0, memory),
        "- OS: %s %s (%s)" % (platform.system(), platform.release(), platform.machine()),
        "- %s, commit %s; the bench itself on Python %s"
        % (
            command_output([first, "-m", "nodepass_gevent", "--version"], env),
            commit,
            platform.python_version(),
        ),
    ] + pythons + [
        "- %s; %s; %s; %s"
        % (
            command_output(["iperf3", "--version"]),
            socat_version(),
            command_output(["nginx", "-v"]).replace("nginx version: ", ""),
            re.sub(
                r"This is (ApacheBench), Version (\S+).*", r"\1 \2", command_output(["ab", "-V"])
            ),
        ),
        "- open files (soft/hard): %d/%d" % resource.getrlimit(resource.RLIMIT_NOFILE),
        "- load average (1, 5, 15 min) at the start: %.2f, %.2f, %.2f; at the end: %.2f, %.2f, %.2f"
        % (bench.load_at_start + os.getloadavg()),
    ]


def socat_version() -> str:
    try:
        done = subprocess.run(
            ["socat", "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "socat not available"
    found = re.search(r"socat version (\S+)", done.stdout.decode("utf-8", "replace"))
    return "socat " + (found.group(1) if found else "?")


SETUP_TEXT = """\
Everything ran on 127.0.0.1 with ports from the OS; each workload was run {runs} time(s),
the modes interleaved within a run; the tables show medians.

- **direct**: the bench talks to the target itself.
- **socat**: `socat TCP4-LISTEN:<port>,bind=127.0.0.1,fork,reuseaddr,backlog=4096
  TCP4:127.0.0.1:<target>`; for UDP `socat -T 10
  UDP4-LISTEN:<port>,bind=127.0.0.1,fork,reuseaddr UDP4:127.0.0.1:<target>`.
- **nodepass tls=0/1**: `{python} -m nodepass_gevent
  'server://127.0.0.1:<tunnel>/127.0.0.1:<port>?log={log}&tls=<0|1>{query}'` and `{python} -m
  nodepass_gevent 'client://127.0.0.1:<tunnel>/127.0.0.1:<target>?log={log}{client_query}'`,
  environment `{env}`.

1. bulk: iperf3 client → route → `iperf3 -s`, `iperf3 -J {iperf}`, `-P 1` and `-P 8`, with
   and without `-R`; Gbit/s as received.
2. churn: `ab -n {requests} -c {concurrency}` (no keep-alive) → route → nginx (1 worker)
   serving a {page}-byte file; failed = failed + non-2xx + not completed.
3. latency: one TCP connection (TCP_NODELAY), {pings} ping-pongs of 1 byte (after {warmup}
   unmeasured) to a Python echo server.
4. idle: {idle} connections opened with at most {window} being set up at once, each
   established when a tag it sent came back; held idle 1 s, then every one must echo again.
   Memory per connection = growth of VmRSS (server + client) over the idle connections; for
   socat, growth of the PSS of socat and all its forks.
5. udp: {datagrams} datagrams of {payload} bytes to a Python UDP echo server, one sender,
   then {senders} senders with one datagram outstanding each; lost = no reply within
   {timeout:.0f} s.
6. cpu: utime + stime (from /proc, children included) of the relay processes during each
   workload-1 test, divided by the GB iperf3 received.
7. request/response: `ab -k -c {rr_connections} -t {rr_seconds:g}`: {rr_connections} persistent
   connections, each sending a {rr_request}-byte GET and waiting for nginx's {rr_reply}-byte
   reply before the next, for {rr_seconds:g} s; p50/p99 of the request times. ab and nginx
   are native (direct shows what they reach without a tunnel). tls=1's cells also show its
   ratio to tls=0 of the same run (×t0).

socat's UDP fork mode hands each new sender to a forked child, and a datagram that arrives
during the hand-over is dropped: with 16 senders starting at once it loses about one
datagram per sender.

Cells read `value (ratio to direct ×d, ratio to socat ×s)`: this column's figure divided by
direct's or socat's from the same run (for times, memory and CPU lower is better)."""

PYTHONS_TEXT = """\
Everything ran on 127.0.0.1 with ports from the OS; each workload was run {runs} time(s),
the Pythons interleaved within a run (one tunnel per Python, all started by the same bench
process); the tables show medians.

- **Python X.Y**: a nodepass-gevent server + client pair, tls=0, both on that interpreter:
  `<python> -m nodepass_gevent
  'server://127.0.0.1:<tunnel>/127.0.0.1:<port>?log={log}&tls=0{query}'` and `<python> -m
  nodepass_gevent 'client://127.0.0.1:<tunnel>/127.0.0.1:<target>?log={log}{client_query}'`, environment
  `{env}` and PYTHONPATH=<this checkout>.
"""

PYTHONS_LEGEND = """\
Cells read `value (ratio to the newest ×n)`: this Python's figure divided by the newest
Python's from the same run. Target (issue 9): every figure within {tolerance:.0f}% of the
newest Python's: throughput and requests/s at least {low:.2f}×n; latency, time, memory and CPU
at most {high:.2f}×n (better is never a miss); no failed request; every idle connection
echoing."""

PROFILE_LEGEND = """\
`self` is the share of on-CPU samples with that frame on top: time spent in a system call
counts for the Python frame that made it (`_move_burst` is splice(2)), and `Hub.run` is
gevent's event loop itself (polling, callbacks, switching greenlets). `incl` counts a frame
whenever it is on the stack."""


def setup_lines(bench: Bench) -> List[str]:
    scale = bench.scale
    modes_text, workloads_text = SETUP_TEXT.split("\n1. bulk:", 1)
    if bench.per_python:
        modes_text = PYTHONS_TEXT
        workloads_text = workloads_text.split("\n\nsocat's UDP", 1)[0]
        workloads_text += "\n\n" + PYTHONS_LEGEND
    interpreter = bench.interpreters.get("tls0") or bench.interpreters.get("tls1")
    text = (modes_text + "\n1. bulk:" + workloads_text).format(
        python=shlex.quote(interpreter.path) if interpreter else "python3",
        tolerance=PYTHONS_TOLERANCE * 100,
        low=1 - PYTHONS_TOLERANCE,
        high=1 + PYTHONS_TOLERANCE,
        runs=scale.runs,
        log=bench.options.log_level,
        query="&" + bench.options.server_query if bench.options.server_query else "",
        client_query="&" + bench.options.client_query if bench.options.client_query else "",
        rr_connections=scale.rr_connections,
        rr_seconds=scale.rr_seconds,
        rr_request=RR_REQUEST_BYTES,
        rr_reply=RR_REPLY_BYTES,
        env=" ".join("%s=%s" % item for item in sorted(bench.options.nodepass_env.items())),
        iperf=" ".join(scale.iperf_limit),
        requests=scale.churn_requests,
        concurrency=scale.churn_concurrency,
        page=len(STATIC_PAGE),
        pings=scale.pings,
        warmup=PING_WARMUP,
        idle=scale.idle_connections,
        window=scale.idle_window,
        datagrams=scale.datagrams,
        payload=UDP_PAYLOAD_SIZE,
        senders=scale.udp_senders,
        timeout=scale.udp_timeout,
    )
    return text.splitlines()
