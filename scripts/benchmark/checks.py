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


def bulk_label(streams: int, reverse: bool) -> str:
    return "%d stream%s%s" % (streams, "s" if streams > 1 else "", ", reverse" if reverse else "")


def ab_metrics(prefix: str, workload: int, label: str, digits: int, tls0_ratio: bool = False):
    """The four figures of an ab workload, as loadgen.ab_figures names them."""
    return [
        Metric(prefix + "_rps", workload, label + ", requests", "req/s", 0, True, tls0_ratio),
        Metric(prefix + "_p50", workload, label + ", p50", "ms", digits, True, tls0_ratio),
        Metric(prefix + "_p99", workload, label + ", p99", "ms", digits, True, tls0_ratio),
        Metric(prefix + "_failed", workload, label + ", failed requests", "count", 0, False),
    ]


def udp_metrics(name: str, label: str):
    """The four figures of one UDP case (workloads/udp.py): replies, p50, p99, lost."""
    key, label = "udp_" + name, "UDP " + label
    return [
        Metric(key + "_rps", 5, label + ", replies", "1/s", 0),
        Metric(key + "_p50", 5, label + ", p50", "ms", 3),
        Metric(key + "_p99", 5, label + ", p99", "ms", 3),
        Metric(key + "_lost", 5, label + ", lost", "count", 0, False),
    ]


# In the results table's order: bulk, churn, ping-pong, idle, UDP, CPU, request/response.
METRICS = (
    [Metric("bulk_" + bulk_suffix(*case), 1, "bulk TCP, " + bulk_label(*case), "Gbit/s", 2)
     for case in BULK_CASES]
    + ab_metrics("churn", 2, "churn", 2)
    + [
        Metric("ping_p50", 3, "1-byte ping-pong, p50", "µs", 0),
        Metric("ping_p99", 3, "1-byte ping-pong, p99", "µs", 0),
        Metric("idle_ok", 4, "idle connections echoing", "count", 0),
        Metric("idle_seconds", 4, "idle, time to establish all", "s", 2),
        Metric("idle_kb", 4, "idle, tunnel memory per connection", "KB", 1),
    ]
    + udp_metrics("seq", "sequential")
    + udp_metrics("conc", "16 senders")
    + [Metric("cpu_" + bulk_suffix(*case), 6, "tunnel CPU, " + bulk_label(*case), "s/GB", 2)
       for case in BULK_CASES]
    + ab_metrics("rr", 7, "request/response", 3, tls0_ratio=True)
)


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
