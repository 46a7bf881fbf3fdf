"""--profile: py-spy records the tunnel processes during an extra, unmeasured
run of a workload, and the report gets the top frames.
"""

import collections
import os
import re
import shutil
import signal
import subprocess
import time
from typing import List, Sequence, Tuple

from .base import BenchError, say
from .runner import Bench
from .targets import Route
from .workloads import WORKLOADS


# --------------------------------------------------------------------------
# Profiling with py-spy (--profile).


class PySpy:
    """py-spy recording every relay process of a route while the block runs."""

    def __init__(self, bench: Bench, route: Route, label: str) -> None:
        self.bench = bench
        self.route = route
        self.label = label
        self.recorders: List[Tuple[str, subprocess.Popen, str]] = []
        self.started = 0.0

    def __enter__(self) -> "PySpy":
        for role, proc in self.route.roles:
            output = os.path.join(
                self.bench.workdir, "profile-%s-%s-%s.txt" % (self.label, self.route.mode, role)
            )
            argv = [
                "py-spy",
                "record",
                "--pid",
                str(proc.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                # Only samples of a thread holding the GIL: py-spy cannot tell idle
                # waits apart on Python < 3.9 and counted gevent's idle threadpool
                # worker and the hub's sleep as busy there.
                "--gil",
                "--output",
                output,
            ]
            self.recorders.append((role, self.bench.procs.start("py-spy-%s" % role, argv), output))
        time.sleep(1.0)  # py-spy needs a moment to attach
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        seconds = time.monotonic() - self.started
        for role, recorder, output in self.recorders:
            if recorder.poll() is None:
                os.kill(recorder.pid, signal.SIGINT)  # py-spy writes its output on Ctrl-C
                try:
                    recorder.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            self.bench.procs.stop(recorder)
            self.bench.profiles.append(
                summarise_profile(
                    "workload %s, %s, %s" % (self.label, self.bench.title(self.route.mode), role),
                    output,
                    seconds,
                    250,
                )
            )


def summarise_profile(title: str, path: str, seconds: float, rate: int, top: int = 12) -> str:
    """Top frames of a py-spy raw (collapsed stacks) file: self time and inclusive time."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    try:
        with open(path) as stacks:
            for line in stacks:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
                frames = [frame for frame in frames if not frame.startswith("process ")]
                if not frames:
                    continue
                total += int(count)
                own[frames[-1]] += int(count)
                for frame in set(frames):
                    inclusive[frame] += int(count)
    except OSError as exc:
        return "### %s\n\nno profile: %s\n" % (title, exc)
    if not total:
        return "### %s\n\nno samples\n" % title
    busy = 100.0 * total / max(1.0, seconds * rate)
    lines = [
        "### %s" % title,
        "",
        "%d samples over %.0f s: holding the GIL (running Python) about %.0f%% of the time (other samples are not recorded)."
        % (total, seconds, busy),
        "",
        "```",
        "self%   frame (own time)",
    ]
    lines += ["%5.1f   %s" % (100.0 * n / total, frame) for frame, n in own.most_common(top)]
    lines += ["", "incl%   frame (with callees; nodepass_gevent only)"]
    ours = [(frame, n) for frame, n in inclusive.most_common() if "nodepass_gevent" in frame]
    lines += ["%5.1f   %s" % (100.0 * n / total, frame) for frame, n in ours[:top]]
    lines += ["```", ""]
    return "\n".join(lines)


def profile_workloads(bench: Bench, pairs: Sequence[Tuple[int, str]]) -> None:
    if not shutil.which("py-spy"):
        bench.note("--profile: py-spy is not installed (pip install py-spy); no profiles taken")
        return
    for number, mode in pairs:
        workload = WORKLOADS[number]
        say("profiling workload %d (%s) on %s" % (number, workload.name, mode))
        try:
            with bench.route(mode, bench.target(workload.target)) as route:
                with PySpy(bench, route, "%d (%s)" % (number, workload.name)):
                    workload.measure(bench, route)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            bench.note("profile of workload %d on %s failed: %s" % (number, mode, exc))
