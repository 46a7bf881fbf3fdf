"""scripts/churn-cpu: issue 22's figure (tunnel CPU per churned connection) in seconds.

A short real run: nginx, a nodepass server and client, ab through them; the
script stops everything it started. Skipped without nginx or ab outside CI.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHURN_CPU = os.path.join(REPO_ROOT, "scripts", "churn-cpu")


@pytest.fixture
def nginx_and_ab():
    missing = [tool for tool in ("nginx", "ab") if not shutil.which(tool)]
    if missing and os.environ.get("CI") != "true":
        pytest.skip("scripts/churn-cpu needs %s" % ", ".join(missing))
    assert not missing, "CI must install %s" % ", ".join(missing)


def run(*args, timeout=60):
    done = subprocess.run([sys.executable, CHURN_CPU] + list(args), cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


@pytest.mark.timeout(90)
def test_churn_run_gives_cpu_per_request_of_both_processes(nginx_and_ab):
    out = run("-n", "150", "-c", "8", "--rounds", "1")
    round_line = re.search(r"round 1: (\d+) requests, server (\d+) \+ client (\d+) = (\d+) us",
                           out)
    assert round_line, out
    complete, server, client, total = (int(value) for value in round_line.groups())
    assert complete == 150
    assert server > 0 and client > 0 and total == pytest.approx(server + client, abs=1)
    assert re.search(r"median: \d+ us/request \(both tunnel processes, ab -c8 -n150\)", out), out


@pytest.mark.timeout(60)
def test_floor_compares_a_new_connection_with_a_kept_one():
    out = run("--floor")
    figures = dict(re.findall(r"^(new|kept) connection +([0-9.]+) us CPU each", out, re.M))
    assert set(figures) == {"new", "kept"}, out
    assert float(figures["new"]) > float(figures["kept"]) > 0
