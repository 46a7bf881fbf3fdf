"""nodepass: a TCP/UDP reverse tunnel, speaking the NodePass v1.0 protocol.

Usage:
  nodepass status [--metrics=<addr>]
  nodepass [--metrics=<addr>] <url>...
  nodepass [--metrics=<addr>] --config=<file>
  nodepass --check [--metrics=<addr>] (<url>... | --config=<file>)
  nodepass (-h | --help)
  nodepass --version
  nodepass --completion=<shell>
  nodepass --man

URLs:
  server://[KEY@]<tunnel_addr>/<target_addr>?log=<level>&tls=<mode>&crt=<file>&key=<file>&udp=<mode>
          &data_port=<port>&proxy=<1|2>&allow=<list>&deny=<list>&rate=<Mbit/s>&per_user=<n>
      Listen for the client on tunnel_addr (the control channel) and for users,
      TCP and UDP, on target_addr; hand each user to the client through the tunnel.
  client://[KEY@]<tunnel_addr>/<target_addr>?log=<level>&tls=<mode>
  client://[KEY@]<tunnel_addr>,<tunnel_addr>[,...]/<target_addr>?log=<level>&tls=<mode>
      Dial the server at tunnel_addr and forward each user to target_addr.
      With several tunnel addresses (failover) the client uses
      the first server that answers and, when its tunnel dies, tries the
      others in order (a jittered pause of SERVICE_COOLDOWN to twice that
      before each round, doubling after a round where none answered).

  Addresses: host:port, :port (all interfaces), [ipv6]:port, name:port.
  log   debug, info (default), warn, error or fatal.
  log_format  text (default) or json: one JSON object a line, with time,
        level, tunnel (its name, when it has one) and message.
        NODEPASS_LOG_FORMAT=json does the same where a URL does not say.
  tls   server: TLS for data connections: 0 none (default), 1 self-signed
        certificate made at start-up, 2 the certificate in crt= and key=.
        client: the least TLS mode it accepts from the server (default 0).
  wire  client: the NodePass wire it speaks: auto (default) finds out per
        server (a v1.0 server writes first, a v1.14 one waits; costs 0.45s once
        per v1.14 server), 1.0 or 1.14 (NodePass v1.14's one-port wire, TCP
        pool, reverse mode; TCP users only) pin it and skip finding out.
        server: 1.14 serves NodePass v1.14's wire on the tunnel port; any
        other value serves v1.0's.
  udp   server: flow (default) offers one connection per user address, much
        faster, which a nodepass-gevent client takes; a NodePass v1.0 client
        ignores the offer and gets v1. v1 carries each UDP datagram on a
        connection of its own, as NodePass v1.0, and offers nothing.
  data_port  server: the TCP port, on tunnel_addr's host, where the client
        opens its data connections (a firewall must let the client reach it,
        as the tunnel port). 0 or absent: a random free one in 1024-8191 at
        each start, as NodePass v1.0 picks it.
  proxy server: 1 or 2 writes a PROXY protocol header (v1 text, v2 binary)
        with the user's address ahead of each TCP user's bytes, for a service
        that reads it (nginx proxy_protocol, HAProxy accept-proxy). Not UDP.
  allow server: comma-separated addresses and CIDRs (IPv4, IPv6) of the only
        users let in, TCP and UDP; deny: those refused (deny wins). Refused
        users are closed or dropped at once, counted, logged once per 10s.
  rate  server: Mbit/s per tunnel, in each direction (token bucket, bursts
        of 0.1s); TCP is paced, UDP datagrams over the rate are dropped.
  per_user  server: most concurrent TCP connections from one user address.
  KEY   a shared key, the same on both sides: control and data connections
        must then prove it (HMAC challenge-response). Not v1.0-compatible.
        NODEPASS_KEY=<key> does the same and keeps the key off the command line.
  min, max, slot, and the variables below in lower case (shutdown_timeout=10s):
        this tunnel's own value of MIN_POOL_CAPACITY (client only),
        MAX_POOL_CAPACITY, SEMAPHORE_LIMIT or that variable (NodePass's
        names where it has them; not RELOAD_INTERVAL, one for the process).
        Only this process changes, not the wire.
  A parameter may be given once. A setting in the URL (on the command line
  or a line of the tunnels file) wins over its variable in the environment
  (a KEY@ over NODEPASS_KEY), which wins over the default.
  Quote the URL in a shell: & and ? are special there.

Many tunnels:
  Several URLs run in one process, or --config reads them from a file: one
  tunnel a line, "[NAME] URL", # starts a comment. A tunnel without a name is
  named <role>-<tunnel port>-<target port>; log lines start with the name.
  Every tunnel is checked before any listens (one bad one: exit 2). One that
  fails later is started again after SERVICE_COOLDOWN; the others go on.
  SIGHUP re-reads the file: new tunnels start, removed ones drain for
  SHUTDOWN_TIMEOUT, changed ones are replaced, the rest are not touched; a
  file that no longer checks is refused and the running set kept. With
  several URLs, a shared key goes in NODEPASS_KEY or in the file, not in a
  URL on the command line (visible to every user of the machine).

Commands:
  status             Read the /status of the nodepass serving --metrics at
                     <addr> (default 127.0.0.1:9100) and print each tunnel:
                     state, peer, connections, pool, data dials, heartbeat.

Options:
  --check            Validate the URLs or file and environment, load crt/key,
                     try each port a server listens on (tunnel, data_port,
                     target, --metrics), print the tunnels, which of two
                     sources won a setting, and exit (1: a port in use).
  --config=<file>    Run the tunnels listed in <file>.
  --metrics=<addr>   Serve /metrics (Prometheus), /status (JSON) and /healthz
                     (200 while every tunnel can carry users, else 503
                     and why) on host:port (port 0: any free port, named
                     in the log).
  --completion=<shell>  Print the completion script for <shell> (bash):
                     eval "$(nodepass --completion bash)", or save it as
                     /etc/bash_completion.d/nodepass.
  --man              Print this text as a man page (roff): nodepass --man |
                     man -l -, or save it as .../share/man/man1/nodepass.1.
  -h --help          Show this text.
  --version          Show the version.

Environment:
{environment}
  Durations use Go syntax: 500ms, 5s, 1m30s. SIGHUP and every RELOAD_INTERVAL
  re-read tls=2 certificates for new data connections (a broken one is logged
  and the old one kept). systemd: Type=notify readiness and WatchdogSec= work.
  NODEPASS_DEBUG_COUNTS=1 (debugging only): SIGUSR2 logs the process's
  greenlet, descriptor and memory figures.

Examples:
  nodepass 'server://0.0.0.0:10101/127.0.0.1:8080?log=debug&tls=1'
  nodepass 'client://server.example.com:10101/127.0.0.1:8080'
  nodepass --config /etc/nodepass/tunnels --metrics 127.0.0.1:9100
"""

