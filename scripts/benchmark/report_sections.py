"""The report's sections of workloads with their own layout: where the CPU goes,
N tunnels in one process vs N processes, rate=.
"""

import os
import statistics
from typing import Dict, List, Optional, Sequence

from .base import MODE_TITLES, TUNNEL_MODES
from .report_tables import format_value
from .runner import Bench
from .workloads.bulk import BULK_CASES, bulk_suffix
from .workloads.rate import RATE_DIRECTIONS
from .workloads.tunnels import TUNNEL_LAYOUTS, min_pool_capacity, tunnel_mode


# (figure key, workload, what, unit, the figure it bounds: a rate, or ping's p50 latency)
CPU_ROWS = [
    ("bulk_" + bulk_suffix(streams, reverse), 1,
     "bulk, %d stream%s%s" % (streams, "s" if streams > 1 else "", ", reverse" if reverse else ""),
     "s/GB", "bulk_" + bulk_suffix(streams, reverse))
    for streams, reverse in BULK_CASES
] + [
    ("churn", 2, "churn", "µs/request", "churn_rps"),
    ("ping", 3, "1-byte ping-pong", "µs/round trip", "ping_p50"),
    ("udp_seq", 5, "UDP sequential", "µs/reply", "udp_seq_rps"),
    ("udp_conc", 5, "UDP 16 senders", "µs/reply", "udp_conc_rps"),
    ("rr", 7, "request/response", "µs/request", "rr_rps"),
]
CPU_BOUND = 0.9  # a machine this busy is limited by CPU: the ceiling below applies


def cpu_lines(bench: Bench, numbers: Sequence[int]) -> List[str]:
    """Where each operation's CPU goes, and what the relays' own code still costs.

    "ceiling" is what the mode would reach if the relays' user time (Python, OpenSSL,
    the event loop) were free and everything else stayed, as a ratio to direct. Where
    operations overlap and the machine was CPU-bound: measured rate x all CPU per
    operation / (all CPU per operation - the relays' user time). Where one operation
    waits for the last (ping-pong, UDP sequential), that user time is on the critical
    path and comes off each operation's time instead: ping's p50, UDP's 1 / rate.
    """
    medians = bench.medians()
    lines = [
        "Medians of the runs: CPU per operation of both relay processes (user, system), of",
        "everything else the workload runs (load generator and target), and how busy the %d"
        % (os.cpu_count() or 1),
        "cores were while it ran (/proc/stat: every process and the kernel's own work).",
        "Ceiling: the rate (ping: the p50) if the relays' user time were free (the kernel's",
        "share and everyone else's as measured), as a ratio to direct;",
        "for the loads that overlap operations, only where the machine was at least %.0f%% busy,"
        % (CPU_BOUND * 100),
        "and for ping-pong and UDP sequential, that time taken off each round trip.",
        "",
        "| workload | unit | mode | relays' user | relays' system | system share | load and target | machine busy | ceiling ×d |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def figure(name: str, key: str, mode: str) -> Optional[float]:
        return medians.get(name + key, {}).get(mode)

    for key, number, what, unit, rate_key in CPU_ROWS:
        if number not in numbers and not (number == 1 and 6 in numbers):
            continue
        digits = 3 if unit == "s/GB" else 1
        for mode in bench.modes:
            rest, busy = figure("op_rest_", key, mode), figure("op_busy_", key, mode)
            if rest is None:
                continue
            user, system = figure("op_user_", key, mode), figure("op_sys_", key, mode)
            share = ceiling = "—"
            if user is not None and system is not None and user + system > 0:
                share = "%.0f%%" % (100.0 * system / (user + system))
                ceiling = ceiling_text(key, medians.get(rate_key, {}), mode, rest, user,
                                       system, busy)
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                what, unit, bench.title(mode), format_value(user, digits),
                format_value(system, digits), share, format_value(rest, digits),
                "—" if busy is None else "%.0f%%" % (100.0 * busy), ceiling))
    return lines


def ceiling_text(key: str, figures: Dict[str, Optional[float]], mode: str, rest: float,
                 user: float, system: float, busy: Optional[float]) -> str:
    """cpu_lines' ceiling: the rate (for ping, the p50) without the relays' user time."""
    measured, direct = figures.get(mode), figures.get("direct")
    if not measured or not direct:
        return "—"
    if key == "ping":  # µs per round trip, lower is better
        return "%.2f (p50)" % (max(measured - user, 0.0) / direct)
    if key == "udp_seq":  # one datagram at a time: 1 / rate is its round trip
        spare = 1e6 / measured - user
        return "%.2f" % ((1e6 / spare) / direct) if spare > 0 else "—"
    total = rest + user + system
    if busy is None or busy < CPU_BOUND or total <= user:
        return "—"
    return "%.2f" % (measured * total / (total - user) / direct)


def section_median(bench: Bench, key: tuple) -> Optional[float]:
    runs = bench.section_values.get(key)
    return statistics.median(runs) if runs else None


