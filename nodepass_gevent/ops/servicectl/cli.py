"""Manage nodepass-gevent tunnels as systemd services.

Each instance of the template unit nodepass@.service runs one tunnel (a URL),
a whole tunnels file (--config: many tunnels in one process, reloaded live) or
a master (a master:// URL: NodePass's REST API, running the tunnels it is given),
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
                 before install, or a user removed since). A master URL
                 (master://HOST:PORT[/PREFIX]?...: the REST API) keeps its API
                 key and instances in /var/lib/nodepass-gevent/NAME
                 (StateDirectory=), which delete keeps and uninstall --purge
                 removes
  create NAME --config FILE [--metrics HOST:PORT] [--env KEY=VALUE]...
         [--force] [--no-start]
                 every tunnel of a tunnels file (see nodepass --help) in one
                 service (Type=notify: started once every tunnel is up);
                 FILE is copied to /etc/nodepass/NAME.tunnels
  reload NAME [--config FILE]
                 re-read the tunnels file (replaced by FILE, checked first)
                 and tls=2 certificates without a restart (SIGHUP); not a
                 master (restart it)
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
import functools
import sys
from typing import Callable, List, Optional

from nodepass_gevent.ops.servicectl.commands import (cmd_create, cmd_delete, cmd_list, cmd_reload,
                                                     cmd_status, cmd_systemctl)
from nodepass_gevent.ops.servicectl.install import cmd_install, cmd_uninstall, cmd_update
from nodepass_gevent.ops.servicectl.layout import (DEFAULT_PREFIX, DEFAULT_USER, SYSTEM_PYTHON,
                                                   Layout, read_record)
from nodepass_gevent.ops.servicectl.output import PROG, ServiceError, Status, say
from nodepass_gevent.ops.servicectl.system import System

COMMANDS = {
    "install": cmd_install, "create": cmd_create, "start": cmd_systemctl,
    "stop": cmd_systemctl, "restart": cmd_systemctl, "status": cmd_status,
    "list": cmd_list, "delete": cmd_delete, "update": cmd_update, "uninstall": cmd_uninstall,
    "reload": cmd_reload,
}

# The interactive menu: builds the same argv a script would pass.
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
    add_package_commands(add)
    add_instance_commands(add)
    return parser


def add_package_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """install, update, uninstall: the package and the template unit."""
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
    update = add("update", help="upgrade the package, restart tunnels")
    update.add_argument("--source", help="path or requirement (default: the one installed from)")
    update.add_argument("--pyz", metavar="FILE",
                        help="the new nodepass.pyz (default: the file installed from)")
    uninstall = add("uninstall", help="remove the package and template unit")
    uninstall.add_argument("--purge", action="store_true",
                           help="also delete every tunnel, /etc/nodepass and the user")


def add_instance_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """create, start ... delete, reload, list: the instances."""
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
