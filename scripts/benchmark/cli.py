"""Measure nodepass-gevent beside a direct connection and socat, on loopback.

Everything runs on 127.0.0.1 with ports from the OS, in one run and side by
side, so that every figure can be read as a ratio to the physical limit here
(`direct`, no tunnel) and to a one-hop C relay (`socat`, one process per
connection) measured a minute apart on the same machine:

  direct  the bench talks to the target itself
  socat   socat TCP-LISTEN:<port>,fork,reuseaddr,backlog=4096 TCP:127.0.0.1:<target>
          (and UDP4-LISTEN:<port>,fork,reuseaddr UDP4:127.0.0.1:<target> for UDP)
  tls0    a nodepass-gevent server + client pair, tls=0
  tls1    the same pair with tls=1 (TLS on the data connections)

Workloads (each run --runs times, interleaving the modes; medians reported):

  1 bulk     iperf3 as the target: 1 and 8 streams, both directions (-R), Gbit/s
  2 churn    nginx serving a small file, ab without keep-alive:
             requests/s, p50 and p99 ms, failed requests
  3 latency  one connection, 1-byte ping-pongs to an echo target: p50/p99 us
  4 idle     many concurrent idle connections, each verified to echo (twice):
             time to establish, tunnel memory per connection
  5 udp      request/reply datagrams to a UDP echo target, one sender and 16
             concurrent senders: replies/s, p50/p99 ms, datagrams lost
  6 cpu      tunnel CPU seconds (server + client) per GB moved in workload 1
  7 rr       request/response: 50 persistent connections (ab -k) to nginx's tiny
             reply for a fixed time: requests/s, p50/p99 ms; tls=1 also as a
             ratio of tls=0 (issue 11)

Run only when named in --only (they start many processes or need a parameter):

  8 tunnels  N tunnels in one process vs N processes, for N of --tunnels
             (1,10,50): RSS of each side with every pool full, start-up time,
             connections spread over all tunnels echoing; the one-process
             layout (`nodepass URL1 URL2 ...`) is reported as skipped by a
             build that refuses several URLs (issue 12)
  9 rate     bulk (1 stream, both directions) through a server with
             rate=--rate-mbit: achieved Mbit/s against the limit, within 5%;
             skipped by a build whose --check refuses rate= (issue 13)

Variants, measured beside their tunnel mode in the same run (a column each, the
ratio to the mode without them, and a table of those ratios against the
run-to-run noise): --compare-query and --compare-client-query add URL query
options (e.g. 'proxy=1&allow=127.0.0.1' on churn; a proxy= variant runs only on
the nginx workloads, whose nginx has a proxy_protocol listener);
--scrape-metrics passes --metrics 127.0.0.1:PORT to both processes and GETs
/metrics every second while the mode is measured (skipped with a note by a
build without --metrics). --server-query and --client-query add options to
every tunnel; a query nodepass --check refuses is exit status 2.

The bench writes a markdown report (a table of medians with ratios, the issue's
targets with pass/miss, the exact command, the machine) and exits non-zero when a
workload fails outright (a tool failed, a route never came up, data was lost).
--smoke runs every workload path with tiny counts in seconds (used by CI) and
prints the report instead of writing BENCHMARKS.md, unless --output is given.
The report goes between two marker comments of its file (appended when the file
has none): the hand-written text around them is never rewritten. --results DIR
also writes every figure as JSON lines (DIR/<workload>.jsonl, with run.json and
report.md) and, when matplotlib is importable (the `bench` extra:
pip install '.[bench]'), PNG charts of them, which the report shows; a run that
writes the default BENCHMARKS.md does so into docs/bench/. A run replaces the
files an earlier one left there.
--profile records the tunnel processes with py-spy during an extra, unmeasured
run of each workload that missed a target (or of every workload) and adds the
top frames to the report.

--python PY runs the tunnel's server and client on interpreter PY (the bench
itself stays on this python3). --pythons PY1,PY2,... compares interpreters
instead of relays: one tls=0 tunnel per interpreter, interleaved in the same
run, on bulk (and its CPU), churn, ping-pong and idle connections by default;
the report is a per-Python table with each figure's ratio to the newest
Python's and pass/miss against "within 10% of the newest" (issue 9). Either
way PY must import nodepass_gevent and its dependencies with PYTHONPATH set to
this checkout (a venv with gevent, cryptography and docopt-ng installed is
enough; the checkout's code is what runs, whatever the venv holds).

Needs: python3 (stdlib only), iperf3, socat, nginx, ab (apache2-utils); py-spy
for --profile. nodepass-gevent runs from this checkout (PYTHONPATH), so it need
not be installed.
"""

