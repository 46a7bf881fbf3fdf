"""scripts/bench --smoke: every workload path runs and the report has every row.

The smoke run starts real iperf3, nginx, socat, ab and nodepass processes on
loopback and takes about 25 s (the variants/tunnels/rate run about 15 s more); it stops all of them itself (by pid) even when it
fails. Outside CI the test is skipped when one of the tools is missing; in CI
(CI=true) a missing tool is a failure, so the script cannot rot unseen.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO_ROOT, "scripts", "bench")
TOOLS = ("iperf3", "socat", "nginx", "ab")

# Every row of the results table, by workload: the report must hold each one.
EXPECTED_ROWS = [
    "bulk TCP, 1 stream",
    "bulk TCP, 8 streams",
    "bulk TCP, 1 stream, reverse",
    "bulk TCP, 8 streams, reverse",
    "churn, requests",
    "churn, p50",
    "churn, p99",
    "churn, failed requests",
    "1-byte ping-pong, p50",
    "1-byte ping-pong, p99",
    "idle connections echoing",
    "idle, time to establish all",
    "idle, tunnel memory per connection",
    "UDP sequential, replies",
    "UDP sequential, p50",
    "UDP sequential, p99",
    "UDP sequential, lost",
    "UDP 16 senders, replies",
    "UDP 16 senders, p50",
    "UDP 16 senders, p99",
    "UDP 16 senders, lost",
    "tunnel CPU, 1 stream",
    "tunnel CPU, 8 streams",
    "tunnel CPU, 1 stream, reverse",
    "tunnel CPU, 8 streams, reverse",
    "request/response, requests",
    "request/response, p50",
    "request/response, p99",
    "request/response, failed requests",
]
COLUMNS = ["direct", "socat", "nodepass tls=0", "nodepass tls=1"]
# Rows where a mode has no figure by design (no relay process to measure).
NOT_APPLICABLE = {("idle, tunnel memory per connection", "direct")} | {
    (row, "direct") for row in EXPECTED_ROWS if row.startswith("tunnel CPU")
}


def results_rows(report):
    """metric label -> {column title: cell} from the report's results table."""
    section = report.split("## Results (medians)", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[1]] = dict(zip(header[3:], cells[3:]))
    return rows


def processes_left_in(directory):
    """Pids whose working directory is directory: every process the bench starts
    inherits it, so none may be left once the bench has exited."""
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink("/proc/%s/cwd" % entry) == str(directory):
                    left.append(int(entry))
            except OSError:
                continue
    return left


