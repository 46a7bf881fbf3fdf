"""Interpreters other than the test run's own, with nodepass-gevent installed.

A legacy host runs the tunnel on its own old Python: here, a venv on that
pyenv interpreter with this checkout pip-installed into it (a real,
non-editable install, as an operator would do it). The namespace suite runs
one side of a tunnel on the oldest supported Python and the other on the
newest, so that both directions of the version gap cross the NAT.

Interpreters are looked up under `pyenv root`, else $PYENV_ROOT, else
/root/.pyenv (versions/3.X.N/bin/python, the highest N). A missing one is a
test failure with a one-line reason, never a silent skip.
"""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
OLDEST = "3.6"   # RHEL/CentOS 8, Ubuntu 18.04
NEWEST = "3.13"
# The last pip each old Python can run (3.6's own pip 18.1 cannot install
# manylinux2014 wheels, and an unpinned upgrade fails there).
PIP_FOR = {"3.6": "pip==21.3.1", "3.7": "pip==24.0"}
# Variables that would make a venv's interpreter import something else.
FOREIGN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
# Not copied into the build tree: pip builds in the source tree (build/,
# *.egg-info), which must not land in the checkout.
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "*.pyz", ".vagrant")
STEP_TIMEOUT = 600.0


class LegacyPythonError(Exception):
    """An interpreter is missing or its venv could not be built (one line)."""


class Interpreter:
    """A Python that can run `python -m nodepass_gevent`.

    `isolated` ones live in a venv: their processes start in the venv's
    directory with PYTHONPATH and friends removed, so that the package they
    import is the venv's installed copy, not the checkout the tests run from.
    """

    def __init__(self, label: str, python: str, home: Optional[str] = None) -> None:
        self.label, self.python, self.home = label, python, home

    @property
    def isolated(self) -> bool:
        return self.home is not None

    def argv(self, *args: str) -> List[str]:
        return [self.python] + list(args)

    def environ(self, base: Dict[str, str]) -> Dict[str, str]:
        if not self.isolated:
            return dict(base)
        return {key: value for key, value in base.items() if key not in FOREIGN_ENV}

    def executable(self) -> str:
        """The real binary (what /proc/PID/exe of a running process resolves to)."""
        return os.path.realpath(self.python)

    def __repr__(self) -> str:
        return "Interpreter(%s, %s)" % (self.label, self.python)


def own_interpreter() -> Interpreter:
    """The Python running the tests, importing the package as they do."""
    return Interpreter("%d.%d" % sys.version_info[:2], sys.executable)


def pyenv_root() -> str:
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            out = subprocess.run([pyenv, "root"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("PYENV_ROOT") or "/root/.pyenv"


def find_python(minor: str) -> str:
    """The highest pyenv 3.X.N interpreter, or LegacyPythonError."""
    versions = Path(pyenv_root()) / "versions"
    pattern = re.compile(r"^%s\.(\d+)$" % re.escape(minor))
    found = []
    for entry in (versions.iterdir() if versions.is_dir() else []):
        match = pattern.match(entry.name)
        python = entry / "bin" / "python"
        if match and os.access(str(python), os.X_OK):
            found.append((int(match.group(1)), str(python)))
    if not found:
        raise LegacyPythonError("Python %s expected under %s but not found" % (minor, versions))
    return max(found)[1]


def _run(argv: Sequence[str], cwd: Path, env: Dict[str, str], log: Path, what: str) -> None:
    with open(str(log), "ab") as out:
        out.write(("\n$ %s\n" % " ".join(argv)).encode())
        out.flush()
        try:
            status = subprocess.run(list(argv), cwd=str(cwd), env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=STEP_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            status = "a timeout"
    if status != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise LegacyPythonError("%s failed with %s (log %s):\n%s"
                                % (what, status, log, "\n".join(tail)))


IMPORT_CHECK = ("import os, sys, nodepass_gevent; "
                "sys.exit(0 if os.path.realpath(nodepass_gevent.__file__)"
                ".startswith(os.path.realpath(sys.prefix) + os.sep) else "
                "'nodepass_gevent imported from ' + nodepass_gevent.__file__)")


def build_venv(minor: str, directory: Path) -> Interpreter:
    """A fresh venv on pyenv's Python `minor` with this checkout installed."""
    base = find_python(minor)
    directory.mkdir(parents=True, exist_ok=True)
    venv, source, log = directory / "venv", directory / "src", directory / "build.log"
    shutil.copytree(str(ROOT), str(source), ignore=COPY_IGNORE)
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    python = str(venv / "bin" / "python")
    _run([base, "-m", "venv", str(venv)], directory, env, log, "venv on Python %s" % minor)
    _run([python, "-m", "pip", "install", "-q", "-U", PIP_FOR.get(minor, "pip")],
         directory, env, log, "pip upgrade on Python %s" % minor)
    _run([python, "-m", "pip", "install", "-q", str(source)], directory, env, log,
         "pip install of the checkout on Python %s" % minor)
    # Run from the venv's directory, as the tunnel processes will be.
    _run([python, "-c", IMPORT_CHECK], venv, env, log,
         "import check on Python %s" % minor)
    return Interpreter(minor, python, home=str(venv))


def build_venvs(minors: Sequence[str], directory: Path) -> Dict[str, Interpreter]:
    """Venvs for several Pythons at once (mostly waiting on pip and the disk)."""
    with ThreadPoolExecutor(max_workers=len(minors)) as pool:
        futures = {minor: pool.submit(build_venv, minor, directory / ("python" + minor))
                   for minor in minors}
        return {minor: future.result() for minor, future in futures.items()}
