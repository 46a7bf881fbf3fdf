"""The files systemd reads, rendered as text: the template unit, each instance's
environment file and drop-ins."""

from types import ModuleType
from typing import Dict, Optional

from nodepass_gevent.ops.servicectl.checks import choice_variables, under
from nodepass_gevent.ops.servicectl.instance import Runs
from nodepass_gevent.ops.servicectl.layout import (CACHE_NAME, STATE_ROOT, CONFIG_DIR, CONFIG_VARIABLE,
                                                   HOME_PREFIXES, PATH_VARIABLES,
                                                   SECRET_VARIABLES, Layout)
from nodepass_gevent.ops.servicectl.output import PROG
from nodepass_gevent.ops.servicectl.package import duration_ms, package_config, settings_by_name

# Bootstrap: install writes the template before this Python may be able to
# import the package; the template's stop timeout then assumes the package's
# SHUTDOWN_TIMEOUT default. Each tunnel's stop.conf, written by create with
# the package, sets its own.
BOOTSTRAP_SHUTDOWN_TIMEOUT_MS = 5000
# systemd kills the tunnel this long after SHUTDOWN_TIMEOUT: the drain itself
# takes up to SHUTDOWN_TIMEOUT, the interpreter needs a moment to exit after.
STOP_MARGIN_MS = 5000


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


def render_dropins(config: ModuleType, tunnel: Runs, variables: Dict[str, str],
                   by_kind: Optional[Dict[str, Optional[str]]] = None
                   ) -> Dict[str, Optional[str]]:
    """Per-instance drop-ins by file name; None means the file must not exist.
    ``by_kind``: tunnels.conf for a tunnels file, master.conf for a master."""
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
        "tunnels.conf": None,
        "master.conf": None,
    }
    dropins.update(by_kind or {})
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


def render_master_dropin(name: str) -> str:
    """A master instance (master:// URL): the template runs it as is; this adds
    its state directory and takes away the reload."""
    return """\
[Service]
# A master: NodePass's REST API, running the tunnels it is given. Type=simple
# (the template's) fits: the master sends no sd_notify, and listens at once.
# Its API key and instances live in {state}, systemd's
# $STATE_DIRECTORY, which the master reads: made for the service user,
# private to it, writable under ProtectSystem=strict, kept across restarts,
# updates and delete (uninstall --purge removes it).
StateDirectory={cache}/{name}
StateDirectoryMode=0700
# The master re-reads nothing on SIGHUP (it would end it): no reload.
ExecReload=
""".format(state=STATE_ROOT / name, cache=CACHE_NAME, name=name)


def unit_quote(path: str) -> str:
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"{}"'.format(escaped)
