"""The master's state directory: its API key and its instances, kept on disk.

Where: the master URL's ``state=DIR``, else systemd's ``$STATE_DIRECTORY``
(the first of its colon-separated list), else ``/var/lib/nodepass-gevent``
for root and ``$XDG_STATE_HOME/nodepass-gevent`` (``~/.local/state/...``)
for anyone else. It holds one JSON file, ``master.json``:

    {"key": "<32 hex>", "mid": "<16 hex>", "alias": "", "instances": [{...}, ...]}

Every save writes a temporary file beside it (mode 0600), fsyncs it, renames
it over the old one and fsyncs the directory: a SIGTERM or a kill -9 at any
moment leaves either the old file or the new one, never half of one.
"""

import binascii
import json
import os
from typing import Mapping, Optional

STATE_FILE = "master.json"
APP_NAME = "nodepass-gevent"


class StateError(Exception):
    """The state directory cannot be made, read or written (one line)."""


def default_directory(environ: Optional[Mapping[str, str]] = None) -> str:
    environ = os.environ if environ is None else environ
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    if os.geteuid() == 0:
        return os.path.join("/var/lib", APP_NAME)
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                         ".local", "state")
    return os.path.join(base, APP_NAME)


def new_key() -> str:
    return binascii.hexlify(os.urandom(16)).decode("ascii")


def new_master_id() -> str:
    return binascii.hexlify(os.urandom(8)).decode("ascii")


class MasterState:
    """The loaded state; ``save()`` after each change. ``created_key`` is True
    when this start made the key (so the master logs it, as v1.14 does)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)
        self.key, self.mid, self.alias = "", "", ""
        self.instances = []  # list of dicts, in creation order
        self.created_key = False
        self.last_error = ""  # why the last save failed ("" when it worked)

    def load(self) -> "MasterState":
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateError("cannot make the state directory %s: %s"
                             % (self.directory, exc.strerror or exc)) from None
        data = self._read()
        self.key = str(data.get("key") or "")
        self.mid = str(data.get("mid") or "")
        self.alias = str(data.get("alias") or "")
        self.instances = [item for item in data.get("instances") or []
                          if isinstance(item, dict) and item.get("id") and item.get("url")]
        if len(self.key) != 32:
            self.key, self.created_key = new_key(), True
        if not self.mid:
            self.mid = new_master_id()
        self.save()
        return self

    def _read(self) -> dict:
        try:
            with open(self.path, "r", encoding="utf-8") as stream:
                data = json.load(stream)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError("cannot read the state file %s: %s (move it away to start"
                             " afresh)" % (self.path, getattr(exc, "strerror", None) or exc)
                             ) from None
        if not isinstance(data, dict):
            raise StateError("the state file %s is not a JSON object" % self.path)
        return data

    def save(self) -> None:
        data = {"key": self.key, "mid": self.mid, "alias": self.alias,
                "instances": self.instances}
        try:
            write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            self.last_error = ("cannot write the state file %s: %s"
                               % (self.path, exc.strerror or exc))
            raise StateError(self.last_error) from None
        self.last_error = ""


def write_atomically(path: str, text: str) -> None:
    """Temporary file (0600), fsync, rename over ``path``, fsync the directory."""
    temporary = "%s.tmp.%d" % (path, os.getpid())
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
