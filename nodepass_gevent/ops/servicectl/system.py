"""Commands that change the running system (systemctl, useradd, userdel): run them,
or with --root only say what would run."""

import os
import pwd
import shlex
import subprocess
from typing import List

from nodepass_gevent.ops.servicectl.layout import Layout
from nodepass_gevent.ops.servicectl.output import ServiceError, say


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


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False
