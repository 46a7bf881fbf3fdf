"""PNG charts drawn from a results directory's JSON lines, every tunnel side by side.

matplotlib is optional (the `bench` extra): it is imported only when charts are
drawn, and without it the bench says in one line how to get it and writes
everything else.
"""

import glob
import json
import os
import statistics
from typing import Dict, List, Tuple

from .results import read_jsonl
from .summary import headline_value as summed

MISSING_MATPLOTLIB = "charts skipped: matplotlib is not importable (pip install '.[bench]')"

# A chart is a file, a title and its panels; a panel is (axis label, [(figure keys
# summed, bar label)]): the bars of one unit, a group per figure, a bar per mode.
CHARTS = [
    ("throughput.png", "Bulk TCP through each relay (iperf3)", [
        ("Gbit/s", [(("bulk_1f",), "1 stream"), (("bulk_8f",), "8 streams"),
                    (("bulk_1r",), "1 stream, -R"), (("bulk_8r",), "8 streams, -R")]),
    ]),
    ("churn.png", "Connections to nginx (ab)", [
        ("requests/s", [(("churn_rps",), "a new connection each"),
                        (("rr_rps",), "50 persistent (-k)")]),
        ("relay CPU, µs per new connection", [(("op_user_churn", "op_sys_churn"), "user + system")]),
    ]),
    ("latency.png", "Latency percentiles", [
        ("1-byte ping-pong, µs", [(("ping_p50",), "p50"), (("ping_p99",), "p99")]),
        ("request/response, ms", [(("rr_p50",), "p50"), (("rr_p99",), "p99")]),
    ]),
    ("idle-memory.png", "Memory per idle connection (5,000 open)", [
        ("relay RSS, KB per connection", [(("idle_kb",), "idle connections")]),
    ]),
    ("udp.png", "UDP request/reply", [
        ("replies/s", [(("udp_seq_rps",), "1 sender"), (("udp_conc_rps",), "16 senders")]),
    ]),
]


def medians_of(directory: str) -> Tuple[List[str], Dict[str, Dict[str, float]], Dict]:
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


def measured_panels(chart_panels, medians, order):
    """The panels with at least one figure measured, each keeping only its measured groups."""
    panels = []
    for unit, groups in chart_panels:
        groups = [(keys, label) for keys, label in groups
                  if any(summed(medians, keys, mode) is not None for mode in order)]
        if groups:
            panels.append((unit, groups))
    return panels


def figure_text(value: float) -> str:
    if value >= 100:
        return "{:,.0f}".format(value)
    return "{:.3g}".format(value)


def draw_panel(axes, groups, medians, order) -> None:
    """A bar per mode in each group, for the modes with a figure in this panel (direct has
    no relay to measure); a mode keeps its colour, C<its place in order>, in every chart."""
    modes = [(index, mode) for index, mode in enumerate(order)
             if any(summed(medians, keys, mode) is not None for keys, _ in groups)]
    width = 0.8 / max(1, len(modes))
    for place, (index, mode) in enumerate(modes):
        bars = [(group, summed(medians, keys, mode)) for group, (keys, _) in enumerate(groups)]
        bars = [(group, value) for group, value in bars if value is not None]
        drawn = axes.bar([group + place * width for group, _ in bars], [v for _, v in bars],
                         width, color="C%d" % index)
        if hasattr(axes, "bar_label"):  # matplotlib 3.4 on
            axes.bar_label(drawn, labels=[figure_text(v) for _, v in bars], fontsize=7)
    axes.set_xticks([group + width * (len(modes) - 1) / 2 for group in range(len(groups))])
    axes.set_xticklabels([label for _, label in groups], fontsize=8)
    axes.margins(y=0.15)  # room for the figures above the bars


def draw_chart(pyplot, path, title, panels, medians, order, titles) -> None:
    from matplotlib.patches import Patch
    width = 4.2 * len(panels) + 1.8
    figure, axes_row = pyplot.subplots(1, len(panels), figsize=(width, 3.6), squeeze=False)
    for axes, (unit, groups) in zip(axes_row[0], panels):
        draw_panel(axes, groups, medians, order)
        axes.set_ylabel(unit)
    legend = [Patch(color="C%d" % index, label=titles.get(mode, mode))
              for index, mode in enumerate(order)]
    figure.legend(handles=legend, loc="center right", fontsize="small")
    figure.suptitle(title + " (medians)")
    figure.tight_layout(rect=(0, 0, 1 - 1.7 / width, 1))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def draw_charts(directory: str) -> Tuple[List[str], str]:
    """Draw CHARTS into directory: (the files drawn, a line saying what was drawn or why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError:
        return [], MISSING_MATPLOTLIB
    order, medians, titles = medians_of(directory)
    drawn = []
    for name, title, chart_panels in CHARTS:
        panels = measured_panels(chart_panels, medians, order)
        if panels:
            draw_chart(pyplot, os.path.join(directory, name), title, panels, medians, order, titles)
            drawn.append(name)
    if not drawn:
        return [], "charts: no figure to draw in %s" % directory
    return drawn, "charts written to %s: %s" % (directory, ", ".join(drawn))
