"""scripts/build-pyz: the one-file zipapp builds, and a tunnel runs from it.

Both ends of the tunnel run from the built nodepass.pyz, with an echo target
in this process; the bytes must come back through the tunnel.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import pytest

from support import (FAST_ENV, find_python, HOST, EchoServer, NodepassProcess, echo_works, free_port,
                     stop_all, tcp_exchange, wait_until)

REPO = Path(__file__).resolve().parent.parent
BUILD_PYZ = REPO / "scripts" / "build-pyz"

# -S: no site-packages, as on a host that has only Python; whatever runs must
# come from inside the zipapp.
RUN_PYZ = [sys.executable, "-S"]

pytestmark = pytest.mark.timeout(300)


class PyzProcess(NodepassProcess):
    """NodepassProcess, started as `python -S nodepass.pyz URL`, not `-m nodepass_gevent`."""

    def __init__(self, pyz: Path, url: str, env: Dict[str, str]) -> None:
        self.url = url
        self._log = tempfile.NamedTemporaryFile(prefix="nodepass-pyz-", suffix=".log",
                                                delete=False)
        self.proc = subprocess.Popen(RUN_PYZ + [str(pyz), url], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pyz_env(tmp_path_factory) -> Dict[str, str]:
    """The environment to run the zipapp in: it unpacks into SHIV_ROOT, not ~/.shiv.

    PYTHONPATH is dropped so that only what the zipapp carries can be imported.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["SHIV_ROOT"] = str(tmp_path_factory.mktemp("shiv-root"))
    return env


@pytest.fixture(scope="module")
def pyz(tmp_path_factory, pyz_env) -> Path:
    output = tmp_path_factory.mktemp("pyz") / "nodepass.pyz"
    started = time.monotonic()
    build = subprocess.run([str(BUILD_PYZ), "--output", str(output), "--python", sys.executable],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=240)
    seconds = time.monotonic() - started
    assert build.returncode == 0, build.stdout[-3000:]
    print("build-pyz took %.1fs, %d bytes" % (seconds, output.stat().st_size))
    # Unpack once here, so the server and client below do not race to do it.
    version = subprocess.run(RUN_PYZ + [str(output), "--version"], env=pyz_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=60)
    assert version.returncode == 0 and "nodepass-gevent" in version.stdout, version.stdout
    return output


@pytest.fixture
def pyz_processes():
    started: List[NodepassProcess] = []
    yield started
    stop_all(started)


def test_pyz_is_one_executable_file_for_this_python(pyz):
    assert os.access(str(pyz), os.X_OK)
    with open(str(pyz), "rb") as archive:
        shebang = archive.readline().decode()
    assert shebang == "#!/usr/bin/env python%d.%d\n" % sys.version_info[:2]


def test_tunnel_runs_from_the_pyz(pyz, pyz_env, pyz_processes):
    echo = EchoServer()
    try:
        tunnel_port, user_port = free_port(), free_port()
        env = dict(pyz_env, **FAST_ENV)
        server = PyzProcess(pyz, "server://%s:%d/%s:%d?log=debug" % (
            HOST, tunnel_port, HOST, user_port), env)
        pyz_processes.append(server)
        client = PyzProcess(pyz, "client://%s:%d/%s:%d?log=debug" % (
            HOST, tunnel_port, HOST, echo.port), env)
        pyz_processes.append(client)
        try:
            wait_until(lambda: echo_works(user_port), 20, interval=0.2,
                       what="traffic through the tunnel")
        except AssertionError:
            raise AssertionError("server log:\n%s\nclient log:\n%s" % (
                server.output()[-3000:], client.output()[-3000:])) from None
        payload = os.urandom(256 * 1024)
        assert tcp_exchange(user_port, payload) == payload
        assert server.stop() == 0 and client.stop() == 0
    finally:
        echo.close()


def test_pyz_refuses_another_python_plainly(pyz, pyz_env):
    other = next(filter(None, (find_python(minor) for minor in range(8, 14)
                               if minor != sys.version_info[1])), None)
    if other is None:
        pytest.skip("no Python 3.x of another minor version on this machine")
    result = subprocess.run([other, str(pyz), "--version"], env=pyz_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    assert result.returncode != 0
    assert "nodepass.pyz: built for Python %d.%d" % sys.version_info[:2] in result.stdout
