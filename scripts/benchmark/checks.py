"""The metrics of the results table and the issues' targets each is judged against."""

from typing import Dict, List, NamedTuple, Optional, Sequence

from .base import HIGHER_IS_BETTER, PYTHONS_TOLERANCE, Scale, TUNNEL_MODES
from .workloads.bulk import BULK_CASES, bulk_suffix


class Metric(NamedTuple):
    key: str
    workload: int
    label: str
    unit: str
    digits: int
    ratios: bool = True  # False for counts of failures, where a ratio says nothing
    tls0_ratio: bool = False  # tls=1's cell also shows its ratio to tls=0 of the same run


METRICS = [
    Metric("bulk_1f", 1, "bulk TCP, 1 stream", "Gbit/s", 2),
    Metric("bulk_8f", 1, "bulk TCP, 8 streams", "Gbit/s", 2),
    Metric("bulk_1r", 1, "bulk TCP, 1 stream, reverse", "Gbit/s", 2),
    Metric("bulk_8r", 1, "bulk TCP, 8 streams, reverse", "Gbit/s", 2),
    Metric("churn_rps", 2, "churn, requests", "req/s", 0),
    Metric("churn_p50", 2, "churn, p50", "ms", 2),
    Metric("churn_p99", 2, "churn, p99", "ms", 2),
    Metric("churn_failed", 2, "churn, failed requests", "count", 0, False),
    Metric("ping_p50", 3, "1-byte ping-pong, p50", "µs", 0),
    Metric("ping_p99", 3, "1-byte ping-pong, p99", "µs", 0),
    Metric("idle_ok", 4, "idle connections echoing", "count", 0),
    Metric("idle_seconds", 4, "idle, time to establish all", "s", 2),
    Metric("idle_kb", 4, "idle, tunnel memory per connection", "KB", 1),
    Metric("udp_seq_rps", 5, "UDP sequential, replies", "1/s", 0),
    Metric("udp_seq_p50", 5, "UDP sequential, p50", "ms", 3),
    Metric("udp_seq_p99", 5, "UDP sequential, p99", "ms", 3),
    Metric("udp_seq_lost", 5, "UDP sequential, lost", "count", 0, False),
    Metric("udp_conc_rps", 5, "UDP 16 senders, replies", "1/s", 0),
    Metric("udp_conc_p50", 5, "UDP 16 senders, p50", "ms", 3),
    Metric("udp_conc_p99", 5, "UDP 16 senders, p99", "ms", 3),
    Metric("udp_conc_lost", 5, "UDP 16 senders, lost", "count", 0, False),
    Metric("cpu_1f", 6, "tunnel CPU, 1 stream", "s/GB", 2),
    Metric("cpu_8f", 6, "tunnel CPU, 8 streams", "s/GB", 2),
    Metric("cpu_1r", 6, "tunnel CPU, 1 stream, reverse", "s/GB", 2),
    Metric("cpu_8r", 6, "tunnel CPU, 8 streams, reverse", "s/GB", 2),
    Metric("rr_rps", 7, "request/response, requests", "req/s", 0, True, True),
    Metric("rr_p50", 7, "request/response, p50", "ms", 3, True, True),
    Metric("rr_p99", 7, "request/response, p99", "ms", 3, True, True),
    Metric("rr_failed", 7, "request/response, failed requests", "count", 0, False),
]


# --------------------------------------------------------------------------
# Targets of issue 4, checked against the medians.


class Check(NamedTuple):
    workload: int
    mode: str
    key: str
    kind: str  # "min", "max", "min_direct", "max_direct", "min_socat", "min_tls0"
    bound: float
    issue: int = 4  # whose target it is: the report has one table per issue


# Kinds of check that bound a ratio to another mode's figure of the same run.
RATIO_KINDS = ("_direct", "_socat", "_newest", "_tls0")


