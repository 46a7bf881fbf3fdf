"""Where things live: the paths a unit names, and where --root puts them on this disk."""

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional

# The folder holding this package: a checkout (scripts/nodepass-service runs
# this module from there), or the site-packages pip installed it into.
CHECKOUT = Path(__file__).resolve().parents[3]  # nodepass_gevent/ops/servicectl/layout.py
PACKAGE_NAME = "nodepass-gevent"
DEFAULT_PREFIX = "/opt/nodepass-gevent"
DEFAULT_USER = "nodepass"
UNIT_DIR = PurePosixPath("/etc/systemd/system")
CONFIG_DIR = PurePosixPath("/etc/nodepass")
RECORD = CONFIG_DIR / "install.json"  # what install chose: prefix, user, source, pyz
# Where a pyz install unpacks its compiled parts: the unit's CacheDirectory=,
# which systemd creates for the service user and leaves writable under
# ProtectSystem=strict.
CACHE_NAME = "nodepass-gevent"
CACHE_DIR = PurePosixPath("/var/cache") / CACHE_NAME
# A master's state (API key, instances): StateDirectory=nodepass-gevent/NAME,
# which systemd makes for the service user and the master finds in
# $STATE_DIRECTORY. MASTER_STATE_FILE is ops/masterstate.py's STATE_FILE.
STATE_ROOT = PurePosixPath("/var/lib") / CACHE_NAME
MASTER_STATE_FILE = "master.json"
SYSTEM_PYTHON = "/usr/bin/python3"
PYZ_MANIFEST = "nodepass-pyz.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The environment file's line for a tunnels-file instance (instead of NODEPASS_URL).
CONFIG_VARIABLE = "NODEPASS_CONFIG"
# A client verifying a tls=2 server against a private CA needs these.
PATH_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")
# The shared key: kept in the 0640 environment file, off the command line.
SECRET_VARIABLES = ("NODEPASS_KEY",)
# Paths the unit's sandbox hides: PrivateTmp=yes gives the service its own
# /tmp and /var/tmp, PrivateDevices=yes its own /dev.
HIDDEN_PREFIXES = ("/tmp", "/var/tmp", "/dev")
# Paths ProtectHome= hides; a certificate there is bind-mounted back in.
HOME_PREFIXES = ("/home", "/root", "/run/user")


class Layout:
    """Paths as the managed system sees them, and where they are on this disk.

    Unit files must name system paths (/opt/...), while with --root the files
    themselves go under DIR: `system` paths are the former, `disk()` the latter.
    """

    def __init__(self, root: Optional[str], prefix: str, user: str,
                 python: Optional[str] = None) -> None:
        self.root = Path(root).resolve() if root else None
        self.prefix = PurePosixPath(prefix)
        self.user = user
        self.venv = self.prefix / "venv"
        self.nodepass = self.venv / "bin" / "nodepass"
        self.pyz = self.prefix / "nodepass.pyz"
        # The interpreter that runs the pyz: set for a pyz install, else None.
        self.python = PurePosixPath(python) if python else None
        self.cache = CACHE_DIR
        self.template = UNIT_DIR / "nodepass@.service"
        self.record = RECORD

    def disk(self, system_path: PurePosixPath) -> Path:
        if self.root is None:
            return Path(system_path)
        return self.root / system_path.relative_to("/")

    @staticmethod
    def unit(name: str) -> str:
        return "nodepass@{}.service".format(name)

    @staticmethod
    def env_file(name: str) -> PurePosixPath:
        return CONFIG_DIR / "{}.env".format(name)

    @staticmethod
    def tunnels_file(name: str) -> PurePosixPath:
        return CONFIG_DIR / "{}.tunnels".format(name)

    @staticmethod
    def state_dir(name: str) -> PurePosixPath:
        return STATE_ROOT / name

    @staticmethod
    def dropin_dir(name: str) -> PurePosixPath:
        return UNIT_DIR / "nodepass@{}.service.d".format(name)

    def names(self) -> List[str]:
        """Every tunnel, known by its environment file."""
        config_dir = self.disk(CONFIG_DIR)
        if not config_dir.is_dir():
            return []
        return sorted(p.stem for p in config_dir.glob("*.env")
                      if NAME_PATTERN.fullmatch(p.stem))

    def installed(self) -> bool:
        if self.python is not None:
            return self.disk(self.pyz).is_file()
        return os.access(str(self.disk(self.nodepass)), os.X_OK)

    def program(self) -> PurePosixPath:
        """What must exist for the units to run: the pyz, or the venv's script."""
        return self.pyz if self.python is not None else self.nodepass

    def exec_start(self) -> str:
        """The unit's command, before the URL (system paths)."""
        if self.python is not None:
            return "{} {}".format(self.python, self.pyz)
        return str(self.nodepass)

    def command(self) -> List[str]:
        """The same command, to run here (the interpreter is this machine's)."""
        if self.python is not None:
            return [str(self.python), str(self.disk(self.pyz))]
        return [str(self.disk(self.nodepass))]


def read_record(root: Optional[str]) -> Dict[str, object]:
    """What install remembered (prefix, user, source), or {} before install."""
    path = Layout(root, DEFAULT_PREFIX, DEFAULT_USER).disk(RECORD)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
