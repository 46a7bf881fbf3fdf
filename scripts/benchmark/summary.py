"""The one-screen summary: a headline figure per workload, every mode side by side.

Pure: it reads medians ({key: {mode: value}}), which the run has in memory and
charts.medians_of reads back from a results directory, so the same table can be
made again from the JSON lines of a run.
"""

import collections
from typing import Dict, List, Optional, Sequence

# (label, unit, figure keys summed, digits)
HEADLINES = [
    ("bulk TCP, 1 stream", "Gbit/s", ("bulk_1f",), 2),
    ("bulk TCP, 8 streams", "Gbit/s", ("bulk_8f",), 2),
    ("churn, new connections", "req/s", ("churn_rps",), 0),
    ("churn, tunnel CPU per connection", "µs", ("op_user_churn", "op_sys_churn"), 0),
    ("1-byte ping-pong, p50", "µs", ("ping_p50",), 0),
    ("1-byte ping-pong, p99", "µs", ("ping_p99",), 0),
    ("idle, tunnel memory per connection", "KB", ("idle_kb",), 1),
    ("UDP, 1 sender", "replies/s", ("udp_seq_rps",), 0),
    ("UDP, 16 senders", "replies/s", ("udp_conc_rps",), 0),
    ("request/response, 50 connections", "req/s", ("rr_rps",), 0),
]


def headline_value(medians: Dict[str, Dict[str, float]], keys: Sequence[str],
                   mode: str) -> Optional[float]:
    values = [medians.get(key, {}).get(mode) for key in keys]
    if any(value is None for value in values):
        return None
    return sum(values)


def figure_cell(value: Optional[float], digits: int, mode: str,
                bases: Dict[str, Optional[float]]) -> str:
    """The figure, then its ratio to each base mode measured; a base mode's own cell
    only to the bases before it (socat's to direct, direct's to none)."""
    if value is None:
        return "—"
    if mode in bases:
        bases = collections.OrderedDict(list(bases.items())[:list(bases).index(mode)])
    ratios = ["%.2f×%s" % (value / base, base_mode[0]) for base_mode, base in bases.items() if base]
    text = "{:,.{}f}".format(value, digits)
    return text + (" (%s)" % ", ".join(ratios) if ratios else "")


def summary_lines(medians: Dict[str, Dict[str, float]], modes: Sequence[str],
                  titles: Dict[str, str]) -> List[str]:
    """A markdown table: one row per headline measured, a column per mode; each figure
    beside direct's and socat's as ratios (×d, ×s), the CPU row beside socat's only
    (direct has no relay)."""
    lines = ["| workload | unit | " + " | ".join(titles.get(m, m) for m in modes) + " |",
             "|---|---|" + "---|" * len(modes)]
    for label, unit, keys, digits in HEADLINES:
        row = {mode: headline_value(medians, keys, mode) for mode in modes}
        if all(value is None for value in row.values()):
            continue
        base_modes = ("socat",) if keys[0].startswith("op_") else ("direct", "socat")
        bases = collections.OrderedDict((base, row.get(base)) for base in base_modes)
        cells = [figure_cell(row[mode], digits, mode, bases) for mode in modes]
        lines.append("| %s | %s | %s |" % (label, unit, " | ".join(cells)))
    return lines