import argparse
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .base import (
    FULL,
    HOST,
    MODES,
    NODEPASS_ENV,
    PYTHONS_WORKLOADS,
    REPO_ROOT,
    SMOKE,
    TUNNEL_MODES,
    say,
)
from .charts import CHARTS, draw_charts
from .peers import join_query, nodepass_refusal
from .profile import profile_workloads
from .pythons import Interpreter, InterpreterError, probe_interpreter, python_modes
from .report import render_report
from .report_tables import verdicts_of
from .results import write_report
from .runner import Bench
from .workloads import DEFAULT_WORKLOADS, WORKLOADS


# --------------------------------------------------------------------------
# Command line.

WORKLOAD_NAMES = {w.name: w.number for w in WORKLOADS.values()}
# What a run writes into its results directory, and the next run into it replaces.
RESULT_FILES = ([name + ".jsonl" for name in WORKLOAD_NAMES] + ["run.json", "report.md"]
                + [name for name, _, _ in CHARTS])
DEFAULT_RESULTS = os.path.join(REPO_ROOT, "docs", "bench")


def parse_workloads(text: str) -> List[int]:
    numbers = set()
    for word in text.split(","):
        word = word.strip().lower()
        if word.isdigit() and int(word) in WORKLOADS:
            numbers.add(int(word))
        elif word in WORKLOAD_NAMES:
            numbers.add(WORKLOAD_NAMES[word])
        else:
            raise argparse.ArgumentTypeError(
                "unknown workload %r (1-%d or %s)" % (word, len(WORKLOADS), ", ".join(WORKLOAD_NAMES))
            )
    return sorted(numbers)