def tunnels_lines(bench: Bench) -> List[str]:
    """Issue 12's "N tunnels in one process vs N processes", with its targets."""
    mode = tunnel_mode(bench)
    lines = [
        "Each tunnel: a %s server + client pair to the echo target, all of them started at"
        % MODE_TITLES.get(mode or "tls0", mode),
        "once (N processes per side, or one process per side given every URL). RSS is the",
        "VmRSS sum of each side's processes, read 1 s after every tunnel echoed and every pool held",
        "its MIN_POOL_CAPACITY (%d) connections; then %d connections per tunnel are opened through"
        % (min_pool_capacity(bench), bench.scale.tunnel_echoes),
        "all of them and must echo twice. Per extra tunnel: (side's RSS at N − at N=1) / (N − 1).",
        "",
    ]
    if "tunnels" in bench.skipped:
        return lines + [bench.skipped["tunnels"]]
    lines += [
        "| N | layout | server RSS MB | client RSS MB | both MB | MB per extra tunnel, server / client | start-up s | control + pool connections | echoing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def figure(count: int, layout: str, key: str) -> Optional[float]:
        return section_median(bench, ("tunnels", count, layout, key))

    one = {side: figure(1, "one process", side) for side in ("server_mb", "client_mb")}
    for count in bench.options.tunnels:
        for layout in TUNNEL_LAYOUTS:
            if layout == "one process" and "tunnels-one" in bench.skipped and count > 1:
                lines.append("| %d | %s | %s |||||||" % (count, layout, bench.skipped["tunnels-one"]))
                continue
            server, client = figure(count, layout, "server_mb"), figure(count, layout, "client_mb")
            if server is None or client is None:
                lines.append("| %d | %s | FAILED |||||||" % (count, layout))
                continue
            extra = "—"
            if count > 1 and one["server_mb"] is not None and one["client_mb"] is not None:
                extra = "%.2f / %.2f" % ((server - one["server_mb"]) / (count - 1),
                                         (client - one["client_mb"]) / (count - 1))
            lines.append("| %d | %s | %.1f | %.1f | %.1f | %s | %.2f | %.0f | %.0f of %.0f |" % (
                count, layout, server, client, server + client, extra,
                figure(count, layout, "startup_s"), figure(count, layout, "pool"),
                figure(count, layout, "echoing"), figure(count, layout, "connections")))
    largest = max(bench.options.tunnels)
    both_one = (one["server_mb"] or 0) + (one["client_mb"] or 0)
    server_n = figure(largest, "one process", "server_mb")
    client_n = figure(largest, "one process", "client_mb")
    if largest > 1 and both_one and server_n is not None and client_n is not None:
        ratio = (server_n + client_n) / both_one
        per_side = max(server_n - one["server_mb"], client_n - one["client_mb"]) / (largest - 1)
        startup = figure(largest, "one process", "startup_s")
        lines += [
            "",
            "Targets of issue 12 (one process per side, N=%d):" % largest,
            "",
            "- both sides' RSS ≤ 2 × that of one tunnel: %.2f × (%s)" % (ratio, "met" if ratio <= 2 else "**MISSED**"),
            "- under 2 MB per extra tunnel per side: %.2f MB at most (%s)" % (per_side, "met" if per_side < 2 else "**MISSED**"),
            "- start-up of all %d under 5 s: %.2f s (%s)" % (largest, startup, "met" if startup < 5 else "**MISSED**"),
        ]
    return lines


def rate_lines(bench: Bench) -> List[str]:
    """Issue 13's "rate= holds its limit within 5% on bulk"."""
    limit = bench.options.rate_mbit
    lines = [
        "The server URL gets `rate=%g` (Mbit/s); iperf3 `-P 1 %s` through the tunnel, forward and"
        % (limit, " ".join(bench.scale.rate_limit)),
        "reverse; achieved = Mbit/s iperf3 received. Target: within 5% of the limit.",
        "",
    ]
    if "rate" in bench.skipped:
        return lines + [bench.skipped["rate"]]
    lines += ["| mode | direction | limit Mbit/s | achieved Mbit/s | ÷ limit | runs | verdict |",
              "|---|---|---|---|---|---|---|"]
    for mode in bench.modes:
        if mode not in TUNNEL_MODES:
            continue
        for reverse, direction in RATE_DIRECTIONS:
            runs = bench.section_values.get(("rate", mode, reverse), [])
            if not runs:
                lines.append("| %s | %s | %g | FAILED |||| " % (bench.title(mode), direction, limit))
                continue
            achieved = statistics.median(runs)
            ratio = achieved / limit
            lines.append("| %s | %s | %g | %.1f | %.3f | %s | %s |" % (
                bench.title(mode), direction, limit, achieved, ratio,
                ", ".join("%.1f" % run for run in runs),
                "met" if abs(ratio - 1) <= 0.05 else "**MISSED** (%+.1f%%)" % ((ratio - 1) * 100)))
    return lines