def run_bench(tmp_path, args, timeout=140):
    """scripts/bench --smoke ARGS, run in tmp_path (every process it starts
    inherits that directory: processes_left_in finds any it left)."""
    return subprocess.run([sys.executable, BENCH, "--smoke"] + list(args), cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def smoke_report(tmp_path, args=(), prose=""):
    """The report of a bench run that must succeed, with no cell FAILED; prose is
    written into the report's file first (the bench must leave it there)."""
    report_path = tmp_path / "bench.md"
    if prose:
        report_path.write_text(prose, encoding="utf-8")
    done = run_bench(tmp_path, list(args) + ["--output", str(report_path)])
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, "bench --smoke %s failed:\n%s" % (" ".join(args),
                                                                  stderr[-4000:])
    report = report_path.read_text(encoding="utf-8")
    assert "FAILED" not in report
    return report


@pytest.fixture
def tools_present():
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing and os.environ.get("CI") != "true":
        pytest.skip("scripts/bench needs %s" % ", ".join(missing))
    assert not missing, "CI must install %s for the bench smoke test" % ", ".join(missing)


@pytest.mark.timeout(150)
def test_smoke_run_reports_every_workload(tools_present, tmp_path):
    report = smoke_report(tmp_path)
    rows = results_rows(report)
    assert sorted(rows) == sorted(EXPECTED_ROWS)
    for label in EXPECTED_ROWS:
        for column in COLUMNS:
            cell = rows[label][column]
            if (label, column) in NOT_APPLICABLE:
                assert cell == "—", (label, column, cell)
            else:
                assert re.match(r"^[0-9][0-9,]*(\.[0-9]+)?( \(|$)", cell), (label, column, cell)
    # Tunnel cells carry their ratios to direct and socat from the same run.
    assert re.search(r"\(\d+\.\d\d×d, \d+\.\d\d×s\)", rows["bulk TCP, 1 stream"]["nodepass tls=0"])
    # Request/response: tls=1 also as a ratio of tls=0 of the same run (issue 11's target).
    assert re.search(r"\(\d+\.\d\d×d, \d+\.\d\d×s, \d+\.\d\d×t0\)",
                     rows["request/response, requests"]["nodepass tls=1"])
    assert "scripts/bench --smoke --output" in report
    assert "## Machine" in report and "## Targets of issue 4" in report
    assert "## Targets of issue 11" in report
    # Where the CPU goes: the relays' user and system time per request, the load's beside it.
    cpu = report.split("## Where the CPU goes, per operation", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\| request/response \| µs/request \| nodepass tls=0 \| [0-9,.]+ \| "
                     r"[0-9,.]+ \| \d+% \| [0-9,.]+ \| \d+% \|", cpu), cpu
    assert re.search(r"\| churn \| µs/request \| direct \| — \| — \| — \| [0-9,.]+ \|", cpu), cpu
    assert processes_left_in(tmp_path) == []


def section(report, title):
    return report.split("## " + title, 1)[1].split("\n## ", 1)[0]


@pytest.mark.timeout(150)
def test_smoke_variants_tunnels_and_rate(tools_present, tmp_path):
    """--compare-query/--compare-client-query measure a variant beside its base mode;
    workload 8 (N tunnels, one process vs N processes) and 9 (rate=) report figures, or
    say they were skipped when this build lacks multi-URL, rate= or --metrics."""
    prose = "# Hand-written\n\nA line of prose the bench must keep.\n"
    report = smoke_report(tmp_path, [
        "--only", "latency,tunnels,rate", "--modes", "direct,tls0",
        "--compare-query", "udp=flow", "--compare-client-query", "log=warn",
        "--client-query", "tls=0", "--scrape-metrics", "--results", "figures"], prose)
    assert report.startswith(prose + "\n<!-- scripts/bench: generated from here")
    assert (tmp_path / "figures" / "latency.jsonl").exists()
    if importlib.util.find_spec("matplotlib"):  # the chart, shown by the report
        assert (tmp_path / "figures" / "latency.png").stat().st_size > 1000
        assert "![latency](figures/latency.png)" in report
    variant = "nodepass tls=0, server +udp=flow, client +log=warn"
    rows = results_rows(report)
    assert sorted(rows) == ["1-byte ping-pong, p50", "1-byte ping-pong, p99"]
    assert re.match(r"^[0-9,]+ \(\d+\.\d\d×d, \d+\.\d\d×b\)$", rows["1-byte ping-pong, p50"][variant])
    variants = section(report, "Variants against their base mode")
    assert "| 3 | 1-byte ping-pong, p50 | %s |" % variant in variants
    scrape = "nodepass tls=0, /metrics scraped 1/s"
    if "--metrics not supported by this build" in report:
        assert scrape not in rows["1-byte ping-pong, p50"]
    else:
        assert re.search(r"%s: [1-9]\d* scrapes of /metrics answered, 0 failed" % re.escape(scrape),
                         variants)

    tunnels = section(report, "N tunnels in one process vs N processes")
    assert re.search(r"\| 1 \| processes \| \d+\.\d \| \d+\.\d \|.*\| 17 \| 2 of 2 \|", tunnels)
    assert re.search(r"\| 3 \| processes \| \d+\.\d \| \d+\.\d \|.*\| 51 \| 6 of 6 \|", tunnels)
    # The connection count is read once the pools are full; on a loaded machine
    # one of the 48 may still be on its way: the echo of every tunnel is the check.
    assert re.search(r"\| 3 \| one process \| (skipped: multi-URL not supported by this build"
                     r"|\d+\.\d \| \d+\.\d \|.*\| \d+ \| 6 of 6 \|)", tunnels), tunnels

    rate = section(report, "rate= on bulk")
    assert re.search(r"skipped: rate= not supported by this build|"
                     r"\| nodepass tls=0 \| forward \| 100 \| \d+\.\d \|", rate)
    assert processes_left_in(tmp_path) == []


def test_refused_query_is_one_line_and_status_2(tmp_path):
    done = run_bench(tmp_path, ["--only", "latency", "--modes", "direct,tls0",
                                "--compare-query", "no_such_option=1"], timeout=60)
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and "refuses the server query 'no_such_option=1'" in lines[0], lines
    assert processes_left_in(tmp_path) == []


@pytest.mark.timeout(90)
def test_smoke_failure_is_reported_by_exit_status(tmp_path):
    """A route that cannot come up makes the bench exit non-zero (here: nodepass
    given an environment it refuses), and the report says which cell failed."""
    done = run_bench(tmp_path, ["--only", "latency", "--modes", "direct,tls0",
                                "--nodepass-env", "SEMAPHORE_LIMIT=not-a-number",
                                "--output", str(tmp_path / "bench.md")], timeout=60)
    assert done.returncode == 1, done.stderr.decode("utf-8", "replace")[-2000:]
    report = (tmp_path / "bench.md").read_text(encoding="utf-8")
    assert "FAILED" in report
    assert results_rows(report)["1-byte ping-pong, p50"]["nodepass tls=0"] == "FAILED"
    assert processes_left_in(tmp_path) == []
