"""The one-screen summary: a headline figure per workload, every mode side by side.

Pure: it reads medians ({key: {mode: value}}), which the run has in memory and
charts.medians_of reads back from a results directory, so the same table can be
made again from the JSON lines of a run.
"""

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


def summary_lines(medians: Dict[str, Dict[str, float]], modes: Sequence[str],
                  titles: Dict[str, str]) -> List[str]:
    """A markdown table: one row per headline measured, a column per mode; each figure
    beside direct's as a ratio (×d), the CPU row beside socat's (direct has no relay)."""
    lines = ["| workload | unit | " + " | ".join(titles.get(m, m) for m in modes) + " |",
             "|---|---|" + "---|" * len(modes)]
    for label, unit, keys, digits in HEADLINES:
        row = {mode: headline_value(medians, keys, mode) for mode in modes}
        if all(value is None for value in row.values()):
            continue
        base_mode = "socat" if keys[0].startswith("op_") else "direct"
        base = row.get(base_mode)
        cells = []
        for mode in modes:
            value = row[mode]
            if value is None:
                cells.append("—")
                continue
            text = "{:,.{}f}".format(value, digits)
            if base and mode != base_mode:
                text += " (%.2f×%s)" % (value / base, base_mode[0])
            cells.append(text)
        lines.append("| %s | %s | %s |" % (label, unit, " | ".join(cells)))
    return lines
