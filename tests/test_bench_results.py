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
LATENCY = Workload(3, "latency", "echo", False, None)


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


def churn_fixture(directory):
    """A small results directory: churn and latency, three runs of two modes, one failed cell."""
    store = results.ResultsDir(directory)
    for run in range(3):
        store.measured(CHURN, "direct", "direct", run, {"churn_rps": 9000.0 + run})
        store.measured(CHURN, "tls0", "nodepass tls=0", run,
                       {"churn_rps": 3000.0 + run, "op_user_churn": 150.0, "op_sys_churn": 50.0})
        store.measured(LATENCY, "tls0", "nodepass tls=0", run, {"ping_p50": 60.0, "ping_p99": 90.0})
    store.failed(LATENCY, ["direct"], "the echo target did not answer")
    store.run_description("scripts/bench --only churn,latency", 1.0,
                          {"direct": "direct", "tls0": "nodepass tls=0"}, False)
    return store


def test_charts_are_drawn_from_the_json_lines(tmp_path):
    pytest.importorskip("matplotlib")
    directory = str(tmp_path)
    churn_fixture(directory)
    drawn, message = draw_charts(directory)
    assert drawn == ["churn.png", "latency.png"]  # nothing measured for the others
    assert message == "charts written to %s: churn.png, latency.png" % directory
    from matplotlib import image
    picture = image.imread(os.path.join(directory, "churn.png"))
    assert picture.shape[1] > picture.shape[0] > 300  # two panels side by side, 100 dpi
    assert [name for name, _, _ in CHARTS] == ["throughput.png", "churn.png", "latency.png",
                                               "idle-memory.png", "udp.png"]


def test_charts_without_matplotlib_say_how_to_get_it(tmp_path, monkeypatch):
    churn_fixture(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert draw_charts(str(tmp_path)) == (
        [], "charts skipped: matplotlib is not importable (pip install '.[bench]')")
    assert not any(name.endswith(".png") for name in os.listdir(str(tmp_path)))


def test_a_new_run_replaces_only_the_files_of_the_last_one(tmp_path):
    store = churn_fixture(str(tmp_path))
    (tmp_path / "notes.txt").write_text("kept")
    store.clear(["churn.jsonl", "latency.jsonl", "run.json", "udp.jsonl"])
    assert os.listdir(str(tmp_path)) == ["notes.txt"]


def test_summary_gives_ratios_to_direct_and_the_cpu_per_connection_to_socat():
    from benchmark.summary import summary_lines
    medians = {"churn_rps": {"direct": 40000.0, "socat": 4000.0, "tls0": 6000.0},
               "op_user_churn": {"socat": 300.0, "tls0": 150.0},
               "op_sys_churn": {"socat": 100.0, "tls0": 50.0}}
    lines = summary_lines(medians, ["direct", "socat", "tls0"], {"tls0": "nodepass tls=0"})
    assert lines[0] == "| workload | unit | direct | socat | nodepass tls=0 |"
    assert lines[2] == ("| churn, new connections | req/s | 40,000 | 4,000 (0.10×d) | "
                        "6,000 (0.15×d, 1.50×s) |")
    assert lines[3] == "| churn, tunnel CPU per connection | µs | — | 400 | 200 (0.50×s) |"
    assert len(lines) == 4  # workloads not measured have no row
