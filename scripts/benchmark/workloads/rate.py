"""Workload 9: bulk through a server with rate= (issue 13)."""

import contextlib
import subprocess

from ..base import BenchError, HOST, TUNNEL_MODES, Workload, say
from ..loadgen import run_iperf3
from ..peers import join_query, nodepass_refusal, writes_proxy_header


RATE_DIRECTIONS = ((False, "forward"), (True, "reverse (-R)"))


def run_rate(bench: "Bench", workload: Workload) -> None:
    """Issue 13: bulk through a tunnel whose server has rate=N; achieved Mbit/s against N."""
    modes = [mode for mode in bench.modes if mode in TUNNEL_MODES]
    if not modes:
        bench.skipped["rate"] = "skipped: no tunnel mode (tls0, tls1) in --modes"
        return
    if writes_proxy_header(bench.options.server_query):
        bench.skipped["rate"] = "skipped: the iperf3 target cannot read the PROXY header of proxy="
        return
    query = "rate=%g" % bench.options.rate_mbit
    refusal = nodepass_refusal(
        bench.interpreters[modes[0]].path,
        "server://%s:1/%s:2?%s" % (HOST, HOST, join_query(bench.options.server_query, query)),
    )
    if refusal is not None:
        bench.skipped["rate"] = "skipped: rate= not supported by this build (%s)" % refusal
        say("workload 9 (rate): " + bench.skipped["rate"])
        return
    try:
        target = bench.target(workload.target)
    except (BenchError, OSError) as exc:
        bench.fail(workload, modes, "workload 9 (rate): target did not start: %s" % exc)
        return
    with contextlib.ExitStack() as stack:
        routes = {}
        for mode in modes:
            try:
                routes[mode] = stack.enter_context(bench.route(mode, target, query))
            except BenchError as exc:
                bench.fail(workload, [mode], "workload 9 (rate), %s: %s" % (mode, exc))
        for run in range(bench.scale.runs):
            for mode, route in routes.items():
                for reverse, direction in RATE_DIRECTIONS:
                    what = "workload 9 (rate), %s, %s, run %d/%d" % (
                        mode, direction, run + 1, bench.scale.runs)
                    try:
                        report = run_iperf3(route.port, 1, reverse, bench.scale.rate_limit,
                                            bench.scale.budget)
                    except (BenchError, OSError, ValueError, KeyError,
                            subprocess.SubprocessError) as exc:
                        bench.fail(workload, [mode], "%s: %s" % (what, exc))
                        continue
                    mbit = report["end"]["sum_received"]["bits_per_second"] / 1e6
                    bench.section_values[("rate", mode, reverse)].append(mbit)
                    say("%s: %.1f Mbit/s (limit %g)" % (what, mbit, bench.options.rate_mbit))
