"""Bad input refused with a one-line error, before anything is written."""

import grp
import os
import pwd
import subprocess
import sys
from types import ModuleType
from typing import Dict, List, Optional, Sequence

from nodepass_gevent.ops.servicectl.instance import Runs
from nodepass_gevent.ops.servicectl.layout import (CONFIG_DIR, HIDDEN_PREFIXES, NAME_PATTERN,
                                                   PATH_VARIABLES, SECRET_VARIABLES, Layout)
from nodepass_gevent.ops.servicectl.output import PROG, ServiceError, Status, warn
from nodepass_gevent.ops.servicectl.package import settings_by_name

# The seed's tuning variables, their defaults and their parsing are the
# package's (nodepass_gevent.config.SETTINGS): see package.package_config().
# What a variable of each kind must look like, for the error line.
EXPECTED_VALUE = {"int": "a positive integer",
                  "duration": "a duration like 500ms, 5s or 1m30s, above zero"}


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


def under(path: str, prefixes: Sequence[str]) -> bool:
    normal = os.path.normpath(path)
    return any(normal == p or normal.startswith(p + "/") for p in prefixes)


def check_certificate_paths(layout: Layout, tunnel: Runs) -> None:
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