import enum
import functools
import os
import sys
from typing import List, Optional, Union

from docopt import DocoptExit, docopt

from nodepass_gevent import __version__, tunnelset
from nodepass_gevent.config import (KEY_VARIABLE, LOG_LEVELS, SETTINGS, UDP_MODE_FLOW, WIRE_AUTO,
                                    ConfigError, format_addresses, load_settings, without_key)

PROGRAM = "nodepass"
KEY_HELP = "The shared key, if not given in the URL"
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


def environment_help() -> str:
    """The help's Environment rows: config.SETTINGS, then the shared key."""
    rows = [(s.name, s.help, "[default: %s]" % s.default) for s in SETTINGS]
    rows.append((KEY_VARIABLE, KEY_HELP, ""))
    name_width = max(len(row[0]) for row in rows) + 2
    help_width = max(len(row[1]) for row in rows if row[2]) + 3
    return "\n".join(("  " + name.ljust(name_width) + text.ljust(help_width) + default).rstrip()
                     for name, text, default in rows)


__doc__ = __doc__.replace("{environment}", environment_help())


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILURE = 1   # a tunnel could not start, or a lone one stopped on an internal error
    USAGE = 2     # bad URL, tunnels file, environment or certificate


def run(argv: Optional[List[str]] = None) -> int:
    """The console script: parse arguments, then run the tunnels until a signal."""
    from gevent import monkey
    monkey.patch_all()  # first: every socket below must be gevent's
    try:
        arguments = docopt(__doc__, argv, version="nodepass-gevent %s (NodePass v1.0 protocol)"
                           % __version__)
    except DocoptExit as exc:
        print(exc.code if isinstance(exc.code, str) else __doc__, file=sys.stderr)
        return ExitStatus.USAGE
    if arguments["status"] or arguments["--completion"] or arguments["--man"]:
        return _print_for_operator(arguments)
    try:
        return main(arguments["<url>"], check_only=arguments["--check"],
                    config_file=arguments["--config"], metrics=arguments["--metrics"])
    except KeyboardInterrupt:
        return ExitStatus.OK


