"""The set-up path a newcomer takes: scripts/venv, scripts/demo, the sdist.

scripts/venv runs here on a tiny project of its own (a copy of the script
beside a setup.py without dependencies), so each case costs one pip upgrade
and one small install instead of gevent and cryptography; CI runs the real
thing, README's two set-up commands, on Debian's externally managed python3.
The hosts it must handle are made real where this machine has them (pyenv's
3.6 for CentOS 8, /usr/bin/python3 for Debian 12) and, for a Debian without
python3-venv or without pip, by a python3 wrapper that fails the way Debian's
does.
"""

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path

import pytest

from support import find_python, wait_until

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo"
VENV_SCRIPT = REPO / "scripts" / "venv"
PAGE = "hello from the private service behind the tunnel"
DEBIAN_PYTHON = "/usr/bin/python3"

# What Debian's python3 prints for `python3 -m venv DIR` without python3-venv.
NO_ENSUREPIP = """\
#!/bin/sh
# python3 on a Debian without python3-venv{no_pip}
if [ "$1 $2" = "-m venv" ] && [ "$3" != "--without-pip" ]; then
    mkdir -p "$3/bin"
    echo "The virtual environment was not created successfully because ensurepip is not"
    echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv"
    echo "package using the following command."
    exit 1
fi
{pip_refused}exec {python} "$@"
"""
PIP_REFUSED = """if [ "$1 $2" = "-m pip" ]; then
    echo "/usr/bin/python3: No module named pip" >&2
    exit 1
fi
"""


