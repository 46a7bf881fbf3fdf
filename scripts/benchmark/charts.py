"""PNG charts drawn from a results directory's JSON lines, every tunnel side by side.

matplotlib is optional (the `bench` extra: pip install -e '.[bench]'); without it
the bench says the charts were skipped and writes everything else.
"""

import glob
import json
import os
import statistics
from typing import Dict, List, Tuple

from .results import read_jsonl

# chart file -> (title, unit, [(figure key, bar label)]): the figures a user compares.
CHARTS = [
    ("throughput.png", "Bulk TCP (iperf3)", "Gbit/s",
     [("bulk_1f", "1 stream"), ("bulk_8f", "8 streams"), ("bulk_1r", "1 stream -R"),
      ("bulk_8r", "8 streams -R")]),
    ("churn.png", "Connection churn (ab, no keep-alive)", "requests/s",
     [("churn_rps", "new connections")]),
    ("latency.png", "1-byte ping-pong", "µs", [("ping_p50", "p50"), ("ping_p99", "p99")]),
    ("idle-memory.png", "Tunnel memory per idle connection", "KB", [("idle_kb", "per connection")]),
    ("udp.png", "UDP request/reply", "replies/s",
     [("udp_seq_rps", "1 sender"), ("udp_conc_rps", "16 senders")]),
]


def medians_of(directory: str) -> Tuple[List[str], Dict[str, Dict[str, str]], Dict]:
    """(mode order, {key: {mode: median}}, {mode: title}) of every measured figure in directory."""
    titles = {}
    run_path = os.path.join(directory, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as source:
            titles = json.load(source).get("modes", {})
    runs = {}
    order = list(titles)
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        for record in read_jsonl(path):
            if "figures" not in record:
                continue  # failed cells and the sections' own figures
            mode = record["mode"]
            titles.setdefault(mode, record.get("title", mode))
            if mode not in order:
                order.append(mode)
            for key, value in record["figures"].items():
                runs.setdefault(key, {}).setdefault(mode, []).append(value)
    medians = {key: {mode: statistics.median(values) for mode, values in per_mode.items()}
               for key, per_mode in runs.items()}
    return order, medians, titles


def draw_charts(directory: str) -> str:
    """Draw CHARTS into directory; a line saying what was drawn or why nothing was."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError:
        return "charts skipped: matplotlib is not importable (pip install -e '.[bench]')"
    order, medians, titles = medians_of(directory)
    drawn = []
    for name, title, unit, bars in CHARTS:
        bars = [(key, label) for key, label in bars if key in medians]
        if not bars:
            continue
        figure, axes = pyplot.subplots(figsize=(7, 3.5))
        width = 0.8 / max(1, len(order))
        for index, mode in enumerate(order):
            heights = [medians[key].get(mode, 0) for key, _ in bars]
            positions = [bar + index * width for bar in range(len(bars))]
            axes.bar(positions, heights, width, label=titles.get(mode, mode))
        axes.set_xticks([bar + width * (len(order) - 1) / 2 for bar in range(len(bars))])
        axes.set_xticklabels([label for _, label in bars])
        axes.set_ylabel(unit)
        axes.set_title(title + " (medians)")
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(os.path.join(directory, name), dpi=100)
        pyplot.close(figure)
        drawn.append(name)
    if not drawn:
        return "charts: no figure to draw in %s" % directory
    return "charts written to %s: %s" % (directory, ", ".join(drawn))