def issue_checks(scale: Scale) -> List[Check]:
    checks = []
    for streams, reverse in BULK_CASES:
        key = "bulk_" + bulk_suffix(streams, reverse)
        checks += [
            Check(1, "tls0", key, "min_direct", 0.5),
            Check(1, "tls0", key, "min_socat", 1.5),
            Check(1, "tls1", key, "min_direct", 0.25),
        ]
    for mode, rps, p99 in (("tls0", 1.0, 50.0), ("tls1", 0.5, 100.0)):
        checks += [
            Check(2, mode, "churn_rps", "min_socat", rps),
            Check(2, mode, "churn_p99", "max", p99),
            Check(2, mode, "churn_failed", "max", 0.0),
        ]
    for mode in TUNNEL_MODES:
        checks.append(Check(3, mode, "ping_p50", "max_direct", 2.0))
    checks += [
        Check(4, "tls0", "idle_ok", "min", float(scale.idle_connections)),
        Check(4, "tls0", "idle_seconds", "max", 15.0),
        Check(4, "tls0", "idle_kb", "max", 25.0),
    ]
    for mode in TUNNEL_MODES:
        checks += [
            Check(5, mode, "udp_seq_rps", "min", 2000.0),
            Check(5, mode, "udp_conc_rps", "min", 5000.0),
        ]
        for name in ("seq", "conc"):
            checks += [
                Check(5, mode, "udp_%s_p99" % name, "max", 20.0),
                Check(5, mode, "udp_%s_lost" % name, "max", 0.0),
            ]
    # Issue 11: request/response over 50 persistent connections.
    checks += [
        Check(7, "tls0", "rr_rps", "min_direct", 0.45, 11),
        Check(7, "tls1", "rr_rps", "min_tls0", 0.9, 11),
    ]
    checks += [Check(7, mode, "rr_failed", "max", 0.0, 11) for mode in TUNNEL_MODES]
    return checks


def pythons_checks(bench: "Bench", numbers: Sequence[int]) -> List[Check]:
    """Issue 9: every figure of an older Python within 10% of the newest Python's
    (worse by at most 10%; better is never a miss), no failed request or lost
    datagram, and every idle connection echoing, on every Python."""
    checks = []
    for metric in METRICS:
        if metric.workload not in numbers:
            continue
        for mode in bench.modes:
            if metric.key == "idle_ok":
                checks.append(Check(4, mode, "idle_ok", "min", float(bench.scale.idle_connections)))
            elif not metric.ratios:
                checks.append(Check(metric.workload, mode, metric.key, "max", 0.0))
            elif mode != bench.newest:
                if metric.key in HIGHER_IS_BETTER:
                    kind, bound = "min_newest", 1.0 - PYTHONS_TOLERANCE
                else:
                    kind, bound = "max_newest", 1.0 + PYTHONS_TOLERANCE
                checks.append(Check(metric.workload, mode, metric.key, kind, bound))
    return checks


class Verdict(NamedTuple):
    check: Check
    measured: Optional[float]  # the median, or its ratio for the *_direct/*_socat kinds
    passed: Optional[bool]  # None: not measured


def judge(
    check: Check, medians: Dict[str, Dict[str, Optional[float]]], newest: Optional[str] = None
) -> Verdict:
    value = medians.get(check.key, {}).get(check.mode)
    if check.kind.endswith(RATIO_KINDS):
        base_mode = check.kind.split("_")[1]
        base = medians.get(check.key, {}).get(newest if base_mode == "newest" else base_mode)
        value = value / base if value is not None and base else None
    if value is None:
        return Verdict(check, None, None)
    if check.kind.startswith("min"):
        return Verdict(check, value, value >= check.bound)
    return Verdict(check, value, value <= check.bound)


def describe_target(check: Check) -> str:
    sign = "≥" if check.kind.startswith("min") else "≤"
    unit = {k.key: k.unit for k in METRICS}[check.key]
    if check.kind.endswith(RATIO_KINDS):
        return "%s %g × %s" % (sign, check.bound, check.kind.split("_")[1])
    return "%s %g %s" % (sign, check.bound, unit)


def describe_gap(verdict: Verdict) -> str:
    """By how much a target is missed (or met)."""
    check, value = verdict.check, verdict.measured
    if value is None:
        return "not measured"
    if check.bound == 0:
        return "%g over" % value if value > 0 else "met"
    if check.kind.endswith("_newest"):
        worse = (1 - value) if check.kind.startswith("min") else (value - 1)
        if verdict.passed:
            return "met"
        return "missed: %.0f%% worse than the newest Python (allowed %.0f%%)" % (
            worse * 100,
            PYTHONS_TOLERANCE * 100,
        )
    ratio = value / check.bound
    if verdict.passed:
        return "met (%.2f× the bound)" % ratio
    if check.kind.startswith("min"):
        return "missed by %.0f%% (%.2f× the bound)" % ((1 - ratio) * 100, ratio)
    return "missed by %.0f%% (%.2f× the bound)" % ((ratio - 1) * 100, ratio)
