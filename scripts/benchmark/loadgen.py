"""The load generators the workloads drive: iperf3 and ab, and the percentiles
of what they report.
"""

import json
import os
import re
import subprocess
import time
from typing import NamedTuple, Optional, Sequence

from .base import BenchError, HOST


# --------------------------------------------------------------------------
# Tools driven by the workloads.


def run_iperf3(
    port: int, streams: int, reverse: bool, limit: Sequence[str], timeout: float
) -> dict:
    """One iperf3 test through port; the parsed JSON report."""
    argv = (
        [
            "iperf3",
            "-c",
            HOST,
            "-p",
            str(port),
            "-P",
            str(streams),
            "-J",
            "--connect-timeout",
            "3000",
        ]
        + list(limit)
        + (["-R"] if reverse else [])
    )
    for attempt in range(3):
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        try:
            report = json.loads(done.stdout.decode("utf-8", "replace"))
        except ValueError:
            raise BenchError(
                "iperf3 printed no report (status %d): %s"
                % (done.returncode, done.stderr.decode("utf-8", "replace").strip())
            )
        error = report.get("error")
        if not error:
            return report
        if "busy" in error and attempt < 2:  # the previous test is still closing
            time.sleep(1.0)
            continue
        raise BenchError("iperf3: %s" % error)
    raise BenchError("iperf3: server stayed busy")


class AbResult(NamedTuple):
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    failed: int
    complete: int
    keepalive: int  # requests answered on a kept-alive connection (ab -k)


def run_ab(
    port: int,
    requests: int,
    concurrency: int,
    workdir: str,
    timeout: float,
    path: str = "/index.html",
    seconds: Optional[float] = None,
) -> AbResult:
    """ab without keep-alive for requests requests; or, given seconds, ab -k (persistent
    connections) for that long, with requests only as the cap ab sizes its tables by."""
    csv_path = os.path.join(workdir, "ab-percentiles.csv")
    timed = ["-k", "-t", "%g" % seconds] if seconds is not None else []
    argv = (
        ["ab", "-q", "-r", "-s", "20"]
        + timed  # before -n: ab's -t resets the count
        + ["-n", str(requests), "-c", str(concurrency), "-e", csv_path]
        + ["http://%s:%d%s" % (HOST, port, path)]
    )
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        raise BenchError(
            "ab exited with status %d: %s"
            % (done.returncode, (done.stderr.decode("utf-8", "replace") or output).strip()[-300:])
        )
    fields = dict(re.findall(r"^([A-Za-z0-9 -]+):\s+([0-9.]+)", output, re.M))
    complete = int(fields.get("Complete requests", 0))
    failed = int(fields.get("Failed requests", 0)) + int(fields.get("Non-2xx responses", 0))
    if seconds is None:
        failed += max(0, requests - complete)
    percentiles = {}
    with open(csv_path) as table:
        for line in table.read().splitlines()[1:]:
            served, ms = line.split(",")
            percentiles[int(float(served))] = float(ms)
    return AbResult(
        float(fields["Requests per second"]),
        percentiles[50],
        percentiles[99],
        failed,
        complete,
        int(fields.get("Keep-Alive requests", 0)),
    )


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")
    position = (len(ordered) - 1) * pct / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