def parse_modes(text: str) -> List[str]:
    modes = [word.strip() for word in text.split(",") if word.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError("modes are %s" % ", ".join(MODES))
    return [m for m in MODES if m in modes]


def parse_pythons(text: str) -> List[str]:
    paths = [word.strip() for word in text.split(",") if word.strip()]
    if len(paths) < 2:
        raise argparse.ArgumentTypeError("give at least two interpreters, comma-separated")
    return paths


def parse_counts(text: str) -> List[int]:
    try:
        counts = sorted({int(word) for word in text.split(",") if word.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("expected tunnel counts like 1,10,50, got %r" % text)
    return counts


def parse_query(text: str) -> str:
    query = text.strip().lstrip("?&")
    if query and any(not part.partition("=")[0] or not part.partition("=")[1] for part in query.split("&")):
        raise argparse.ArgumentTypeError("expected K=V[&K=V...], got %r" % text)
    return query


def parse_env(text: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE, got %r" % text)
    return name, value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__.split("\n\n")[0],
        epilog="Workloads: 1 bulk, 2 churn, 3 latency, 4 idle, 5 udp, 6 cpu (figures of 1), "
        "7 rr (request/response); only when named in --only: 8 tunnels (N tunnels in one "
        "process vs N processes), 9 rate (bulk through rate=).",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny counts, seconds not minutes; prints the report unless --output is given",
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="where to write the report, between its marker comments: the rest of FILE is "
        "left as it is (default: BENCHMARKS.md at the repository root; with --smoke: stdout only)",
    )
    parser.add_argument(
        "--results",
        metavar="DIR",
        help="also write every figure as JSON lines, one file per workload, into DIR "
        "(with run.json, report.md and, when matplotlib is importable, PNG charts the report "
        "shows); default: docs/bench when the report goes to the default BENCHMARKS.md",
    )
    parser.add_argument(
        "--only",
        metavar="WORKLOADS",
        type=parse_workloads,
        help="comma-separated workloads, by number or name (default: 1-7; with --pythons "
        "bulk,churn,latency,idle,cpu)",
    )
    parser.add_argument(
        "--runs", metavar="N", type=int, help="runs per workload (default 3, smoke 1)"
    )
    parser.add_argument(
        "--modes",
        type=parse_modes,
        help="comma-separated subset of %s (default: all)" % ",".join(MODES),
    )
    pythons = parser.add_mutually_exclusive_group()
    pythons.add_argument(
        "--python",
        metavar="PY",
        help="the interpreter that runs the tunnel's server and client (default: this "
        "python3); it must import nodepass_gevent and its dependencies",
    )
    pythons.add_argument(
        "--pythons",
        metavar="PY1,PY2,...",
        type=parse_pythons,
        help="compare interpreters: one tls=0 tunnel each, interleaved, workloads "
        "bulk,churn,latency,idle (and cpu) unless --only says otherwise; a per-Python table "
        "with ratios to the newest and the 10%% targets of issue 9",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warn", "error", "fatal"),
        help="log level of the nodepass processes (default: info, their own default)",
    )
    parser.add_argument(
        "--nodepass-env",
        metavar="NAME=VALUE",
        type=parse_env,
        action="append",
        default=[],
        help="extra environment for the nodepass processes (repeatable)",
    )
    parser.add_argument(
        "--server-query",
        metavar="K=V[&K=V]",
        type=parse_query,
        default="",
        help="more query options for the nodepass server URL, e.g. an extension to measure",
    )
    parser.add_argument(
        "--client-query",
        metavar="K=V[&K=V]",
        type=parse_query,
        default="",
        help="more query options for the nodepass client URL",
    )
    parser.add_argument(
        "--compare-query",
        metavar="K=V[&K=V]",
        type=parse_query,
        default="",
        help="measure every tunnel mode also with these server query options added, side by "
        "side in the same run (a column per variant, its ratio to the mode without them, "
        "and a table of those ratios against the run-to-run noise)",
    )
    parser.add_argument(
        "--compare-client-query",
        metavar="K=V[&K=V]",
        type=parse_query,
        default="",
        help="the same for client query options (one variant with both if both are given)",
    )
    parser.add_argument(
        "--scrape-metrics",
        action="store_true",
        help="measure every tunnel mode also with --metrics 127.0.0.1:PORT on both processes "
        "and /metrics scraped every second while it is measured, side by side (skipped "
        "with a note when nodepass has no --metrics)",
    )
    parser.add_argument(
        "--tunnels",
        metavar="N1,N2,...",
        type=parse_counts,
        help="tunnel counts of workload 8 (default 1,10,50; smoke 1,3)",
    )
    parser.add_argument(
        "--rate-mbit",
        metavar="N",
        type=float,
        default=100.0,
        help="the rate= limit workload 9 puts on the server URL, Mbit/s (default 100)",
    )
    parser.add_argument(
        "--profile",
        choices=("none", "missed", "all"),
        default="none",
        help="py-spy the tunnel during an extra run of workloads that missed a target, or all",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temporary directory (logs, profiles)"
    )
    options = parser.parse_args(argv)
    if options.runs is not None and options.runs < 1:
        parser.error("--runs must be at least 1")
    if options.pythons and options.modes:
        parser.error("--pythons compares tls=0 tunnels only; --modes does not apply")
    if options.pythons and (
        options.compare_query or options.compare_client_query or options.scrape_metrics
    ):
        parser.error("--pythons does not take variants (--compare-query, --scrape-metrics)")
    if options.rate_mbit <= 0:
        parser.error("--rate-mbit must be positive")
    if options.modes is None:
        options.modes = [] if options.pythons else list(MODES)
    if options.only is None:
        options.only = list(PYTHONS_WORKLOADS if options.pythons else DEFAULT_WORKLOADS)
    if options.results is None and not (options.smoke or options.output):
        options.results = DEFAULT_RESULTS  # beside the default BENCHMARKS.md, which shows them
    options.nodepass_env = dict(list(NODEPASS_ENV.items()) + options.nodepass_env)
    return options


def tunnel_interpreters(options: argparse.Namespace) -> Dict[str, Interpreter]:
    """mode -> interpreter for every tunnel mode of the run (InterpreterError if one is unfit)."""
    if options.pythons:
        return python_modes([probe_interpreter(path) for path in options.pythons])
    tunnels = [mode for mode in options.modes if mode in TUNNEL_MODES]
    if not tunnels:
        return {}
    interpreter = probe_interpreter(options.python or sys.executable)
    return {mode: interpreter for mode in tunnels}


def query_refusal(options: argparse.Namespace) -> Optional[str]:
    """Why nodepass refuses a query option given to the bench (None: it takes them all)."""
    if not options.interpreters:
        return None
    python = next(iter(options.interpreters.values())).path
    urls = {
        "--server-query": ("server", join_query(options.server_query, options.compare_query)),
        "--client-query": ("client", join_query(options.client_query, options.compare_client_query)),
    }
    for option, (role, query) in sorted(urls.items()):
        if not query:
            continue
        refusal = nodepass_refusal(python, "%s://%s:1/%s:2?%s" % (role, HOST, HOST, query))
        if refusal is not None:
            return "nodepass refuses the %s query %r: %s" % (role, query, refusal)
    return None


def needed_tools(numbers: Sequence[int], modes: Sequence[str]) -> List[str]:
    tools = []
    if 1 in numbers or 6 in numbers:
        tools.append("iperf3")
    if 2 in numbers or 7 in numbers:
        tools += ["nginx", "ab"]
    if 9 in numbers:
        tools.append("iperf3")
    if "socat" in modes:
        tools.append("socat")
    return tools


def exact_command(argv: Optional[Sequence[str]]) -> str:
    program = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    if program.startswith(".."):
        program = sys.argv[0]
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(word) for word in [program] + args)


def raise_open_file_limit() -> None:
    """Idle connections need one descriptor each here, and the echo target inherits this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop everything


def report_path(options: argparse.Namespace) -> Optional[str]:
    """Where the report goes: --output, else BENCHMARKS.md (nowhere for --smoke: stdout)."""
    if options.output:
        return options.output
    return None if options.smoke else os.path.join(REPO_ROOT, "BENCHMARKS.md")


def write_results(bench: Bench, options: argparse.Namespace, command: str,
                  seconds: float) -> Tuple[Optional[str], List[str]]:
    """The run's description and section figures into the results directory, and its
    charts: (the report's path, the charts' paths relative to the report's directory)."""
    output = report_path(options)
    bench.results.sections(bench.section_values)
    bench.results.run_description(command, seconds,
                                  {mode: bench.title(mode) for mode in bench.modes},
                                  options.smoke)
    if not options.results:
        return output, []
    drawn, message = draw_charts(options.results)
    say(message)
    start = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
    return output, [os.path.relpath(os.path.join(options.results, name), start) for name in drawn]


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = parse_args(argv)
    scale = SMOKE if options.smoke else FULL
    if options.runs:
        scale = scale._replace(runs=options.runs)
    if options.tunnels is None:
        options.tunnels = list(scale.tunnel_counts)
    numbers = sorted(set(options.only) | ({1} if 6 in options.only else set()))
    missing = [tool for tool in needed_tools(numbers, options.modes) if not shutil.which(tool)]
    if missing:
        sys.stderr.write("scripts/bench: missing tools: %s\n" % ", ".join(missing))
        return 2
    try:
        options.interpreters = tunnel_interpreters(options)
    except InterpreterError as exc:
        sys.stderr.write("scripts/bench: %s\n" % exc)
        return 2
    refusal = query_refusal(options)
    if refusal:
        sys.stderr.write("scripts/bench: %s\n" % refusal)
        return 2
    for mode, interpreter in options.interpreters.items():
        say("%s on tunnel %s" % (mode, interpreter.describe()))
    raise_open_file_limit()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    command = exact_command(argv)
    workdir = tempfile.mkdtemp(prefix="nodepass-bench-")
    bench = Bench(options, scale, workdir)
    for mode, interpreter in options.interpreters.items():
        if os.path.realpath(interpreter.package) != os.path.realpath(
            os.path.join(REPO_ROOT, "nodepass_gevent")
        ):
            # The current directory comes before PYTHONPATH for `python -m`.
            bench.note(
                "%s imports nodepass_gevent from %s, not from this checkout"
                % (bench.title(mode), interpreter.package)
            )
    bench.results.clear(RESULT_FILES)
    started = time.monotonic()
    try:
        bench.prepare_variants()
        for number in numbers:
            if number == 6:
                continue  # measured during workload 1
            say("workload %d (%s)" % (number, WORKLOADS[number].name))
            bench.run_workload(WORKLOADS[number])
        if options.profile != "none":
            pairs = {
                (1 if v.check.workload == 6 else v.check.workload, v.check.mode)
                for v in verdicts_of(bench, numbers)
                if options.profile == "all" or v.passed is False
            }
            if bench.per_python:  # the newest Python's profile is what the others compare to
                pairs |= {(number, bench.newest) for number, _ in pairs}
            pairs = sorted(pairs)
            profile_workloads(bench, pairs)
    finally:
        bench.procs.stop_all()
        if options.keep_temp:
            say("temporary files kept in %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    output, charts = write_results(bench, options, command, time.monotonic() - started)
    report = render_report(bench, options.only, command, time.monotonic() - started, charts)
    bench.results.report(report)
    if output:
        # Only the section between the markers is the bench's: prose around it stays.
        write_report(output, report)
        say("report written to %s" % output)
    if options.smoke or not output:
        sys.stdout.write(report)
    if bench.failures:
        say("%d failure(s); exit status 1" % len(bench.failures))
        return 1
    return 0