def main(urls: Union[str, List[str]], check_only: bool = False,
         config_file: Optional[str] = None, metrics: Optional[str] = None) -> int:
    from nodepass_gevent import log as logging_setup, service
    from nodepass_gevent.ops import fleet
    urls = [urls] if isinstance(urls, str) else list(urls)
    if len(urls) == 1 and urls[0].startswith("master://") and not config_file:
        from nodepass_gevent.ops import master  # the management API (docs/master.md)
        if check_only:
            return _check_master(master, urls[0])
        return master.main(urls[0], service.build)
    try:
        settings = load_settings()
        if config_file:
            tunnels = tunnelset.read_file(config_file, settings)
        else:
            tunnels = tunnelset.from_urls(urls, settings)
        if len(urls) == 1 and not config_file and not check_only:
            stripped = without_key(urls[0])
            if stripped != urls[0]:
                _restart_without_key(stripped, tunnels[0].config.auth_key,
                                     ["--metrics", metrics] if metrics else [])
        contexts = {tunnel.name: fleet.server_context(tunnel) for tunnel in tunnels}
        metrics_address = _metrics_address(metrics) if metrics else None
        log_format = _one_log_format(tunnels)
    except ConfigError as exc:
        return _fail(str(exc), ExitStatus.USAGE)
    exposed = tunnelset.exposed_key(config_file, tunnels) if config_file else None
    if check_only:
        return _check(tunnels, settings, metrics_address, exposed)
    logging_setup.setup(_most_verbose(tunnel.config.log_level for tunnel in tunnels),
                        log_format=log_format)
    if exposed:
        logging_setup.log.warning("%s", exposed)
    # SIGHUP re-reads the file with the settings read at start (the environment
    # of a running process does not change).
    reread = functools.partial(_reread, config_file, settings) if config_file else None
    try:
        service.run(tunnels, contexts, settings, reread, metrics_address)
    except service.StartError as exc:
        return _fail(str(exc), ExitStatus.FAILURE)
    except service.Failure:
        return ExitStatus.FAILURE
    return ExitStatus.OK


def _check(tunnels, settings, metrics_address, exposed: Optional[str]) -> int:
    """--check after the URLs, file and certificates passed: the ports, then the report."""
    from nodepass_gevent.ops import portcheck
    findings = portcheck.check_tunnels(tunnels, metrics_address)
    fatal = [finding.message for finding in findings if finding.fatal]
    if fatal:
        return _fail(fatal[0], ExitStatus.FAILURE)  # as the start would fail
    for warning in ([exposed] if exposed else []) + [finding.message for finding in findings]:
        print("%s: warning: %s" % (PROGRAM, warning), file=sys.stderr)
    for tunnel in tunnels:
        print(_check_line(tunnel, settings))
        for note in _precedence_notes(tunnel, os.environ):
            print("  " + note)
    if metrics_address is not None:
        print("ok: metrics http://%s/metrics" % (metrics_address,))
    return ExitStatus.OK


def _check_master(master, text: str) -> int:
    """--check master://...: the URL and its TLS files as the master reads them;
    nothing listens and no state is made (nodepass-service checks with this)."""
    from nodepass_gevent.copy import tls
    try:
        master_url = master.MasterUrl(text)
        if master_url.tls == "2":
            tls.server_context(master_url.tls_config)  # crt= and key= load, as at start
    except ConfigError as exc:
        return _fail(str(exc), ExitStatus.USAGE)
    print("ok: master API on %s%s, state %s" % (master_url.address, master_url.prefix,
                                                 master_url.state))
    return ExitStatus.OK


def _precedence_notes(tunnel: "tunnelset.Tunnel", environ) -> List[str]:
    """A line for each setting both the tunnel's URL and the environment give:
    the URL (on the command line or a line of the tunnels file) wins over the
    environment, which wins over the default."""
    notes = []
    for parameter in tunnel.given:
        variable = KEY_VARIABLE if parameter == "key" else tunnelset.OVERRIDES[parameter]
        if not environ.get(variable, "").strip():
            continue
        if parameter == "key":
            notes.append("key: the URL's, not %s from the environment (the URL wins)"
                         % KEY_VARIABLE)
        else:
            value = getattr(tunnel.settings, SETTINGS_BY_NAME[variable].attribute)
            notes.append("%s=%s: the URL's, not %s=%s from the environment (the URL wins)"
                         % (parameter, _show(value), variable, environ[variable].strip()))
    return notes


def _reread(path: str, settings) -> list:
    """SIGHUP's read of the tunnels file, with the warning start-up gives."""
    from nodepass_gevent.log import log
    tunnels = tunnelset.read_file(path, settings)
    exposed = tunnelset.exposed_key(path, tunnels)
    if exposed:
        log.warning("%s", exposed)
    return tunnels


