"""install (a venv by pip, or a pyz), update and uninstall: the package and the template unit."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List

from nodepass_gevent.ops.servicectl.checks import under
from nodepass_gevent.ops.servicectl.commands import delete_tunnel
from nodepass_gevent.ops.servicectl.files import (copy_atomically, remove_empty_dir, remove_file,
                                                  write_atomically)
from nodepass_gevent.ops.servicectl.layout import (CHECKOUT, CONFIG_DIR, HOME_PREFIXES,
                                                   PACKAGE_NAME, PYZ_MANIFEST, STATE_ROOT,
                                                   SYSTEM_PYTHON, Layout, read_record)
from nodepass_gevent.ops.servicectl.output import PROG, ServiceError, Status, say, warn
from nodepass_gevent.ops.servicectl.system import System, require_root_user, user_exists
from nodepass_gevent.ops.servicectl.units import render_template


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
        make_venv(venv, args.python, args.system_site_packages)
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


def make_venv(venv: Path, python: str, system_site_packages: bool) -> None:
    say("creating virtual environment {}".format(venv))
    command = [python, "-m", "venv"]
    if system_site_packages:
        command.append("--system-site-packages")
    run_or_fail(command + [str(venv)], "creating the virtual environment failed "
                "(on Debian: apt-get install python3-venv)")


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
        delete_tunnel(layout, system, name, purge=True)
    remove_file(layout.disk(layout.template))
    system.run(["systemctl", "daemon-reload"])
    remove_package(layout)
    if args.purge:
        purge_config_and_user(layout, system)
    say("uninstalled from {}".format(layout.disk(layout.prefix)))
    return Status.OK


def remove_package(layout: Layout) -> None:
    """The venv or the pyz with its cache, the install record, PREFIX if empty."""
    shutil.rmtree(str(layout.disk(layout.venv)), ignore_errors=True)
    remove_file(layout.disk(layout.pyz))
    shutil.rmtree(str(layout.disk(layout.cache)), ignore_errors=True)
    remove_file(layout.disk(layout.record))
    remove_empty_dir(layout.disk(layout.prefix))


def purge_config_and_user(layout: Layout, system: System) -> None:
    remove_empty_dir(layout.disk(CONFIG_DIR))
    remove_empty_dir(layout.disk(STATE_ROOT))  # the masters' states went with them
    if user_exists(layout.user):
        system.run(["userdel", layout.user], check=False)
    elif system.dry:
        say("--root given: service user {} does not exist on this host, no userdel needed"
            .format(layout.user))
