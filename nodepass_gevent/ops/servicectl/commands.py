"""The commands on one instance: create, start, stop, restart, reload, status, list, delete."""

import argparse
import grp
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

from nodepass_gevent.ops.servicectl.checks import (check_certificate_paths, check_known,
                                                   check_name, check_tunnels_file, check_url,
                                                   parse_env_assignments)
from nodepass_gevent.ops.servicectl.files import read_env_file, remove_file, write_atomically
from nodepass_gevent.ops.servicectl.instance import (MasterUrl, Runs, TunnelsFile, TunnelUrl,
                                                     is_master_url)
from nodepass_gevent.ops.servicectl.layout import CONFIG_VARIABLE, MASTER_STATE_FILE, Layout
from nodepass_gevent.ops.servicectl.output import PROG, ServiceError, Status, say, warn
from nodepass_gevent.ops.servicectl.package import need_package
from nodepass_gevent.ops.servicectl.system import System, require_root_user
from nodepass_gevent.ops.servicectl.units import (render_dropins, render_env_file,
                                                  render_master_dropin, render_template,
                                                  render_tunnels_dropin)


def cmd_create(layout: Layout, system: System, args: argparse.Namespace) -> Status:
    name = check_create_arguments(layout, args)
    config = need_package(layout)
    variables = parse_env_assignments(config, args.env)
    runs, extra_dropins = describe_instance(layout, config, name, args, variables)
    check_certificate_paths(layout, runs)
    require_root_user(layout)

    system.ensure_user(layout.user)
    write_atomically(layout.disk(layout.template), render_template(layout))
    write_dropins(layout, name, render_dropins(config, runs, variables, extra_dropins))
    if args.config is not None:
        install_tunnels_file(layout, name, args.config)
    else:
        remove_file(layout.disk(layout.tunnels_file(name)))  # from an earlier --config
    write_atomically(layout.disk(layout.env_file(name)),
                     render_env_file(config, name, args.url, variables), mode=0o640)
    say("created tunnel {} ({})".format(name, layout.unit(name)))
    system.run(["systemctl", "daemon-reload"])
    enable(layout, system, name, start=not args.no_start)
    return Status.OK


def check_create_arguments(layout: Layout, args: argparse.Namespace) -> str:
    """The name, once it is free (or --force) and URL / --config / --metrics agree."""
    name = check_name(args.name)
    if layout.disk(layout.env_file(name)).exists() and not args.force:
        raise ServiceError("tunnel {!r} exists (delete it, or create --force)".format(name))
    if (args.url is None) == (args.config is None):
        raise ServiceError("create needs one of the arguments URL or --config FILE",
                           Status.USAGE)
    if args.metrics and args.config is None:
        raise ServiceError("--metrics goes with --config FILE", Status.USAGE)
    return name


def describe_instance(layout: Layout, config: ModuleType, name: str, args: argparse.Namespace,
                      variables: Dict[str, str]) -> Tuple[Runs, Dict[str, Optional[str]]]:
    """What the instance runs, checked by the package, and the drop-ins that go
    with its kind: tunnels.conf for a tunnels file, master.conf for a master."""
    if args.config is not None:
        check_tunnels_file(layout, args.config, args.metrics, variables)
        return (TunnelsFile(config, args.config, variables),
                {"tunnels.conf": render_tunnels_dropin(layout, name, args.metrics)})
    check_url(layout, args.url, variables)
    if is_master_url(args.url):
        return MasterUrl(config, args.url), {"master.conf": render_master_dropin(name)}
    return TunnelUrl(config, args.url, variables), {}


def enable(layout: Layout, system: System, name: str, start: bool) -> None:
    """Enabled at boot; started too, unless asked not to or nothing is installed yet."""
    if not layout.installed():
        warn("{} does not exist: run `{} install`, then `{} start {}`"
             .format(layout.disk(layout.program()), PROG, PROG, name))
        system.run(["systemctl", "enable", layout.unit(name)])
    elif not start:
        system.run(["systemctl", "enable", layout.unit(name)])
    else:
        system.run(["systemctl", "enable", "--now", layout.unit(name)])


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
    if is_master_url(tunnel_url(layout, name)):
        # Its unit has no ExecReload=: a SIGHUP would end the master.
        raise ServiceError("{!r} is a master: it has nothing to reload (restart it: {} "
                           "restart {})".format(name, PROG, name), Status.USAGE)
    if args.config is not None:
        replace_tunnels_file(layout, system, name, args.config)
    require_root_user(layout)
    system.run(["systemctl", "reload", layout.unit(name)])
    return Status.OK


