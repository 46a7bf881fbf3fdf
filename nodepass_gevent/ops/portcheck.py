"""--check's look at the ports a tunnel set listens on: can each be bound now?

Each port is bound as its listener binds it (net.bind_only: SO_REUSEADDR for
TCP, the dual-stack wildcard, no SO_REUSEADDR for UDP) and released at once,
so a port another program holds fails --check with the same line (role,
address, remedy) the start would fail with. Two cases are warnings instead,
because the check cannot tell whether the start would fail:

- the port is held by a nodepass process: the usual case when the tunnels file
  of a running service is checked before a SIGHUP reload (that process keeps
  its ports); a new process could not listen there;
- this user may not bind a port below 1024: the process that runs the tunnel
  (a systemd unit with CAP_NET_BIND_SERVICE, root) may.

The holder of a taken port is looked up in /proc (Linux; only the processes
this user may see), for the line to name it.
"""

import errno
import os
import socket
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

from nodepass_gevent.base import net
from nodepass_gevent.config import Address

# Another --check of the same URL holds a UDP port for a moment (bind, close):
# a port found in use is tried again a few times before it counts as taken.
IN_USE_RETRIES = 4
IN_USE_RETRY_PAUSE = 0.02
_LISTEN_STATES = {socket.SOCK_STREAM: ("tcp", "0A"), socket.SOCK_DGRAM: ("udp", "07")}
_COMMAND_SHOWN = 60  # characters of the holder's command line in a message


class Finding(NamedTuple):
    """One port that did not bind: ``fatal`` fails --check, else a warning."""

    fatal: bool
    message: str


def listening_ports(config) -> List[Tuple[str, Address, int]]:
    """(role, address, socket kind) of every port a server tunnel listens on."""
    if config.role != "server":
        return []  # a client only dials out
    ports = [("tunnel port", config.tunnel, socket.SOCK_STREAM)]
    if config.data_port:  # 0: chosen at random at start-up, nothing to check
        ports.append(("data port (data_port=)", Address(config.tunnel.host, config.data_port),
                      socket.SOCK_STREAM))
    ports += [("target port", config.target, socket.SOCK_STREAM),
              ("target port", config.target, socket.SOCK_DGRAM)]
    return ports


def check_tunnels(tunnels: Sequence, metrics: Optional[Address]) -> List[Finding]:
    """Every finding for the set's ports (and --metrics's), in the order they listen."""
    findings = []
    for tunnel in tunnels:
        prefix = "tunnel %s: " % tunnel.describe() if tunnel.name else ""
        for role, address, kind in listening_ports(tunnel.config):
            finding = check_port(role, address, kind)
            if finding is not None:
                findings.append(finding._replace(message=prefix + finding.message))
    if metrics is not None and metrics.port:  # port 0: any free one
        finding = check_port("metrics port (--metrics)", metrics, socket.SOCK_STREAM)
        if finding is not None:
            findings.append(finding)
    return findings


def check_port(role: str, address: Address, kind: int) -> Optional[Finding]:
    """None if ``address`` binds now (it is released at once), else the Finding."""
    for attempt in range(IN_USE_RETRIES + 1):
        try:
            net.close_quietly(net.bind_only(address, kind, role))
            return None
        except net.BindError as exc:
            error = exc
            if exc.errno != errno.EADDRINUSE or attempt == IN_USE_RETRIES:
                break
            time.sleep(IN_USE_RETRY_PAUSE)
    where = "the %s at %s %s" % (role, "TCP" if kind == socket.SOCK_STREAM else "UDP", address)
    if error.errno == errno.EACCES and 0 < address.port < 1024:
        return Finding(False, "%s is below 1024: this user (uid %d) may not bind it; the"
                              " process that runs the tunnel needs root or CAP_NET_BIND_SERVICE"
                       % (where, os.getuid()))
    if error.errno != errno.EADDRINUSE:
        return Finding(True, str(error))
    holder = port_holder(address.port, kind)
    if holder is None:
        return Finding(True, str(error))
    pid, command = holder
    shown = command if len(command) <= _COMMAND_SHOWN else command[:_COMMAND_SHOWN] + "..."
    if "nodepass" in command:
        return Finding(False, "%s is held by nodepass pid %d (%s): fine if that is the process"
                              " to reload (SIGHUP); a new process could not listen there"
                       % (where, pid, shown))
    return Finding(True, "%s (held by pid %d: %s)" % (error, pid, shown))


def port_holder(port: int, kind: int) -> Optional[Tuple[int, str]]:
    """(pid, command line) of a process with a socket listening on ``port``
    (TCP LISTEN, or a bound UDP socket), from /proc; None if none is visible."""
    name, state = _LISTEN_STATES[kind]
    sockets = set()
    for table in (name, name + "6"):
        try:
            with open("/proc/net/" + table) as stream:
                rows = stream.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == state and \
                    int(fields[1].rpartition(":")[2], 16) == port:
                sockets.add("socket:[%s]" % fields[9])
    if not sockets:
        return None
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        if _holds_one_of(pid, sockets):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as stream:
                    command = stream.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                command = "?"
            return int(pid), command.strip()
    return None


def _holds_one_of(pid: str, sockets: set) -> bool:
    try:
        descriptors = os.listdir("/proc/%s/fd" % pid)
    except OSError:  # gone, or another user's
        return False
    for descriptor in descriptors:
        try:
            if os.readlink("/proc/%s/fd/%s" % (pid, descriptor)) in sockets:
                return True
        except OSError:
            continue
    return False