def run(argv, timeout, **kwargs):
    return subprocess.run([str(part) for part in argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def env_with(**changes):
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({key: str(value) for key, value in changes.items()})
    return env


# -- scripts/demo ----------------------------------------------------------------------

@pytest.fixture
def demo_tmp(tmp_path):
    """TMPDIR for the demo: empty afterwards if it cleaned up."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    return folder


def test_demo_without_the_package_fails_at_once_with_the_childs_error(tmp_path, demo_tmp):
    bare = tmp_path / "bare"
    venv.create(str(bare), with_pip=False)  # this Python, nothing installed
    started = time.monotonic()
    # From the checkout, as a newcomer runs it: the package's source is found,
    # its dependencies are not.
    result = run([bare / "bin" / "python", DEMO], timeout=30, cwd=str(REPO),
                 env=env_with(TMPDIR=demo_tmp))
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout
    assert took < 5, "the demo took %.1fs to notice its server had exited" % took
    assert "demo failed: the nodepass server exited (status 1)" in result.stdout
    assert "ModuleNotFoundError: No module named" in result.stdout  # the child's own error
    assert "run  scripts/venv && .venv/bin/python scripts/demo" in result.stdout
    assert "Connection refused" not in result.stdout
    assert list(demo_tmp.iterdir()) == []


def test_demo_with_tls_2_fetches_the_page_through_a_verified_tunnel(demo_tmp):
    result = run([sys.executable, DEMO, "--tls", "2"], timeout=60, cwd=str(REPO),
                 env=env_with(TMPDIR=demo_tmp))
    assert result.returncode == 0, result.stdout
    assert "through the tunnel ->\n  " + PAGE in result.stdout
    assert "tls=2" in result.stdout and "SSL_CERT_FILE=" in result.stdout
    assert list(demo_tmp.iterdir()) == []


def test_demo_stopped_by_ctrl_c_stops_its_processes_and_removes_its_folder(demo_tmp):
    log = demo_tmp.parent / "demo.out"
    with open(str(log), "w") as out:
        demo = subprocess.Popen([sys.executable, str(DEMO), "--tls", "0", "--keep"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
                                env=env_with(TMPDIR=demo_tmp), stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: "Tunnel running" in log.read_text() or demo.poll() is not None,
                   timeout=30, what="the demo's tunnel")
        assert demo.poll() is None, log.read_text()
        folders = list(demo_tmp.iterdir())
        assert len(folders) == 1 and (folders[0] / "server.log").exists()
        pids = children_of(demo.pid)
        assert len(pids) == 3, pids  # web server, nodepass server, nodepass client
        demo.send_signal(signal.SIGINT)
        assert demo.wait(20) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert list(demo_tmp.iterdir()) == []
    assert [pid for pid in pids if os.path.exists("/proc/%d" % pid)] == []


def children_of(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as children:
        return [int(child) for child in children.read().split()]


# -- scripts/venv ------------------------------------------------------------------------

@pytest.fixture
def tiny_checkout(tmp_path):
    """A checkout with scripts/venv and a project without dependencies."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(str(VENV_SCRIPT), str(checkout / "scripts" / "venv"))
    (checkout / "tiny.py").write_text("ANSWER = 42\n")
    (checkout / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='tiny', version='1.0', py_modules=['tiny'], extras_require={'test': []})\n")
    return checkout


def fake_debian_python(folder: Path, with_pip: bool) -> Path:
    wrapper = folder / "python3"
    wrapper.write_text(NO_ENSUREPIP.format(
        python=DEBIAN_PYTHON, no_pip="" if with_pip else " and without python3-pip",
        pip_refused="" if with_pip else PIP_REFUSED))
    wrapper.chmod(0o755)
    return wrapper


def venv_script(checkout, *args, **env):
    return run([checkout / "scripts" / "venv"] + list(args), timeout=300,
               env=env_with(**env), cwd=str(checkout.parent))


def tiny_answer(checkout):
    return run([checkout / ".venv" / "bin" / "python", "-c", "import tiny; print(tiny.ANSWER)"],
               timeout=30, cwd="/").stdout.strip()


@pytest.fixture
def debian_python():
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.fail("no %s: these cases need a Debian python3" % DEBIAN_PYTHON, pytrace=False)
    if run([DEBIAN_PYTHON, "-m", "pip", "--version"], timeout=30).returncode != 0:
        pytest.fail("%s has no pip: apt-get install python3-pip" % DEBIAN_PYTHON, pytrace=False)
    return DEBIAN_PYTHON


def test_venv_without_ensurepip_uses_the_system_pip_and_is_reused(tiny_checkout, tmp_path,
                                                                 debian_python):
    python = fake_debian_python(tmp_path, with_pip=True)
    first = venv_script(tiny_checkout, "--test", PYTHON=python)
    assert first.returncode == 0, first.stdout
    assert "using the system's pip in a venv with --system-site-packages" in first.stdout
    config = (tiny_checkout / ".venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in config
    assert tiny_answer(tiny_checkout) == "42"
    made = (tiny_checkout / ".venv" / "pyvenv.cfg").stat().st_mtime_ns

    again = venv_script(tiny_checkout, PYTHON=python)
    assert again.returncode == 0, again.stdout
    assert "reusing %s" % (tiny_checkout / ".venv") in again.stdout
    assert "making" not in again.stdout
    assert (tiny_checkout / ".venv" / "pyvenv.cfg").stat().st_mtime_ns == made
    assert tiny_answer(tiny_checkout) == "42"


def test_venv_without_ensurepip_or_pip_names_the_package_to_install(tiny_checkout, tmp_path,
                                                                   debian_python):
    python = fake_debian_python(tmp_path, with_pip=False)
    result = venv_script(tiny_checkout, PYTHON=python)
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("scripts/venv: error: ") and "apt-get install python3-venv" in last
    assert "Traceback" not in result.stdout
    assert not (tiny_checkout / ".venv").exists()


def test_venv_on_python_3_6_upgrades_pip_before_installing(tiny_checkout):
    python = find_python(6)
    assert python, "Python 3.6 (pyenv) is missing: it stands for CentOS/RHEL 8"
    result = venv_script(tiny_checkout, PYTHON=python)
    assert result.returncode == 0, result.stdout
    assert tiny_answer(tiny_checkout) == "42"
    pip = run([tiny_checkout / ".venv" / "bin" / "python", "-m", "pip", "--version"], timeout=30)
    # 3.6's ensurepip brings pip 18.1 (CentOS 8: 9.0.3); 21.3.1 is its last.
    assert pip.stdout.startswith("pip 21.3.1 "), pip.stdout


def test_venv_refuses_an_unknown_option_in_one_line(tiny_checkout):
    result = venv_script(tiny_checkout, "--tset")
    assert result.returncode == 1
    assert result.stdout.strip() == ("scripts/venv: error: unknown option '--tset' "
                                     "(usage: scripts/venv [--test])")


# -- the source distribution -------------------------------------------------------------

def test_sdist_carries_the_tests_docs_scripts_and_licence(tmp_path):
    """What an unpacked sdist needs to run its own tests (CI runs them from one)."""
    source = tmp_path / "source"  # a copy: the build writes egg-info beside setup.py
    shutil.copytree(str(REPO), str(source), ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".vagrant"))
    result = run([sys.executable, "setup.py", "-q", "sdist", "-d", tmp_path / "dist"],
                 timeout=120, cwd=str(source))
    assert result.returncode == 0, result.stdout
    import nodepass_gevent
    archive = tmp_path / "dist" / ("nodepass_gevent-%s.tar.gz" % nodepass_gevent.__version__)
    with tarfile.open(str(archive)) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        info = sdist.extractfile("nodepass_gevent-%s/PKG-INFO"
                                 % nodepass_gevent.__version__).read().decode()
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "tests/support.py",
                   "tests/conftest.py", "tests/legacy_python.py", "tests/reference_peer.py",
                   "docs/protocol.md", "scripts/demo", "scripts/venv", "scripts/nodepass-service",
                   "scripts/build-pyz", "scripts/pyz_bootstrap.py"):
        assert needed in names, needed
    assert not [name for name in names if "__pycache__" in name]
    # The index page: README without links that lead nowhere there.
    assert "Version: %s" % nodepass_gevent.__version__ in info
    assert "](docs/" not in info and "](#" not in info
    assert "Programming Language :: Python :: 3.14" in info
