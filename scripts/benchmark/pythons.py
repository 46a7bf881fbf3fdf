"""The interpreters a tunnel runs on (--python, --pythons): probed once, each a mode."""

import collections
import json
import re
import subprocess
from typing import Dict, NamedTuple, Sequence, Tuple

from .peers import nodepass_env


# Run by each tunnel interpreter (any Python 3, so plain syntax): what it is, or why it
# cannot run nodepass_gevent, as one line of JSON.
INTERPRETER_PROBE = r"""
import json, os, platform, sys
info = {"version": platform.python_version(), "executable": sys.executable}
try:
    import gevent, greenlet, nodepass_gevent, nodepass_gevent.cli
    try:
        from nodepass_gevent.copy import relay, zerocopy
    except ImportError:  # a checkout from before the layers (one flat package)
        from nodepass_gevent import relay, zerocopy
except BaseException as exc:
    info["error"] = "%s: %s" % (type(exc).__name__, exc)
    print(json.dumps(info))
    sys.exit(0)
info["package"] = os.path.dirname(os.path.abspath(nodepass_gevent.__file__))
info["gevent"] = gevent.__version__
info["greenlet"] = getattr(greenlet, "__version__", "?")
try:
    info["engine"] = "user space (splice refused)"
    if not hasattr(zerocopy, "candidates"):  # a checkout from before the engine choice
        info["engine"] = "os.splice" if getattr(zerocopy, "AVAILABLE", False) else "user space"
    for name, splice in getattr(zerocopy, "candidates", list)():
        if zerocopy.probe(splice) is None:
            info["engine"] = name
            break
except Exception as exc:
    info["engine"] = "unknown (%s: %s)" % (type(exc).__name__, exc)
print(json.dumps(info))
"""


class Interpreter(NamedTuple):
    """A Python that runs tunnel processes, as it described itself."""

    path: str
    version: str  # e.g. "3.6.15"
    package: str  # where nodepass_gevent was imported from
    gevent: str
    greenlet: str
    engine: str  # how its relay moves plain TCP bytes: os.splice, ctypes, user space

    @property
    def version_tuple(self) -> Tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    def describe(self) -> str:
        return "Python %s (`%s`): gevent %s, greenlet %s, relay engine %s, package from `%s`" % (
            self.version,
            self.path,
            self.gevent,
            self.greenlet,
            self.engine,
            self.package,
        )


class InterpreterError(Exception):
    """A --python/--pythons interpreter that cannot run the tunnel (one line)."""


def probe_interpreter(path: str) -> Interpreter:
    """Ask path what it is and whether it imports nodepass_gevent from this checkout."""
    try:
        done = subprocess.run(
            [path, "-c", INTERPRETER_PROBE],
            env=nodepass_env({}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise InterpreterError("%s cannot be run: %s" % (path, exc))
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        info = json.loads(lines[-1])
    except (IndexError, ValueError):
        errors = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise InterpreterError(
            "%s is not a Python 3 that can run the bench's probe (%s)"
            % (path, errors[-1] if errors else "status %d" % done.returncode)
        )
    if "error" in info:
        raise InterpreterError(
            "%s (Python %s) cannot import nodepass_gevent: %s"
            % (path, info["version"], info["error"])
        )
    return Interpreter(
        path, info["version"], info["package"], info["gevent"], info["greenlet"], info["engine"]
    )


def python_modes(interpreters: Sequence[Interpreter]) -> Dict[str, Interpreter]:
    """One tls=0 tunnel mode per interpreter, in the order given: "py36", "py313" (and
    "py36-2" for a second 3.6)."""
    modes: Dict[str, Interpreter] = collections.OrderedDict()
    for interpreter in interpreters:
        name = "py" + "".join(str(part) for part in interpreter.version_tuple[:2])
        unique, count = name, 1
        while unique in modes:
            count += 1
            unique = "%s-%d" % (name, count)
        modes[unique] = interpreter
    return modes


def newest_mode(modes: Dict[str, Interpreter]) -> str:
    """The mode of the highest Python version (the last given of equals)."""
    best = None
    for mode, interpreter in modes.items():
        if best is None or interpreter.version_tuple >= modes[best].version_tuple:
            best = mode
    return best
