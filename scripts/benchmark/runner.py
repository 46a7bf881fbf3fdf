"""One bench run: the routes of every mode, the workloads run --runs times with
the modes interleaved, and every figure they yield.
"""

import argparse
import collections
import contextlib
import os
import re
import statistics
import subprocess
import time
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .base import (
    BenchError,
    HOST,
    MODE_TITLES,
    ROUTE_READY_TIMEOUT,
    Scale,
    TUNNEL_MODES,
    Workload,
    say,
)
from .peers import (
    Scraper,
    Variant,
    exit_reason,
    join_query,
    nodepass_commands,
    nodepass_env,
    socat_commands,
    writes_proxy_header,
)
from .processes import Processes, free_port, is_listening, wait_until
from .pythons import Interpreter, newest_mode
from .results import ResultsDir
from .targets import EchoTarget, IperfTarget, NginxTarget, Route, Target


# --------------------------------------------------------------------------
# The bench: targets, routes, runs, results.


class Bench:
    def __init__(self, options: argparse.Namespace, scale: Scale, workdir: str) -> None:
        self.options = options
        self.scale = scale
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.results = ResultsDir(getattr(options, "results", None))
        self.targets: Dict[str, Target] = {}
        self.values = collections.defaultdict(lambda: collections.defaultdict(list))
        self.failures: List[str] = []
        self.failed_cells: Set[Tuple[int, str]] = set()
        self.notes: List[str] = []
        self.profiles: List[str] = []
        # mode -> the interpreter its tunnel runs on: tls0/tls1 on --python, or one
        # tls=0 mode per --pythons interpreter (then the modes are exactly those).
        self.interpreters: Dict[str, Interpreter] = dict(options.interpreters)
        self.per_python = bool(options.pythons)
        self.modes = list(options.interpreters) if self.per_python else options.modes
        self.newest = newest_mode(self.interpreters) if self.per_python else None
        # mode -> Variant for the modes prepare_variants() adds after their base mode.
        self.variants: Dict[str, Variant] = collections.OrderedDict()
        # mode -> [scrapes answered, failed, last error] of a --scrape-metrics variant.
        self.scrapes: Dict[str, List] = {}
        # Figures of the workloads with their own section (tunnels, rate): key -> runs.
        self.section_values: Dict[tuple, List[float]] = collections.defaultdict(list)
        self.skipped: Dict[str, str] = {}  # workload name -> why it (or part of it) did not run
        # Other work on the machine skews every figure: the report shows how busy it was.
        self.load_at_start = os.getloadavg()

    def prepare_variants(self) -> None:
        """Add a variant of every tunnel mode for --compare-query/--compare-client-query and
        for --scrape-metrics (once nodepass is seen to serve /metrics), each right after its base."""
        options = self.options
        wanted = []
        if options.compare_query or options.compare_client_query:
            wanted.append(("q", options.compare_query, options.compare_client_query, False))
        if options.scrape_metrics:
            python = next(iter(self.interpreters.values())).path if self.interpreters else None
            reason = self.metrics_refusal(python) if python else "no tunnel mode in --modes"
            if reason is None:
                wanted.append(("m", "", "", True))
            else:
                self.skipped["scrape-metrics"] = "skipped: --metrics not supported by this build (%s)" % reason
                self.note("--scrape-metrics " + self.skipped["scrape-metrics"])
        modes = []
        for mode in self.modes:
            modes.append(mode)
            if mode not in TUNNEL_MODES:
                continue
            for suffix, server_query, client_query, metrics in wanted:
                variant = Variant(mode + "+" + suffix, mode, server_query, client_query, metrics)
                self.variants[variant.mode] = variant
                self.interpreters[variant.mode] = self.interpreters[mode]
                modes.append(variant.mode)
                if metrics:
                    self.scrapes[variant.mode] = [0, 0, ""]
        self.modes = modes

    def metrics_refusal(self, python: str) -> Optional[str]:
        """None if a nodepass server started with --metrics answers GET /metrics; else why not."""
        port = free_port()
        url = "server://%s:%d/%s:%d?log=warn" % (HOST, free_port(), HOST, free_port())
        argv = [python, "-m", "nodepass_gevent", "--metrics", "%s:%d" % (HOST, port), url]
        proc = self.procs.start("probe-metrics", argv, nodepass_env(self.options.nodepass_env))
        scraper = Scraper(["http://%s:%d/metrics" % (HOST, port)])
        try:
            deadline = time.monotonic() + ROUTE_READY_TIMEOUT
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return exit_reason(proc, self.procs.log_tail(proc, 40))
                scraper.scrape_once()
                if scraper.answered:
                    return None
                time.sleep(0.2)
            return "no answer on /metrics after %.0f s (%s)" % (ROUTE_READY_TIMEOUT, scraper.last_error)
        finally:
            self.procs.stop(proc)

    def server_query(self, mode: str, extra: str = "") -> str:
        """The query options mode's server URL gets beyond log= and tls=."""
        variant = self.variants.get(mode)
        return join_query(self.options.server_query, variant.server_query if variant else "", extra)

    def modes_for(self, workload: Workload) -> List[str]:
        """The modes that can run workload: a PROXY header only goes to a target that reads it."""
        if workload.target == "nginx":
            return list(self.modes)
        modes = []
        for mode in self.modes:
            if self.is_tunnel(mode) and writes_proxy_header(self.server_query(mode)):
                key = "proxy-%d" % workload.number
                if key not in self.skipped:
                    self.skipped[key] = "skipped"
                    self.note(
                        "workload %d (%s) skipped for %s: its %s target cannot read a PROXY "
                        "header (proxy= runs on churn and rr, whose nginx has a proxy_protocol "
                        "listener)" % (workload.number, workload.name, self.title(mode), workload.target)
                    )
                continue
            modes.append(mode)
        return modes

    def base_of(self, mode: str) -> Optional[str]:
        """The mode a variant adds to (None for the others)."""
        return self.variants[mode].base if mode in self.variants else None

    def is_tunnel(self, mode: str) -> bool:
        return mode in TUNNEL_MODES or mode in self.interpreters

    def title(self, mode: str) -> str:
        if mode in self.variants:
            variant = self.variants[mode]
            return variant.title(MODE_TITLES[variant.base])
        if self.per_python:
            interpreter = self.interpreters[mode]
            return "Python %s%s" % (interpreter.version, " (newest)" if mode == self.newest else "")
        return MODE_TITLES[mode]

    def strict(self, mode: str) -> bool:
        """In smoke runs a lost request or datagram is a failure (socat's UDP loses a few)."""
        return self.options.smoke and mode != "socat"

    def note(self, text: str) -> None:
        say("note: " + text)
        self.notes.append(text)

    def fail(self, workload: Workload, modes: Sequence[str], text: str) -> None:
        say("FAILED: " + text)
        self.failures.append(text)
        self.failed_cells.update((workload.number, mode) for mode in modes)
        self.results.failed(workload, modes, text)

    def target(self, name: str) -> Target:
        if name not in self.targets:
            target = {"echo": EchoTarget, "iperf3": IperfTarget, "nginx": NginxTarget}[name](self)
            self.targets[name] = target
            target.start()
        return self.targets[name]

    @contextlib.contextmanager
    def route(self, mode: str, target: Target, extra_server_query: str = "") -> Iterator[Route]:
        """Start mode's relays in front of target, wait for traffic to pass, stop them after."""
        started: List[Tuple[str, subprocess.Popen]] = []
        metrics_urls: List[str] = []
        try:
            if mode == "direct":
                route = Route(mode, target.port)
            else:
                entry = free_port(with_udp=target.udp)
                if mode == "socat":
                    commands, env = socat_commands(entry, target), None
                else:
                    variant = self.variants.get(mode)
                    base = variant.base if variant else mode
                    server_query = self.server_query(mode, extra_server_query)
                    target_port = target.port
                    if writes_proxy_header(server_query):
                        if not target.proxy_port:
                            raise BenchError(
                                "%s cannot read the PROXY header of %r" % (target.name, server_query)
                            )
                        target_port = target.proxy_port
                    metrics_ports = (0, 0)
                    if variant and variant.metrics:
                        metrics_ports = (free_port(), free_port())
                        metrics_urls = ["http://%s:%d/metrics" % (HOST, p) for p in metrics_ports]
                    commands = nodepass_commands(
                        self.interpreters[mode].path,
                        base[-1] if base in TUNNEL_MODES else "0",
                        entry,
                        target,
                        self.options.log_level,
                        server_query,
                        join_query(self.options.client_query, variant.client_query if variant else ""),
                        metrics_ports,
                        target_port,
                    )
                    env = nodepass_env(self.options.nodepass_env)
                for command in commands:
                    proc = self.procs.start(
                        "%s-%s-%s" % (mode, target.name, command.role), command.argv, env
                    )
                    started.append((command.role, proc))
                    if command.listen_port:
                        wait_until(
                            lambda: is_listening(command.listen_port),
                            ROUTE_READY_TIMEOUT,
                            "%s %s" % (mode, command.role),
                            [proc],
                            0.02,
                        )
                route = Route(mode, entry, started, metrics_urls)
                self.wait_ready(route, target)
            yield route
        finally:
            for role, proc in reversed(started):
                status = self.procs.stop(proc)
                if self.is_tunnel(mode) and status not in (0, None):
                    self.note(
                        "%s %s exited with status %s on SIGTERM (expected 0); log tail:\n%s"
                        % (mode, role, status, self.procs.log_tail(proc, 5))
                    )

    def wait_ready(self, route: Route, target: Target) -> None:
        procs = [proc for _, proc in route.roles]
        what = "%s route to %s" % (route.mode, target.name)
        try:
            wait_until(lambda: target.probe(route.port), ROUTE_READY_TIMEOUT, what, procs, 0.2)
            if target.udp:
                wait_until(
                    lambda: target.probe_udp(route.port),
                    ROUTE_READY_TIMEOUT,
                    what + " (UDP)",
                    procs,
                    0.2,
                )
        except BenchError as exc:
            tails = "".join(
                "\n--- %s log tail:\n%s" % (role, self.procs.log_tail(proc))
                for role, proc in route.roles
            )
            raise BenchError(str(exc) + tails)

    def run_workload(self, workload: Workload) -> None:
        if workload.runner is not None:
            workload.runner(self, workload)
            return
        try:
            target = self.target(workload.target)
        except (BenchError, OSError) as exc:
            self.fail(
                workload,
                self.modes,
                "workload %d (%s): target %s did not start: %s"
                % (workload.number, workload.name, workload.target, exc),
            )
            return
        modes = self.modes_for(workload)
        if workload.fresh_route:
            for run in range(self.scale.runs):
                for mode in modes:
                    try:
                        with self.route(mode, target) as route:
                            self.measure(workload, route, run)
                    except BenchError as exc:
                        self.fail(
                            workload,
                            [mode],
                            "workload %d (%s), %s, run %d: %s"
                            % (workload.number, workload.name, mode, run + 1, exc),
                        )
            return
        with contextlib.ExitStack() as stack:
            routes = {}
            for mode in modes:
                try:
                    routes[mode] = stack.enter_context(self.route(mode, target))
                except BenchError as exc:
                    self.fail(
                        workload,
                        [mode],
                        "workload %d (%s), %s: %s" % (workload.number, workload.name, mode, exc),
                    )
            for run in range(self.scale.runs):
                for mode in modes:
                    if mode in routes:
                        self.measure(workload, routes[mode], run)

    def measure(self, workload: Workload, route: Route, run: int) -> None:
        label = "workload %d (%s), %s, run %d/%d" % (
            workload.number,
            workload.name,
            route.mode,
            run + 1,
            self.scale.runs,
        )
        scraper = Scraper(route.metrics_urls)
        try:
            with scraper:
                figures = workload.measure(self, route)
        except (BenchError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            text = "%s: %s: %s" % (label, type(exc).__name__, exc)
            self.fail(workload, [route.mode], text + self.relay_warnings(route))
            return
        finally:
            if route.mode in self.scrapes:
                tally = self.scrapes[route.mode]
                tally[0] += scraper.answered
                tally[1] += scraper.failed
                tally[2] = scraper.last_error or tally[2]
        for key, value in figures.items():
            if value is not None:
                self.values[key][route.mode].append(value)
        self.results.measured(workload, route.mode, self.title(route.mode), run, figures)
        say(
            "%s: %s"
            % (label, ", ".join("%s=%.4g" % (k, v) for k, v in figures.items() if v is not None))
        )

    def relay_warnings(self, route: Route, count: int = 5) -> str:
        """The last warnings and errors the relays logged: what they saw of a failure."""
        found = ""
        for role, proc in route.roles:
            lines = [
                line
                for line in self.procs.log_tail(proc, 400).splitlines()
                if re.search(r"\b(WARN|ERROR|FATAL)\b|Traceback|Error", line)
            ]
            if lines:
                found += "\n--- %s %s:\n%s" % (route.mode, role, "\n".join(lines[-count:]))
        return found

    def medians(self) -> Dict[str, Dict[str, Optional[float]]]:
        return {
            key: {
                mode: (statistics.median(runs) if runs else None) for mode, runs in per_mode.items()
            }
            for key, per_mode in self.values.items()
        }
