"""The report's tables of medians: results, targets, runs and variants."""

import statistics
from typing import Dict, List, Optional, Sequence

from .base import HIGHER_IS_BETTER, TUNNEL_MODES
from .checks import (
    METRICS,
    Metric,
    RATIO_KINDS,
    Verdict,
    describe_gap,
    describe_target,
    issue_checks,
    judge,
    pythons_checks,
)
from .runner import Bench


# --------------------------------------------------------------------------
# The report.


def format_value(value: Optional[float], digits: int) -> str:
    if value is None:
        return "—"
    return "{:,.{}f}".format(value, digits)


def ratio_text(value: Optional[float], base: Optional[float], letter: str) -> Optional[str]:
    if value is None or not base:
        return None
    return "%.2f×%s" % (value / base, letter)


def table_cell(
    metric: Metric,
    mode: str,
    medians: Dict[str, Dict[str, Optional[float]]],
    failed_modes: Sequence[str],
    newest: Optional[str] = None,
    base: Optional[str] = None,
) -> str:
    """The median with its ratios: to direct and socat, or (per Python) to the newest;
    a variant's to direct and to its base mode; tls=1's also to tls=0 where the metric says."""
    row = medians.get(metric.key, {})
    value = row.get(mode)
    if value is None:
        return "FAILED" if mode in failed_modes else "—"
    ratios: List[Optional[str]] = []
    if newest is not None:
        if metric.ratios and mode != newest:
            ratios.append(ratio_text(value, row.get(newest), "n"))
    elif metric.ratios:
        if mode != "direct":
            ratios.append(ratio_text(value, row.get("direct"), "d"))
        if base is not None:
            ratios.append(ratio_text(value, row.get(base), "b"))
        elif mode in TUNNEL_MODES:
            ratios.append(ratio_text(value, row.get("socat"), "s"))
        if metric.tls0_ratio and mode == "tls1":
            ratios.append(ratio_text(value, row.get("tls0"), "t0"))
    shown = [r for r in ratios if r]
    text = format_value(value, metric.digits)
    return "%s (%s)" % (text, ", ".join(shown)) if shown else text


def results_table(bench: Bench, numbers: Sequence[int]) -> List[str]:
    medians = bench.medians()
    lines = [
        "| # | metric | unit | " + " | ".join(bench.title(m) for m in bench.modes) + " |",
        "|---|---|---|" + "---|" * len(bench.modes),
    ]
    for metric in METRICS:
        if metric.workload not in numbers:
            continue
        source = 1 if metric.workload == 6 else metric.workload
        failed = [mode for mode in bench.modes if (source, mode) in bench.failed_cells]
        cells = [
            table_cell(metric, mode, medians, failed, bench.newest, bench.base_of(mode))
            for mode in bench.modes
        ]
        lines.append(
            "| %d | %s | %s | %s |"
            % (metric.workload, metric.label, metric.unit, " | ".join(cells))
        )
    return lines


def targets_table(bench: Bench, verdicts: Sequence[Verdict]) -> List[str]:
    column = "Python" if bench.per_python else "mode"
    lines = [
        "| # | %s | metric | target | measured | verdict |" % column,
        "|---|---|---|---|---|---|",
    ]
    labels = {m.key: m for m in METRICS}
    for verdict in verdicts:
        check = verdict.check
        metric = labels[check.key]
        if verdict.measured is None:
            measured = "—"
        elif check.kind.endswith(RATIO_KINDS):
            measured = "%.2f × %s" % (verdict.measured, check.kind.split("_")[1])
        else:
            measured = "%s %s" % (format_value(verdict.measured, metric.digits), metric.unit)
        state = {True: "met", False: "**MISSED**", None: "—"}[verdict.passed]
        gap = describe_gap(verdict) if verdict.passed is False else state
        lines.append(
            "| %d | %s | %s | %s | %s | %s |"
            % (
                check.workload,
                bench.title(check.mode),
                metric.label,
                describe_target(check),
                measured,
                gap,
            )
        )
    return lines


def runs_table(bench: Bench, numbers: Sequence[int]) -> List[str]:
    lines = ["| metric | %s | runs |" % ("Python" if bench.per_python else "mode"), "|---|---|---|"]
    for metric in METRICS:
        if metric.workload not in numbers:
            continue
        for mode in bench.modes:
            runs = bench.values.get(metric.key, {}).get(mode)
            if runs:
                lines.append(
                    "| %s | %s | %s |"
                    % (
                        metric.label,
                        bench.title(mode),
                        ", ".join(format_value(v, metric.digits) for v in runs),
                    )
                )
    return lines


def verdicts_of(bench: Bench, numbers: Sequence[int]) -> List[Verdict]:
    """The targets of the run: issue 4's per relay mode, or issue 9's per Python."""
    medians = bench.medians()
    if bench.per_python:
        checks = pythons_checks(bench, numbers)
    else:
        checks = [c for c in issue_checks(bench.scale) if c.mode in bench.modes]
    return [judge(c, medians, bench.newest) for c in checks if c.workload in numbers]


def run_spread(runs: Sequence[float]) -> Optional[float]:
    """Run-to-run noise of one figure: (max - min) / median, None for fewer than 2 runs."""
    if len(runs) < 2:
        return None
    middle = statistics.median(runs)
    return (max(runs) - min(runs)) / middle if middle else None


def variants_table(bench: Bench, numbers: Sequence[int]) -> List[str]:
    """Every variant's figure against its base mode's from the same run, beside the noise."""
    medians = bench.medians()
    lines = [
        "| # | metric | variant | base | variant ÷ base | run-to-run noise | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric in METRICS:
        if metric.workload not in numbers or not metric.ratios:
            continue
        for mode, variant in bench.variants.items():
            value = medians.get(metric.key, {}).get(mode)
            base = medians.get(metric.key, {}).get(variant.base)
            if value is None or not base:
                continue
            ratio = value / base
            spreads = [run_spread(bench.values[metric.key].get(m, [])) for m in (mode, variant.base)]
            known = [spread for spread in spreads if spread is not None]
            noise = max(known) if known else None
            if noise is None:
                verdict = "— (one run: no noise figure)"
            elif abs(ratio - 1) <= noise:
                verdict = "within noise"
            else:
                better = (ratio > 1) == (metric.key in HIGHER_IS_BETTER)
                verdict = "**%s by %.0f%%**, beyond noise" % (
                    "better" if better else "worse", abs(ratio - 1) * 100)
            lines.append(
                "| %d | %s | %s | %s %s → %s %s | %.3f | %s | %s |"
                % (
                    metric.workload,
                    metric.label,
                    bench.title(mode),
                    format_value(base, metric.digits),
                    metric.unit,
                    format_value(value, metric.digits),
                    metric.unit,
                    ratio,
                    "—" if noise is None else "%.1f%%" % (noise * 100),
                    verdict,
                )
            )
    for mode, (answered, failed, last_error) in bench.scrapes.items():
        lines += ["", "%s: %d scrapes of /metrics answered, %d failed%s." % (
            bench.title(mode), answered, failed, " (last: %s)" % last_error if failed else "")]
    return lines
