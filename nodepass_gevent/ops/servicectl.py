"""Manage nodepass-gevent tunnels as systemd services.

Each instance of the template unit nodepass@.service runs one tunnel (a URL)
or a whole tunnels file (--config: many tunnels in one process, reloaded live),
configured by its own environment file /etc/nodepass/NAME.env (the URL and the
tuning variables), /etc/nodepass/NAME.tunnels for a tunnels file, and, when
needed, drop-ins in nodepass@NAME.service.d/.

usage:
  nodepass-service [GLOBAL OPTIONS]                  interactive menu (on a terminal)
  nodepass-service [GLOBAL OPTIONS] COMMAND [ARGS]

commands:
  install [--source SRC] [--python PY] [--system-site-packages] [--pip-arg ARG]...
                 pip-install the package into PREFIX/venv, create the service
                 user (--user; unless it exists), write the template unit
  install --pyz FILE [--python PY]
                 for a host without pip: copy nodepass.pyz (scripts/build-pyz)
                 to PREFIX/nodepass.pyz, to be run by PY (default
                 /usr/bin/python3: any CPython 3.6 to 3.13); it unpacks into
                 /var/cache/nodepass-gevent, the unit's CacheDirectory; creates
                 the service user as install does
  create NAME URL [--env KEY=VALUE]... [--force] [--no-start]
                 a tunnel as a service, enabled at boot and started; creates
                 the service user too if it does not exist (a tunnel made
                 before install, or a user removed since)
  create NAME --config FILE [--metrics HOST:PORT] [--env KEY=VALUE]...
         [--force] [--no-start]
                 every tunnel of a tunnels file (see nodepass --help) in one
                 service (Type=notify: started once every tunnel is up);
                 FILE is copied to /etc/nodepass/NAME.tunnels
  reload NAME [--config FILE]
                 re-read the tunnels file (replaced by FILE, checked first)
                 and tls=2 certificates without a restart (SIGHUP)
  start|stop|restart|status NAME
  list           every tunnel with its state and URL
  delete NAME    stop, disable and remove a tunnel
  update [--source SRC | --pyz FILE]
                 upgrade the package (or replace the pyz), then restart the
                 running tunnels
  uninstall [--purge]
                 remove the package and the template unit; --purge also deletes
                 every tunnel, /etc/nodepass and the service user

global options:
  --root DIR     write everything under DIR instead of /, and never run
                 systemctl, useradd or userdel (print them instead). Users
                 are this host's: each of install, install --pyz and create
                 prints the useradd it would run, or says the user exists
  --prefix DIR   installation prefix (default /opt/nodepass-gevent, or the
                 one recorded by install)
  --user NAME    unprivileged user the tunnels run as (default nodepass)

exit status: 0 done, 1 failed (unknown tunnel, a command failed), 2 bad input
(bad name, bad URL, bad variable).
"""

import argparse
import enum
import functools
import grp
import importlib
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Dict, List, Optional, Sequence

PROG = "nodepass-service"
# The folder holding this package: a checkout (scripts/nodepass-service runs
# this module from there), or the site-packages pip installed it into.
CHECKOUT = Path(__file__).resolve().parent.parent.parent  # nodepass_gevent/ops/servicectl.py
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
SYSTEM_PYTHON = "/usr/bin/python3"
PYZ_MANIFEST = "nodepass-pyz.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The seed's tuning variables, their defaults and their parsing are the
# package's (nodepass_gevent.config.SETTINGS): see package_config().
# What a variable of each kind must look like, for the error line.
EXPECTED_VALUE = {"int": "a positive integer",
                  "duration": "a duration like 500ms, 5s or 1m30s, above zero"}
# Bootstrap: install writes the template before this Python may be able to
# import the package; the template's stop timeout then assumes the package's
# SHUTDOWN_TIMEOUT default. Each tunnel's stop.conf, written by create with
# the package, sets its own.
BOOTSTRAP_SHUTDOWN_TIMEOUT_MS = 5000
# The environment file's line for a tunnels-file instance (instead of NODEPASS_URL).
CONFIG_VARIABLE = "NODEPASS_CONFIG"
# A client verifying a tls=2 server against a private CA needs these.
PATH_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")
# The shared key: kept in the 0640 environment file, off the command line.
SECRET_VARIABLES = ("NODEPASS_KEY",)

# systemd kills the tunnel this long after SHUTDOWN_TIMEOUT: the drain itself
# takes up to SHUTDOWN_TIMEOUT, the interpreter needs a moment to exit after.
STOP_MARGIN_MS = 5000

# Paths the unit's sandbox hides: PrivateTmp=yes gives the service its own
# /tmp and /var/tmp, PrivateDevices=yes its own /dev.
HIDDEN_PREFIXES = ("/tmp", "/var/tmp", "/dev")
# Paths ProtectHome= hides; a certificate there is bind-mounted back in.
HOME_PREFIXES = ("/home", "/root", "/run/user")