def _print_for_operator(arguments) -> int:
    """status, --completion and --man: commands that print and exit."""
    if arguments["--man"]:
        from nodepass_gevent import manpage
        print(manpage.render(__doc__, __version__), end="")
        return ExitStatus.OK
    if arguments["--completion"]:
        from nodepass_gevent import completion
        if arguments["--completion"] not in completion.SHELLS:
            return _fail("no completion for %r: this version has %s"
                         % (arguments["--completion"], ", ".join(completion.SHELLS)),
                         ExitStatus.USAGE)
        print(completion.bash_script(__version__), end="")
        return ExitStatus.OK
    from nodepass_gevent.config import parse_address
    from nodepass_gevent.ops import statusclient
    try:
        address = parse_address(arguments["--metrics"] or statusclient.DEFAULT_ADDRESS,
                                "--metrics address")
        tunnels = statusclient.fetch(address)
    except ConfigError as exc:
        return _fail(str(exc), ExitStatus.USAGE)
    except statusclient.StatusError as exc:
        return _fail(str(exc), ExitStatus.FAILURE)
    print(statusclient.table(tunnels))
    return ExitStatus.OK


def _check_line(tunnel: "tunnelset.Tunnel", settings) -> str:
    config = tunnel.config
    edge = config.edge_summary()
    line = ("ok: %s%s tunnel=%s target=%s tls=%d log=%s auth=%s%s%s%s%s"
            % (tunnel.name + ": " if tunnel.name else "", config.role,
               format_addresses(config.servers), config.target, config.tls_mode,
               config.log_level, "on" if config.auth_key else "off",
               " wire=%s" % config.wire if config.wire != WIRE_AUTO else "",
               " udp=%s" % config.udp_mode if config.udp_mode != UDP_MODE_FLOW else "",
               " data_port=%d" % config.data_port if config.data_port else "",
               " " + edge if edge else ""))
    overrides = [(parameter, getattr(tunnel.settings, SETTINGS_BY_NAME[variable].attribute))
                 for parameter, variable in tunnelset.OVERRIDES.items()
                 if getattr(tunnel.settings, SETTINGS_BY_NAME[variable].attribute)
                 != getattr(settings, SETTINGS_BY_NAME[variable].attribute)]
    return line + "".join(" %s=%s" % (name, _show(value)) for name, value in overrides)


def _show(value) -> str:
    return ("%g" % value) + "s" if isinstance(value, float) else str(value)


def _metrics_address(text: str):
    from nodepass_gevent.config import parse_address
    address = parse_address(text, "--metrics address", lowest_port=0)
    try:
        import prometheus_client  # noqa: F401 (only needed with --metrics)
    except ImportError:
        raise ConfigError("--metrics needs the prometheus-client package (pip install"
                          " prometheus-client)") from None
    return address


def _most_verbose(levels) -> str:
    """One log level for the process: the most verbose any tunnel asks for."""
    return min(levels, key=LOG_LEVELS.index)


def _one_log_format(tunnels) -> str:
    """The process writes one log format: every tunnel must ask for the same."""
    formats = {}  # type: dict
    for tunnel in tunnels:
        formats.setdefault(tunnel.config.log_format, []).append(tunnel.name or tunnel.config.role)
    if len(formats) > 1:
        who = "; ".join("%s: %s" % (name, ", ".join(names))
                        for name, names in sorted(formats.items()))
        raise ConfigError("the tunnels ask for different log formats (%s): the process writes"
                          " one; give every tunnel the same log_format=, or set it once in"
                          " NODEPASS_LOG_FORMAT" % who)
    return next(iter(formats))


def _restart_without_key(stripped_url: str, key: bytes, options: List[str] = ()) -> None:
    """Re-run this program with the key moved from argv to the environment.

    The command line is world-readable (ps, /proc/PID/cmdline); a process's
    environment is not. exec keeps the pid, so supervisors see no change.
    """
    environ = dict(os.environ)
    environ[KEY_VARIABLE] = key.decode("utf-8")
    if sys.argv[0].endswith("__main__.py"):
        program = [sys.executable, "-m", "nodepass_gevent"]
    else:
        program = [sys.executable, sys.argv[0]]
    sys.stdout.flush()
    os.execve(sys.executable, program + list(options) + [stripped_url], environ)


def _fail(message: str, status: ExitStatus) -> int:
    print("%s: error: %s" % (PROGRAM, message), file=sys.stderr)
    return status