def replace_tunnels_file(layout: Layout, system: System, name: str, source: str) -> None:
    """The instance's tunnels file replaced by SOURCE once it checks, and its stop
    timeout lengthened if SOURCE drains longer; refused if its unit must change."""
    if not layout.disk(layout.tunnels_file(name)).exists():
        raise ServiceError("tunnel {!r} runs a URL, not a tunnels file: create --force "
                           "{} --config FILE".format(name, name), Status.USAGE)
    config = need_package(layout)
    variables = {k: v for k, v in read_env_file(layout.disk(layout.env_file(name))).items()
                 if k != CONFIG_VARIABLE}
    check_tunnels_file(layout, source, None, variables)
    tunnels = TunnelsFile(config, source, variables)
    check_certificate_paths(layout, tunnels)
    wanted = render_dropins(config, tunnels, variables)
    check_unit_unchanged(layout, name, wanted)
    require_root_user(layout)
    install_tunnels_file(layout, name, source)
    say("replaced {}".format(layout.disk(layout.tunnels_file(name))))
    stop = dropin(layout, name, "stop.conf")
    if not stop.exists() or stop.read_text() != wanted["stop.conf"]:
        # A longer drain in the new file: systemd must wait longer on stop
        # (a daemon-reload rereads drop-ins and restarts nothing).
        write_atomically(stop, wanted["stop.conf"])
        system.run(["systemctl", "daemon-reload"])


def check_unit_unchanged(layout: Layout, name: str, wanted: Dict[str, Optional[str]]) -> None:
    # A new capability (a port below 1024) or bind mount (a certificate under
    # /home) changes the unit: that takes a restart, not a reload.
    for file_name in ("bind.conf", "tls.conf"):
        path = dropin(layout, name, file_name)
        current = path.read_text() if path.exists() else None
        if wanted[file_name] != current:
            raise ServiceError("the new file needs a changed {} (a port below 1024 or a "
                               "certificate under /home), which takes a restart: create "
                               "--force {} --config FILE".format(file_name, name),
                               Status.USAGE)


def dropin(layout: Layout, name: str, file_name: str) -> Path:
    return layout.disk(layout.dropin_dir(name)) / file_name


def cmd_status(layout: Layout, system: System, args: argparse.Namespace) -> int:
    name = check_known(layout, args.name)
    say("tunnel {}: {}".format(name, tunnel_url(layout, name)))
    for dropin in sorted(layout.disk(layout.dropin_dir(name)).glob("*.conf")):
        say("  drop-in {}".format(dropin.name))
    if is_master_url(tunnel_url(layout, name)):
        state = layout.state_dir(name)
        say("  state {} (StateDirectory=): the API key is {}/{} \"key\", and in the journal "
            "at the first start (API Key created)".format(state, state, MASTER_STATE_FILE))
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
    url = tunnel_url(layout, name)
    require_root_user(layout)
    delete_tunnel(layout, system, name)
    system.run(["systemctl", "daemon-reload"])
    if is_master_url(url):
        say("kept the master's state (its API key and instances) in {}: a master "
            "created again as {} finds it; remove it to start afresh"
            .format(layout.disk(layout.state_dir(name)), name))
    return Status.OK


def delete_tunnel(layout: Layout, system: System, name: str, purge: bool = False) -> None:
    """Stop, disable and remove an instance; ``purge`` removes a master's state too."""
    # The files go even if systemctl fails (e.g. no systemd running): the
    # operator asked for the tunnel to be gone.
    master = is_master_url(tunnel_url(layout, name))
    if system.run(["systemctl", "disable", "--now", layout.unit(name)], check=False) != 0:
        warn("could not stop {}; removing its files anyway".format(layout.unit(name)))
    shutil.rmtree(str(layout.disk(layout.dropin_dir(name))), ignore_errors=True)
    remove_file(layout.disk(layout.env_file(name)))
    remove_file(layout.disk(layout.tunnels_file(name)))
    if master and purge:
        shutil.rmtree(str(layout.disk(layout.state_dir(name))), ignore_errors=True)
    say("deleted tunnel {}".format(name))