class Status(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2


class ServiceError(Exception):
    """A one-line message for the operator and the exit status that goes with it."""

    def __init__(self, message: str, status: Status = Status.FAILED) -> None:
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print("{}: warning: {}".format(PROG, message), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Where things live

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


# --------------------------------------------------------------------------
# Files

def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Readers (systemd, a concurrent list) see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        os.replace(temp, str(path))
    except BaseException:
        os.unlink(temp)
        raise


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_env_file(path: Path) -> Dict[str, str]:
    """KEY=VALUE lines, values optionally quoted, as systemd reads them (simple cases)."""
    values = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not match:
            continue
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


# --------------------------------------------------------------------------
# The package's own parsing

_PACKAGE = {}  # type: Dict[str, Optional[ModuleType]]


def package_config(layout: Layout) -> Optional[ModuleType]:
    """nodepass_gevent.config, or None if this Python cannot import it.

    Looked for in this checkout first (the code this script came with), then
    wherever this Python finds it, then in what install put under PREFIX: the
    venv, or the pyz (whose pure-Python parts zipimport can read).
    """
    if "config" not in _PACKAGE:
        _PACKAGE["config"] = None
        for paths in package_locations(layout):
            config = import_config(paths)
            if config is not None:
                _PACKAGE["config"] = config
                break
    return _PACKAGE["config"]


def package_locations(layout: Layout) -> List[List[str]]:
    locations = [[]]  # type: List[List[str]]
    if (CHECKOUT / "nodepass_gevent" / "config.py").is_file():
        locations.insert(0, [str(CHECKOUT)])
    venv = layout.disk(layout.venv)
    locations += [[str(site)] for site in sorted(venv.glob("lib/python3*/site-packages"))]
    pyz = layout.disk(layout.pyz)
    if pyz.is_file():
        locations.append(pyz_pure_folders(pyz))
    return locations


def pyz_pure_folders(pyz: Path) -> List[str]:
    """The pyz's wheel folders holding the package and, for 3.6, dataclasses."""
    try:
        with zipfile.ZipFile(str(pyz)) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return []
    folders = set()
    for name in names:
        for module in ("/nodepass_gevent/config.py", "/dataclasses.py"):
            if name.startswith("wheels/") and name.endswith(module):
                folders.add(str(pyz / name[:-len(module)]))
    return sorted(folders)


def import_config(paths: List[str]) -> Optional[ModuleType]:
    """nodepass_gevent.config found first in ``paths``; None (and sys.path as it
    was) if it does not import or is too old to have the settings table."""
    sys.path[:0] = paths
    try:
        from nodepass_gevent import config
        if hasattr(config, "SETTINGS"):
            return config
    except (ImportError, SyntaxError):  # missing dependencies, or a Python too old for it
        pass
    del sys.path[:len(paths)]
    for name in [name for name in sys.modules if name.split(".")[0] == "nodepass_gevent"]:
        del sys.modules[name]
    return None


def need_package(layout: Layout) -> ModuleType:
    config = package_config(layout)
    if config is None:
        raise ServiceError("{} cannot import nodepass_gevent (with its dependencies) from "
                           "this checkout, its path or {}: run `{} install` first".format(
                               sys.executable, layout.disk(layout.prefix), PROG))
    return config


def settings_by_name(config: ModuleType) -> Dict[str, object]:
    return {setting.name: setting for setting in config.SETTINGS}


def duration_ms(config: ModuleType, text: str) -> float:
    """A Go duration in milliseconds, parsed as the tunnel will parse it."""
    return config.parse_duration(text) * 1000


# --------------------------------------------------------------------------
# Validation

def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ServiceError("bad tunnel name {!r}: use 1-64 of A-Z a-z 0-9 _ -".format(name),
                           Status.USAGE)
    return name


def check_known(layout: Layout, name: str) -> str:
    check_name(name)
    if not layout.disk(layout.env_file(name)).exists():
        raise ServiceError("unknown tunnel {!r} (see: {} list)".format(name, PROG))
    return name


def check_safe_value(what: str, value: str) -> None:
    # Values are written single-quoted into the environment file, where
    # systemd takes everything literally up to the next quote.
    if "'" in value or any(ord(c) < 32 for c in value):
        raise ServiceError("{} must not contain quotes or control characters".format(what),
                           Status.USAGE)


def parse_env_assignments(config: ModuleType, assignments: Sequence[str]) -> Dict[str, str]:
    variables = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ServiceError("--env wants KEY=VALUE, got {!r}".format(assignment), Status.USAGE)
        check_variable(config, key, value)
        variables[key] = value
    return variables


def check_variable(config: ModuleType, key: str, value: str) -> None:
    settings = settings_by_name(config)
    if key in settings:
        setting = settings[key]
        try:
            setting.parse(value)  # the tunnel's own parsing (config.ConfigError is a ValueError)
        except ValueError:
            raise ServiceError("{} must be {}, got {!r}".format(
                key, EXPECTED_VALUE[setting.kind], value), Status.USAGE)
    elif key in PATH_VARIABLES:
        if not value.startswith("/"):
            raise ServiceError("{} must be an absolute path".format(key), Status.USAGE)
    elif key in SECRET_VARIABLES:
        if not value:
            raise ServiceError("{} must not be empty".format(key), Status.USAGE)
    elif key in choice_variables(config):
        choices = choice_variables(config)[key]
        if value.lower() not in choices:
            raise ServiceError("{} must be one of {}, got {!r}".format(
                key, ", ".join(choices), value), Status.USAGE)
    else:
        known = ", ".join(list(settings) + list(PATH_VARIABLES) + list(SECRET_VARIABLES)
                          + list(choice_variables(config)))
        raise ServiceError("unknown variable {!r}; known: {}".format(key, known), Status.USAGE)
    check_safe_value(key, value)


def choice_variables(config: ModuleType) -> Dict[str, Sequence[str]]:
    """Variables that take one of a few words, as far as the package found knows
    them: NODEPASS_LOG_FORMAT (text or json)."""
    if not hasattr(config, "LOG_FORMAT_VARIABLE"):  # a package older than log_format
        return {}
    return {config.LOG_FORMAT_VARIABLE: tuple(config.LOG_FORMATS)}


def check_url(layout: Layout, url: str, variables: Dict[str, str]) -> None:
    """Refuse a bad URL with the project's own validation, before anything is written."""
    check_safe_value("the URL", url)
    check_with_package(layout, [url], variables, "URL")


def check_tunnels_file(layout: Layout, path: str, metrics: Optional[str],
                       variables: Dict[str, str]) -> None:
    """`nodepass --check --config FILE`: the file as the service will read it."""
    if metrics is not None:
        check_safe_value("--metrics", metrics)
    extra = ["--metrics", metrics] if metrics else []
    check_with_package(layout, extra + ["--config", path], variables, "tunnels file")


def check_with_package(layout: Layout, arguments: List[str], variables: Dict[str, str],
                       what: str) -> None:
    if layout.installed():
        command = layout.command() + ["--check"] + arguments
    else:
        command = [sys.executable, "-m", "nodepass_gevent", "--check"] + arguments
    environment = dict(os.environ, **variables)
    try:
        result = subprocess.run(command, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServiceError("cannot validate the {} with {}: {}".format(what, command[0], error))
    if result.returncode == 0:
        return
    detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
    message = detail[-1] if detail else "exit status {}".format(result.returncode)
    if result.returncode == 2:
        raise ServiceError("{} refused: {}".format(what, message), Status.USAGE)
    raise ServiceError("cannot validate the {} ({}): {}".format(
        what, " ".join(command[:-1 - len(arguments)]), message))


def tunnelset_module() -> Optional[ModuleType]:
    """nodepass_gevent.tunnelset (per-tunnel settings, tunnels files), or None if
    the package found is older than it."""
    try:
        return importlib.import_module("nodepass_gevent.tunnelset")
    except ImportError:
        return None


def effective_settings(config: ModuleType, variables: Dict[str, str]) -> object:
    """The process-wide settings the instance gets from its --env variables."""
    names = settings_by_name(config)
    return config.load_settings({k: v for k, v in variables.items() if k in names})


class TunnelUrl:
    """What the unit needs to know about an already validated URL, read by the
    package's own URL parser (with the per-tunnel parameters, where it has them)."""

    def __init__(self, config: ModuleType, url: str, variables: Optional[Dict[str, str]] = None,
                 tunnel: object = None) -> None:
        tunnelset = tunnelset_module()
        if tunnel is None and tunnelset is not None:
            try:
                tunnel = tunnelset.parse_tunnel(url, effective_settings(config, variables or {}),
                                                "", {})
            except ValueError as error:  # config.ConfigError
                raise ServiceError("URL refused: {}".format(error), Status.USAGE)
        if tunnel is not None:
            parsed = tunnel.config
            # Its own SHUTDOWN_TIMEOUT (shutdown_timeout=) sets the stop timeout too.
            self.shutdown_seconds = tunnel.settings.shutdown_timeout  # type: Optional[float]
        else:
            try:
                parsed = config.parse_url(url, environ={})
            except ValueError as error:
                raise ServiceError("URL refused: {}".format(error), Status.USAGE)
            self.shutdown_seconds = None
        self.mode = parsed.role
        self.tls = str(parsed.tls_mode)
        self.crt = parsed.crt or ""
        self.key = parsed.key or ""
        # data_port= listens too (0: a random port above 1023; older packages lack it).
        self.ports = [parsed.tunnel.port, parsed.target.port, getattr(parsed, "data_port", 0)]

    def listens_below_1024(self) -> bool:
        # Only the server listens (tunnel and target ports); a client dials out.
        return self.mode == "server" and any(0 < port < 1024 for port in self.ports)

    def certificate_paths(self) -> List[str]:
        if self.tls != "2":
            return []
        return [path for path in (self.crt, self.key) if path]


class TunnelsFile:
    """What the unit needs to know about an already validated tunnels file:
    the same as TunnelUrl, for all its tunnels at once."""

    def __init__(self, config: ModuleType, path: str, variables: Dict[str, str]) -> None:
        tunnelset = tunnelset_module()
        if tunnelset is None:
            raise ServiceError("this nodepass_gevent has no tunnels files (--config): "
                               "update it first")
        try:
            tunnels = tunnelset.read_file(path, effective_settings(config, variables),
                                          environ={})
        except ValueError as error:
            raise ServiceError("tunnels file refused: {}".format(error), Status.USAGE)
        self.tunnels = [TunnelUrl(config, "", tunnel=tunnel) for tunnel in tunnels]
        # The longest drain any of its tunnels may take sets the stop timeout.
        self.shutdown_seconds = max(tunnel.settings.shutdown_timeout for tunnel in tunnels)

    def listens_below_1024(self) -> bool:
        return any(tunnel.listens_below_1024() for tunnel in self.tunnels)

    def certificate_paths(self) -> List[str]:
        return [path for tunnel in self.tunnels for path in tunnel.certificate_paths()]


def under(path: str, prefixes: Sequence[str]) -> bool:
    normal = os.path.normpath(path)
    return any(normal == p or normal.startswith(p + "/") for p in prefixes)


def check_certificate_paths(layout: Layout, tunnel: "TunnelUrl | TunnelsFile") -> None:
    for path in tunnel.certificate_paths():
        if under(path, HIDDEN_PREFIXES):
            raise ServiceError("{} is invisible to the service (it has a private /tmp, /var/tmp "
                               "and /dev): move it, e.g. to {}/".format(path, CONFIG_DIR),
                               Status.USAGE)
        if layout.root is None and not readable_by(path, layout.user):
            warn("{0} is not readable by user {1}: chgrp {1} {0} && chmod g+r {0}"
                 .format(path, layout.user))


def readable_by(path: str, user: str) -> bool:
    """Whether USER may read PATH by its mode bits (directories not considered)."""
    try:
        account = pwd.getpwnam(user)
        info = os.stat(path)
    except (KeyError, OSError):
        return True  # nothing useful to say
    if account.pw_uid == info.st_uid:
        return bool(info.st_mode & 0o400)
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if info.st_gid in groups:
        return bool(info.st_mode & 0o040)
    return bool(info.st_mode & 0o004)


# --------------------------------------------------------------------------
# What gets written

def render_template(layout: Layout) -> str:
    config = package_config(layout)
    shutdown_ms = BOOTSTRAP_SHUTDOWN_TIMEOUT_MS if config is None else duration_ms(
        config, settings_by_name(config)["SHUTDOWN_TIMEOUT"].default)
    stop_timeout = systemd_span(shutdown_ms + STOP_MARGIN_MS)
    return """\
# Written by {prog}: one nodepass-gevent tunnel per instance, nodepass@NAME,
# configured by {config}/NAME.env and drop-ins in nodepass@NAME.service.d/.
[Unit]
Description=nodepass-gevent tunnel %i
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
EnvironmentFile={config}/%i.env
# Log lines go to the journal as they are written, not in 8 KiB blocks.
Environment=PYTHONUNBUFFERED=1
{pyz_cache}ExecStart={exec_start} ${{NODEPASS_URL}}
# SIGHUP re-reads tls=2 certificates (and a tunnels file: see tunnels.conf).
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
# SIGTERM starts the graceful stop; each instance's stop.conf sets the
# timeout from its SHUTDOWN_TIMEOUT.
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}
# Two sockets per relayed connection plus the pool: well above 1024.
LimitNOFILE=65536
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
# No capabilities; bind.conf grants CAP_NET_BIND_SERVICE to a server on a port below 1024.
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
""".format(prog=PROG, config=CONFIG_DIR, user=layout.user, exec_start=layout.exec_start(),
           stop_timeout=stop_timeout, pyz_cache=render_pyz_cache(layout))


def render_pyz_cache(layout: Layout) -> str:
    if layout.python is None:
        return ""
    return """\
# nodepass.pyz unpacks its compiled parts once, into the one directory
# ProtectSystem=strict leaves writable: systemd makes it for the service user.
# The instances share it; the pyz unpacks race-free.
CacheDirectory={name}
Environment=NODEPASS_PYZ_CACHE={cache}
""".format(name=CACHE_NAME, cache=layout.cache)


def systemd_span(milliseconds: float) -> str:
    whole = int(round(milliseconds))
    return "{}s".format(whole // 1000) if whole % 1000 == 0 else "{}ms".format(whole)


def render_env_file(config: ModuleType, name: str, url: Optional[str],
                    variables: Dict[str, str]) -> str:
    """The instance's environment file; ``url`` None for a tunnels-file instance."""
    lines = [
        "# nodepass-gevent tunnel {!r}, written by {}.".format(name, PROG),
        "# SHUTDOWN_TIMEOUT also sets the unit's stop timeout: change it with",
        "# `{} create --force {} {} --env SHUTDOWN_TIMEOUT=...`.".format(
            PROG, name, "URL" if url is not None else "--config FILE"),
    ]
    if url is not None:
        lines.append("NODEPASS_URL='{}'".format(url))
    else:
        lines.append("{}='{}'".format(CONFIG_VARIABLE, Layout.tunnels_file(name)))
    for setting in config.SETTINGS:  # defaults shown commented out: what can be changed
        if setting.name in variables:
            lines.append("{}='{}'".format(setting.name, variables[setting.name]))
        else:
            lines.append("# {}={}".format(setting.name, setting.default))
    for key, choices in choice_variables(config).items():
        if key in variables:
            lines.append("{}='{}'".format(key, variables[key]))
        else:
            lines.append("# {}={}".format(key, choices[0]))
    for key in PATH_VARIABLES + SECRET_VARIABLES:
        if key in variables:
            lines.append("{}='{}'".format(key, variables[key]))
    return "\n".join(lines) + "\n"


def render_dropins(config: ModuleType, tunnel: "TunnelUrl | TunnelsFile",
                   variables: Dict[str, str],
                   tunnels_conf: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Per-instance drop-ins by file name; None means the file must not exist."""
    shutdown = variables.get("SHUTDOWN_TIMEOUT",
                             settings_by_name(config)["SHUTDOWN_TIMEOUT"].default)
    shutdown_ms = duration_ms(config, shutdown)
    if tunnel.shutdown_seconds is not None:
        shutdown_ms = max(shutdown_ms, tunnel.shutdown_seconds * 1000)
    dropins = {
        "stop.conf": "[Service]\nTimeoutStopSec={}\n".format(
            systemd_span(shutdown_ms + STOP_MARGIN_MS)),
        "bind.conf": None,
        "tls.conf": None,
        "tunnels.conf": tunnels_conf,
    }
    if tunnel.listens_below_1024():
        dropins["bind.conf"] = ("[Service]\n"
                                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
                                "AmbientCapabilities=CAP_NET_BIND_SERVICE\n")
    hidden = [p for p in tunnel.certificate_paths() if under(p, HOME_PREFIXES)]
    if hidden:
        # ProtectHome=yes would hide them; tmpfs plus a bind mount shows just these files.
        dropins["tls.conf"] = ("[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths={}\n"
                               .format(" ".join(unit_quote(p) for p in hidden)))
    return dropins


def render_tunnels_dropin(layout: Layout, name: str, metrics: Optional[str]) -> str:
    """A tunnels-file instance: its command, and systemd's notify protocol, which the
    process speaks (READY=1 once every tunnel is up, RELOADING=1 on SIGHUP)."""
    metrics_option = " --metrics {}".format(metrics) if metrics else ""
    return """\
[Service]
Type=notify
NotifyAccess=main
# Clients are ready once their server answers: that may take a while, and
# is no reason to kill the servers in the same file.
TimeoutStartSec=infinity
ExecStart=
ExecStart={exec_start} --config {tunnels}{metrics}
""".format(exec_start=layout.exec_start(), tunnels=unit_quote(str(layout.tunnels_file(name))),
           metrics=metrics_option)


def unit_quote(path: str) -> str:
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"{}"'.format(escaped)


# --------------------------------------------------------------------------
# Commands that change the running system

class System:
    """Runs systemctl, useradd and friends, or with --root only says what it would run."""

    def __init__(self, layout: Layout) -> None:
        self.dry = layout.root is not None

    def run(self, argv: List[str], check: bool = True) -> int:
        if self.dry:
            say("--root given, not running: {}".format(shell_words(argv)))
            return 0
        try:
            status = subprocess.call(argv)
        except OSError as error:
            raise ServiceError("cannot run {}: {}".format(argv[0], error))
        if check and status != 0:
            raise ServiceError("{} failed (exit status {})".format(shell_words(argv), status))
        return status

    def query(self, argv: List[str]) -> List[str]:
        """Output lines of a read-only command; [] when it cannot run or with --root."""
        if self.dry:
            return []
        try:
            result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    universal_newlines=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return result.stdout.splitlines()

    def ensure_user(self, user: str) -> None:
        """The service user, created unless it exists (install, install --pyz and
        create all call this). --root creates nothing, so every such command
        says what it would do here: the useradd, or that none is needed."""
        if user_exists(user):
            if self.dry:
                say("--root given: service user {} exists on this host, no useradd needed"
                    .format(user))
            return
        self.run(["useradd", "--system", "--user-group", "--no-create-home",
                  "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user])


def shell_words(argv: List[str]) -> str:
    """shlex.join, which Python 3.6 and 3.7 lack (this script runs on the host's python3)."""
    return " ".join(shlex.quote(word) for word in argv)


def require_root_user(layout: Layout) -> None:
    if layout.root is None and os.geteuid() != 0:
        raise ServiceError("must run as root to change the system (or use --root DIR)")


# --------------------------------------------------------------------------
# Subcommands

def cmd_install(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    require_root_user(layout)
    if args.pyz:
        return install_pyz(layout, system, args)
    if args.python is None:
        args.python = sys.executable
    layout.python = None  # a pip install replaces a pyz one
    source = args.source or default_source()
    venv = layout.disk(layout.venv)
    if not (venv / "bin" / "python").exists():
        say("creating virtual environment {}".format(venv))
        command = [args.python, "-m", "venv"]
        if args.system_site_packages:
            command.append("--system-site-packages")
        run_or_fail(command + [str(venv)], "creating the virtual environment failed "
                    "(on Debian: apt-get install python3-venv)")
    pip_install(venv, source, args.pip_arg)
    version = installed_version(layout)
    # After pip: a failed install leaves no user behind.
    system.ensure_user(layout.user)
    record = {"prefix": str(layout.prefix), "user": layout.user, "source": source,
              "pip_args": args.pip_arg}
    remove_file(layout.disk(layout.pyz))
    write_atomically(layout.disk(layout.record), json.dumps(record, indent=2) + "\n")
    write_atomically(layout.disk(layout.template), render_template(layout))
    system.run(["systemctl", "daemon-reload"])
    say("installed {} into {}".format(version, venv))
    return Status.OK


def installed_version(layout: Layout) -> str:
    """`nodepass --version` from the venv: proof that the install can run."""
    nodepass = str(layout.disk(layout.nodepass))
    try:
        result = subprocess.run([nodepass, "--version"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServiceError("installed, but {} does not run: {}".format(nodepass, error))
    if result.returncode != 0:
        lines = result.stdout.strip().splitlines() or ["exit status {}".format(result.returncode)]
        raise ServiceError("installed, but {} --version fails: {}".format(nodepass, lines[-1]))
    return result.stdout.strip()


def install_pyz(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    if args.source or args.system_site_packages or args.pip_arg:
        raise ServiceError("--pyz installs a file: --source, --system-site-packages and "
                           "--pip-arg do not apply", Status.USAGE)
    pyz = check_pyz_file(args.pyz)
    python = absolute_python(args.python or SYSTEM_PYTHON)
    if under(python, HOME_PREFIXES):
        warn("{} is under {}, which the units cannot see (ProtectHome=yes): pass "
             "--python with a system interpreter such as {}".format(
                 python, "/".join(HOME_PREFIXES), SYSTEM_PYTHON))
    version = pyz_version(python, pyz)  # before anything is written
    system.ensure_user(layout.user)
    layout.python = PurePosixPath(python)
    copy_atomically(pyz, layout.disk(layout.pyz))
    record = {"prefix": str(layout.prefix), "user": layout.user, "kind": "pyz",
              "python": python, "pyz": str(pyz.resolve())}
    write_atomically(layout.disk(layout.record), json.dumps(record, indent=2) + "\n")
    write_atomically(layout.disk(layout.template), render_template(layout))
    system.run(["systemctl", "daemon-reload"])
    say("installed {} as {}, run by {}".format(version, layout.disk(layout.pyz), python))
    return Status.OK


def check_pyz_file(path: str) -> Path:
    pyz = Path(path)
    if not pyz.is_file():
        raise ServiceError("--pyz {}: no such file (build it with scripts/build-pyz)".format(path),
                           Status.USAGE)
    try:
        with zipfile.ZipFile(str(pyz)) as archive:
            archive.getinfo(PYZ_MANIFEST)
    except (OSError, KeyError, zipfile.BadZipFile):
        raise ServiceError("--pyz {}: not a nodepass.pyz made by scripts/build-pyz".format(path),
                           Status.USAGE)
    return pyz


def pyz_build(pyz: Path) -> str:
    with zipfile.ZipFile(str(pyz)) as archive:
        return str(json.loads(archive.read(PYZ_MANIFEST).decode("utf-8"))["build"])


def absolute_python(python: str) -> str:
    """PY as an absolute path, as the unit's ExecStart= needs; symlinks kept, so
    that /usr/bin/python3 stays what the distribution points it at."""
    found = shutil.which(python)
    if found is None:
        raise ServiceError("--python {}: no such interpreter".format(python), Status.USAGE)
    return os.path.abspath(found)


def pyz_version(python: str, pyz: Path) -> str:
    """`PY nodepass.pyz --version`: proof that this interpreter runs this pyz."""
    try:
        result = subprocess.run([python, str(pyz), "--version"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServiceError("{} cannot run {}: {}".format(python, pyz, error))
    if result.returncode != 0:
        lines = result.stdout.strip().splitlines() or ["exit status {}".format(result.returncode)]
        raise ServiceError("{} cannot run {}: {}".format(python, pyz, lines[-1]))
    return result.stdout.strip().splitlines()[-1]


def copy_atomically(source: Path, target: Path) -> None:
    """A running tunnel keeps reading the old file; a new one sees the old or the new."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=str(target.parent), prefix="." + target.name + ".")
    try:
        with os.fdopen(fd, "wb") as stream, source.open("rb") as original:
            shutil.copyfileobj(original, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, str(target))
    except BaseException:
        os.unlink(temp)
        raise


def prune_cache(layout: Layout, keep: str) -> None:
    """Remove what older pyz builds unpacked (after the tunnels restarted on the new one)."""
    cache = layout.disk(layout.cache)
    if not cache.is_dir():
        return
    for entry in cache.iterdir():
        if entry.name != keep:
            shutil.rmtree(str(entry), ignore_errors=True)


def default_source() -> str:
    """The checkout this script lives in, else the published package."""
    if any((CHECKOUT / marker).exists() for marker in ("setup.py", "setup.cfg", "pyproject.toml")):
        return str(CHECKOUT)
    return PACKAGE_NAME


def pip_install(venv: Path, source: str, pip_args: List[str]) -> None:
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--upgrade"]
    run_or_fail(command + list(pip_args) + [source], "pip install {} failed".format(source))


def run_or_fail(command: List[str], message: str) -> None:
    try:
        status = subprocess.call(command)
    except OSError as error:
        raise ServiceError("{}: {}".format(message, error))
    if status != 0:
        raise ServiceError(message)


def cmd_create(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    name = check_name(args.name)
    env_path = layout.disk(layout.env_file(name))
    if env_path.exists() and not args.force:
        raise ServiceError("tunnel {!r} exists (delete it, or create --force)".format(name))
    if (args.url is None) == (args.config is None):
        raise ServiceError("create needs one of the arguments URL or --config FILE",
                           Status.USAGE)
    if args.metrics and args.config is None:
        raise ServiceError("--metrics goes with --config FILE", Status.USAGE)
    config = need_package(layout)
    variables = parse_env_assignments(config, args.env)
    tunnels_conf = None
    if args.config is not None:
        check_tunnels_file(layout, args.config, args.metrics, variables)
        tunnel = TunnelsFile(config, args.config, variables)  # type: TunnelUrl | TunnelsFile
        tunnels_conf = render_tunnels_dropin(layout, name, args.metrics)
    else:
        check_url(layout, args.url, variables)
        tunnel = TunnelUrl(config, args.url, variables)
    check_certificate_paths(layout, tunnel)
    require_root_user(layout)

    system.ensure_user(layout.user)
    write_atomically(layout.disk(layout.template), render_template(layout))
    write_dropins(layout, name, render_dropins(config, tunnel, variables, tunnels_conf))
    if args.config is not None:
        install_tunnels_file(layout, name, args.config)
    else:
        remove_file(layout.disk(layout.tunnels_file(name)))  # from an earlier --config
    write_atomically(env_path, render_env_file(config, name, args.url, variables), mode=0o640)
    say("created tunnel {} ({})".format(name, layout.unit(name)))

    system.run(["systemctl", "daemon-reload"])
    if not layout.installed():
        warn("{} does not exist: run `{} install`, then `{} start {}`"
             .format(layout.disk(layout.program()), PROG, PROG, name))
        system.run(["systemctl", "enable", layout.unit(name)])
    elif args.no_start:
        system.run(["systemctl", "enable", layout.unit(name)])
    else:
        system.run(["systemctl", "enable", "--now", layout.unit(name)])
    return Status.OK


def install_tunnels_file(layout: Layout, name: str, source: str) -> None:
    """Copy the checked file into place, readable by the service user only (it
    may hold shared keys); the running instance sees it at its next reload."""
    target = layout.disk(layout.tunnels_file(name))
    write_atomically(target, Path(source).read_text(), mode=0o640)
    if layout.root is None:
        try:
            os.chown(str(target), 0, grp.getgrnam(layout.user).gr_gid)
        except (KeyError, OSError) as error:
            warn("{} may not be readable by {}: {}".format(target, layout.user, error))


def write_dropins(layout: Layout, name: str, dropins: Dict[str, Optional[str]]) -> None:
    directory = layout.disk(layout.dropin_dir(name))
    for file_name, text in dropins.items():
        if text is None:
            remove_file(directory / file_name)  # left from an earlier create --force
        else:
            write_atomically(directory / file_name, text)


def cmd_systemctl(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    """start, stop, restart: the verb is the subcommand's name."""
    name = check_known(layout, args.name)
    require_root_user(layout)
    system.run(["systemctl", args.command, layout.unit(name)])
    return Status.OK


def cmd_reload(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    """SIGHUP through systemctl reload: a tunnels file (replaced by --config FILE
    first, once it checks) and tls=2 certificates are re-read; nothing restarts."""
    name = check_known(layout, args.name)
    if args.config is not None:
        if not layout.disk(layout.tunnels_file(name)).exists():
            raise ServiceError("tunnel {!r} runs a URL, not a tunnels file: create --force "
                               "{} --config FILE".format(name, name), Status.USAGE)
        config = need_package(layout)
        variables = {k: v for k, v in read_env_file(layout.disk(layout.env_file(name))).items()
                     if k != CONFIG_VARIABLE}
        check_tunnels_file(layout, args.config, None, variables)
        tunnels = TunnelsFile(config, args.config, variables)
        check_certificate_paths(layout, tunnels)
        # A new capability (a port below 1024) or bind mount (a certificate under
        # /home) changes the unit: that takes a restart, not a reload.
        wanted = render_dropins(config, tunnels, variables)
        for file_name in ("bind.conf", "tls.conf"):
            path = dropin(layout, name, file_name)
            current = path.read_text() if path.exists() else None
            if wanted[file_name] != current:
                raise ServiceError("the new file needs a changed {} (a port below 1024 or a "
                                   "certificate under /home), which takes a restart: create "
                                   "--force {} --config FILE".format(file_name, name),
                                   Status.USAGE)
        require_root_user(layout)
        install_tunnels_file(layout, name, args.config)
        say("replaced {}".format(layout.disk(layout.tunnels_file(name))))
        stop = dropin(layout, name, "stop.conf")
        if not stop.exists() or stop.read_text() != wanted["stop.conf"]:
            # A longer drain in the new file: systemd must wait longer on stop
            # (a daemon-reload rereads drop-ins and restarts nothing).
            write_atomically(stop, wanted["stop.conf"])
            system.run(["systemctl", "daemon-reload"])
    require_root_user(layout)
    system.run(["systemctl", "reload", layout.unit(name)])
    return Status.OK


def dropin(layout: Layout, name: str, file_name: str) -> Path:
    return layout.disk(layout.dropin_dir(name)) / file_name


def cmd_status(layout: Layout, system: System, args: argparse.Namespace) -> int:
    name = check_known(layout, args.name)
    say("tunnel {}: {}".format(name, tunnel_url(layout, name)))
    for dropin in sorted(layout.disk(layout.dropin_dir(name)).glob("*.conf")):
        say("  drop-in {}".format(dropin.name))
    # systemctl status exits 3 for a stopped unit: pass that on to scripts.
    return system.run(["systemctl", "status", "--no-pager", layout.unit(name)], check=False)


def tunnel_url(layout: Layout, name: str) -> str:
    """The URL, or `--config FILE` for a tunnels-file instance."""
    variables = read_env_file(layout.disk(layout.env_file(name)))
    if CONFIG_VARIABLE in variables:
        return "--config {}".format(variables[CONFIG_VARIABLE])
    return variables.get("NODEPASS_URL", "?")


def cmd_list(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    names = layout.names()
    if not names:
        say("no tunnels (create one with: {} create NAME URL)".format(PROG))
        return Status.OK
    units = [layout.unit(name) for name in names]
    active = system.query(["systemctl", "is-active"] + units)
    enabled = system.query(["systemctl", "is-enabled"] + units)
    rows = [("NAME", "MODE", "ACTIVE", "ENABLED", "URL")]
    for index, name in enumerate(names):
        url = tunnel_url(layout, name)
        mode = "tunnels" if url.startswith("--config") else url.partition("://")[0]
        rows.append((name, mode, column(active, index),
                     column(enabled, index), url))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        say("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    if system.dry:
        say("(--root given: service states not queried)")
    return Status.OK


def column(lines: List[str], index: int) -> str:
    return lines[index].strip() if index < len(lines) else "-"


def cmd_delete(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    name = check_known(layout, args.name)
    require_root_user(layout)
    delete_tunnel(layout, system, name)
    system.run(["systemctl", "daemon-reload"])
    return Status.OK


def delete_tunnel(layout: Layout, system: System, name: str) -> None:
    # The files go even if systemctl fails (e.g. no systemd running): the
    # operator asked for the tunnel to be gone.
    if system.run(["systemctl", "disable", "--now", layout.unit(name)], check=False) != 0:
        warn("could not stop {}; removing its files anyway".format(layout.unit(name)))
    shutil.rmtree(str(layout.disk(layout.dropin_dir(name))), ignore_errors=True)
    remove_file(layout.disk(layout.env_file(name)))
    remove_file(layout.disk(layout.tunnels_file(name)))
    say("deleted tunnel {}".format(name))


def cmd_update(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    require_root_user(layout)
    if not layout.installed():
        raise ServiceError("not installed under {} (run: {} install)".format(
            layout.disk(layout.prefix), PROG))
    record = read_record(args.root)
    if layout.python is not None:
        return update_pyz(layout, system, args, record)
    if args.pyz:
        raise ServiceError("installed with pip, not from a pyz: run install --pyz FILE to "
                           "switch", Status.USAGE)
    source = args.source or str(record.get("source") or default_source())
    pip_install(layout.disk(layout.venv), source, list(record.get("pip_args") or []))
    restart_after_update(layout, system)
    say("updated {}".format(layout.disk(layout.venv)))
    return Status.OK


def update_pyz(layout: Layout, system: System, args: argparse.Namespace,
               record: Dict[str, object]) -> Status:
    if args.source:
        raise ServiceError("installed from a pyz: update --pyz FILE", Status.USAGE)
    pyz = check_pyz_file(args.pyz or str(record.get("pyz") or ""))
    version = pyz_version(str(layout.python), pyz)
    copy_atomically(pyz, layout.disk(layout.pyz))
    write_atomically(layout.disk(layout.record),
                     json.dumps(dict(record, pyz=str(pyz.resolve())), indent=2) + "\n")
    restart_after_update(layout, system)
    prune_cache(layout, keep=pyz_build(pyz))
    say("updated {} to {}".format(layout.disk(layout.pyz), version))
    return Status.OK


def restart_after_update(layout: Layout, system: System) -> None:
    write_atomically(layout.disk(layout.template), render_template(layout))
    system.run(["systemctl", "daemon-reload"])
    units = [layout.unit(name) for name in layout.names()]
    if units:
        # try-restart leaves stopped tunnels stopped.
        system.run(["systemctl", "try-restart"] + units)


def cmd_uninstall(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    require_root_user(layout)
    names = layout.names()
    if names and not args.purge:
        raise ServiceError("tunnels exist: {}; delete them first or uninstall --purge"
                           .format(", ".join(names)))
    for name in names:
        delete_tunnel(layout, system, name)
    remove_file(layout.disk(layout.template))
    system.run(["systemctl", "daemon-reload"])
    shutil.rmtree(str(layout.disk(layout.venv)), ignore_errors=True)
    remove_file(layout.disk(layout.pyz))
    shutil.rmtree(str(layout.disk(layout.cache)), ignore_errors=True)
    remove_file(layout.disk(layout.record))
    remove_empty_dir(layout.disk(layout.prefix))
    if args.purge:
        remove_empty_dir(layout.disk(CONFIG_DIR))
        if user_exists(layout.user):
            system.run(["userdel", layout.user], check=False)
        elif system.dry:
            say("--root given: service user {} does not exist on this host, no userdel needed"
                .format(layout.user))
    say("uninstalled from {}".format(layout.disk(layout.prefix)))
    return Status.OK


def remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # missing, or holds something that is not ours


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


COMMANDS = {
    "install": cmd_install, "create": cmd_create, "start": cmd_systemctl,
    "stop": cmd_systemctl, "restart": cmd_systemctl, "status": cmd_status,
    "list": cmd_list, "delete": cmd_delete, "update": cmd_update, "uninstall": cmd_uninstall,
    "reload": cmd_reload,
}


# --------------------------------------------------------------------------
# Interactive menu: builds the same argv a script would pass

MENU = ["install", "create", "start", "stop", "restart", "status", "list", "delete",
        "update", "uninstall", "reload"]


def menu(global_argv: List[str]) -> int:
    status = int(Status.OK)
    while True:
        say("")
        for number, command in enumerate(MENU, 1):
            say("  {:2}) {}".format(number, command))
        say("   q) quit")
        choice = ask("choice: ")
        if choice is None or choice.lower() in ("q", "quit", "0"):
            return status
        if not choice.isdigit() or not 1 <= int(choice) <= len(MENU):
            say("pick a number from the menu")
            continue
        argv = menu_arguments(MENU[int(choice) - 1])
        if argv is not None:
            status = main(global_argv + argv)


def menu_arguments(command: str) -> Optional[List[str]]:
    argv = [command]
    if command in ("start", "stop", "restart", "reload", "status", "delete"):
        name = ask("tunnel name: ")
        if not name:
            return None
        argv.append(name)
    elif command == "create":
        name, url = ask("tunnel name: "), ask("URL (e.g. server://:10101/127.0.0.1:8080?tls=1): ")
        if not name or not url:
            return None
        argv += [name, url]
        while True:
            assignment = ask("variable KEY=VALUE (empty to finish): ")
            if not assignment:
                break
            argv += ["--env", assignment]
    elif command == "uninstall":
        if (ask("also delete every tunnel and the service user? [y/N] ") or "").lower() == "y":
            argv.append("--purge")
    return argv


def ask(prompt: str) -> Optional[str]:
    try:
        return input(prompt).strip()
    except EOFError:
        return None


# --------------------------------------------------------------------------
# Entry

class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other error here, instead of usage plus message.
        self.exit(Status.USAGE, "{}: error: {} (see --help)\n".format(PROG, message))


class DocstringHelp(argparse.Action):
    """--help prints the module docstring: the one place the usage is written."""

    def __init__(self, option_strings: List[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show this help")

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore
        print(__doc__.strip())
        parser.exit(Status.OK)


def add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--root", metavar="DIR", default=default)
    parser.add_argument("--prefix", metavar="DIR", default=default)
    parser.add_argument("--user", metavar="NAME", default=default)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, add_help=False)
    parser.add_argument("-h", "--help", action=DocstringHelp)
    add_global_options(parser, default=None)
    # The global options may also follow the command: `create --root DIR ...`.
    after = Parser(add_help=False)
    add_global_options(after, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add = functools.partial(commands.add_parser, parents=[after])

    install = add("install", help="install the package into PREFIX/venv")
    install.add_argument("--source", help="path or requirement (default: this checkout)")
    install.add_argument("--python", default=None,
                         help="interpreter for the venv (default: this one), or the one that "
                              "runs the pyz (default: {})".format(SYSTEM_PYTHON))
    install.add_argument("--pyz", metavar="FILE", help="install this nodepass.pyz, not a venv")
    install.add_argument("--system-site-packages", action="store_true",
                         help="let the venv see the interpreter's packages")
    install.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                         help="extra pip install argument (repeatable)")

    create = add("create", help="a tunnel (or a tunnels file) as a systemd service")
    create.add_argument("name")
    create.add_argument("url", nargs="?")
    create.add_argument("--config", metavar="FILE", help="run every tunnel of this file")
    create.add_argument("--metrics", metavar="HOST:PORT",
                        help="with --config: serve /metrics, /status and /healthz there")
    create.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a tuning variable, e.g. SHUTDOWN_TIMEOUT=10s (repeatable)")
    create.add_argument("--force", action="store_true", help="replace an existing tunnel")
    create.add_argument("--no-start", action="store_true", help="enable at boot, do not start")

    for verb in ("start", "stop", "restart", "status", "delete"):
        add(verb, help="{} a tunnel".format(verb)).add_argument("name")
    reload = add("reload", help="re-read a tunnels file and certificates (SIGHUP)")
    reload.add_argument("name")
    reload.add_argument("--config", metavar="FILE", help="replace the tunnels file first")
    add("list", help="every tunnel, its state and URL")
    update = add("update", help="upgrade the package, restart tunnels")
    update.add_argument("--source", help="path or requirement (default: the one installed from)")
    update.add_argument("--pyz", metavar="FILE",
                        help="the new nodepass.pyz (default: the file installed from)")
    uninstall = add("uninstall", help="remove the package and template unit")
    uninstall.add_argument("--purge", action="store_true",
                           help="also delete every tunnel, /etc/nodepass and the user")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command is None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            return menu(argv)
        build_parser().error("a command is needed (the menu only runs on a terminal)")
    record = read_record(args.root)
    prefix = args.prefix or str(record.get("prefix") or DEFAULT_PREFIX)
    if not prefix.startswith("/"):
        build_parser().error("--prefix must be an absolute path")
    python = str(record.get("python") or "") if record.get("kind") == "pyz" else None
    layout = Layout(args.root, prefix, args.user or str(record.get("user") or DEFAULT_USER),
                    python)
    try:
        return COMMANDS[args.command](layout, System(layout), args)
    except ServiceError as error:
        print("{}: error: {}".format(PROG, error), file=sys.stderr)
        return error.status
    except OSError as error:
        print("{}: error: {}".format(PROG, error), file=sys.stderr)
        return Status.FAILED


if __name__ == "__main__":
    sys.exit(main())
