"""nodepass: a TCP/UDP reverse tunnel, speaking the NodePass v1.0 protocol.

Usage:
  nodepass <url>
  nodepass --check <url>
  nodepass (-h | --help)
  nodepass --version

URLs:
  server://[KEY@]<tunnel_addr>/<target_addr>?log=<level>&tls=<mode>&crt=<file>&key=<file>&udp=<mode>
          &proxy=<1|2>&allow=<list>&deny=<list>&rate=<Mbit/s>&per_user=<n>
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
  tls   server: TLS for data connections: 0 none (default), 1 self-signed
        certificate made at start-up, 2 the certificate in crt= and key=.
        client: the least TLS mode it accepts from the server (default 0).
  udp   server: v1 (default) carries each UDP datagram on a connection of its
        own, as NodePass v1.0; flow offers one connection per user address,
        much faster, used when the client is nodepass-gevent too.
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
  Quote the URL in a shell: & and ? are special there.

Options:
  --check       Validate the URL and environment (and load crt/key) and exit.
  -h --help     Show this text.
  --version     Show the version.

Environment:
{environment}
  Durations use Go syntax: 500ms, 5s, 1m30s.
  NODEPASS_DEBUG_COUNTS=1 (debugging only): SIGUSR2 logs the process's
  greenlet, descriptor and memory figures.

Examples:
  nodepass 'server://0.0.0.0:10101/127.0.0.1:8080?log=debug&tls=1'
  nodepass 'client://server.example.com:10101/127.0.0.1:8080'
"""

import enum
import os
import sys
from typing import List, Optional

from docopt import DocoptExit, docopt

from nodepass_gevent import __version__
from nodepass_gevent.config import (KEY_VARIABLE, SETTINGS, ConfigError, load_settings,
                                    format_addresses, parse_url, without_key)

PROGRAM = "nodepass"
KEY_HELP = "The shared key, if not given in the URL"


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
    FAILURE = 1   # the tunnel could not start or stopped on an internal error
    USAGE = 2     # bad URL, environment or certificate


def run(argv: Optional[List[str]] = None) -> int:
    """The console script: parse arguments, then run one role until a signal."""
    from gevent import monkey
    monkey.patch_all()  # first: every socket below must be gevent's
    try:
        arguments = docopt(__doc__, argv, version="nodepass-gevent %s (NodePass v1.0 protocol)"
                           % __version__)
    except DocoptExit as exc:
        print(exc.code if isinstance(exc.code, str) else __doc__, file=sys.stderr)
        return ExitStatus.USAGE
    try:
        return main(arguments["<url>"], check_only=arguments["--check"])
    except KeyboardInterrupt:
        return ExitStatus.OK


def main(url: str, check_only: bool = False) -> int:
    from nodepass_gevent import log as logging_setup, service, tls
    try:
        config = parse_url(url)
        settings = load_settings()
        stripped = without_key(url)
        if stripped != url and not check_only:
            _restart_without_key(stripped, config.auth_key)
        ssl_context = tls.server_context(config) if config.role == "server" else None
    except ConfigError as exc:
        return _fail(str(exc), ExitStatus.USAGE)
    if check_only:
        edge = config.edge_summary()
        print("ok: %s tunnel=%s target=%s tls=%d log=%s auth=%s%s"
              % (config.role, format_addresses(config.servers), config.target, config.tls_mode,
                 config.log_level, "on" if config.auth_key else "off", " " + edge if edge else ""))
        return ExitStatus.OK
    logging_setup.setup(config.log_level)
    try:
        service.run(config, settings, ssl_context)
    except service.StartError as exc:
        return _fail(str(exc), ExitStatus.FAILURE)
    except service.Failure:
        return ExitStatus.FAILURE
    return ExitStatus.OK


def _restart_without_key(stripped_url: str, key: bytes) -> None:
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
    os.execve(sys.executable, program + [stripped_url], environ)


def _fail(message: str, status: ExitStatus) -> int:
    print("%s: error: %s" % (PROGRAM, message), file=sys.stderr)
    return status
