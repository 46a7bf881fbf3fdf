"""scripts/benchmark's results directory and report placement, without running a workload.

The report goes between marker comments of its file and never touches the prose
around them; --results DIR holds one JSON line per measurement, read back for charts.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))

from benchmark import results  # noqa: E402 (found through the path above)
from benchmark.base import Workload  # noqa: E402
from benchmark.charts import CHARTS, draw_charts, medians_of  # noqa: E402

pytestmark = pytest.mark.timeout(20)
CHURN = Workload(2, "churn", "nginx", False, None)


def test_new_file_is_the_marked_section(tmp_path):
    path = str(tmp_path / "BENCH.md")
    results.write_report(path, "# Benchmarks\n\nfigures\n")
    text = open(path).read()
    assert text == "%s\n# Benchmarks\n\nfigures\n%s\n" % (results.BEGIN_MARKER, results.END_MARKER)


def test_prose_around_the_markers_is_kept_and_the_section_replaced(tmp_path):
    path = str(tmp_path / "BENCH.md")
    with open(path, "w") as out:
        out.write("# Hand-written\n\nprose before\n")
    results.write_report(path, "run one\n")
    with open(path, "a") as out:
        out.write("\nprose after\n")
    results.write_report(path, "run two\n")
    text = open(path).read()
    assert text.startswith("# Hand-written\n\nprose before\n")
    assert text.endswith(results.END_MARKER + "\n\nprose after\n")
    assert "run two" in text and "run one" not in text
    assert text.count(results.BEGIN_MARKER) == 1


def test_figures_are_json_lines_per_workload_and_their_medians_read_back(tmp_path):
    directory = str(tmp_path / "figures")
    store = results.ResultsDir(directory)
    for run, rps in enumerate((100.0, 300.0, 200.0)):
        store.measured(CHURN, "tls0", "nodepass tls=0", run, {"churn_rps": rps, "churn_p99": None})
    store.failed(CHURN, ["socat"], "socat did not start")
    store.run_description("scripts/bench --only churn", 1.0, {"tls0": "nodepass tls=0"}, True)
    lines = results.read_jsonl(os.path.join(directory, "churn.jsonl"))
    assert [line.get("run") for line in lines] == [1, 2, 3, None]
    assert lines[0]["figures"] == {"churn_rps": 100.0}  # None: not measured, not written
    assert lines[3] == {"workload": "churn", "number": 2, "mode": "socat",
                        "failed": "socat did not start"}
    order, medians, titles = medians_of(directory)
    assert order == ["tls0"] and medians == {"churn_rps": {"tls0": 200.0}}
    assert json.load(open(os.path.join(directory, "run.json")))["smoke"] is True


def test_charts_are_drawn_or_skipped_with_a_reason(tmp_path):
    directory = str(tmp_path)
    store = results.ResultsDir(directory)
    store.measured(CHURN, "direct", "direct", 0, {"churn_rps": 900.0})
    store.measured(CHURN, "tls0", "nodepass tls=0", 0, {"churn_rps": 300.0})
    message = draw_charts(directory)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert message.startswith("charts skipped: matplotlib is not importable")
        return
    assert message.endswith(": churn.png")
    assert os.path.getsize(os.path.join(directory, "churn.png")) > 1000
    assert "churn.png" in [name for name, _, _, _ in CHARTS]


def test_summary_gives_ratios_to_direct_and_the_cpu_per_connection_to_socat():
    from benchmark.summary import summary_lines
    medians = {"churn_rps": {"direct": 40000.0, "socat": 4000.0, "tls0": 6000.0},
               "op_user_churn": {"socat": 300.0, "tls0": 150.0},
               "op_sys_churn": {"socat": 100.0, "tls0": 50.0}}
    lines = summary_lines(medians, ["direct", "socat", "tls0"], {"tls0": "nodepass tls=0"})
    assert lines[0] == "| workload | unit | direct | socat | nodepass tls=0 |"
    assert lines[2] == ("| churn, new connections | req/s | 40,000 | 4,000 (0.10×d) | "
                        "6,000 (0.15×d) |")
    assert lines[3] == "| churn, tunnel CPU per connection | µs | — | 400 | 200 (0.50×s) |"
    assert len(lines) == 4  # workloads not measured have no row
