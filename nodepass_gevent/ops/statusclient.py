"""`nodepass status`: read a running instance's /status and print a short table.

The instance serves /status only with --metrics HOST:PORT (metrics.py); this
module is its reader, plain blocking HTTP on the loopback, no gevent needed:

    NAME  ROLE    STATE  PEER             TCP  UDP  POOL   DIALS  HEARTBEAT
    web   server  up     127.0.0.1:51234  2/7  0    14/16  31/0   1.2s

TCP is open/carried, POOL idle/capacity, DIALS made/failed, HEARTBEAT the
age of the last one. Figures the instance does not report show as "-".
"""

import json
import socket
import urllib.error
import urllib.request
from typing import Dict, List, Sequence

from nodepass_gevent.config import Address

DEFAULT_ADDRESS = "127.0.0.1:9100"
TIMEOUT = 5.0
COLUMNS = ("NAME", "ROLE", "STATE", "PEER", "TCP", "UDP", "POOL", "DIALS", "HEARTBEAT")


class StatusError(Exception):
    """Nothing usable at the address: a one-line explanation for the operator."""


def fetch(address: Address, timeout: float = TIMEOUT) -> List[Dict[str, object]]:
    """The tunnels' status dicts from http://ADDRESS/status; StatusError if none."""
    url = "http://%s/status" % (Address(address.dial_host, address.port),)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        raise StatusError("%s answered HTTP %d: not a nodepass --metrics endpoint (%s)"
                          % (url, exc.code, _how_to_switch_on(address))) from None
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        raise StatusError("nothing answers at %s (%s): %s"
                          % (url, reason, _how_to_switch_on(address))) from None
    try:
        tunnels = json.loads(body.decode("utf-8"))["tunnels"]
        if not isinstance(tunnels, list) or not all(isinstance(t, dict) for t in tunnels):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise StatusError("%s is not nodepass's /status (no JSON {\"tunnels\": [...]})" % url) \
            from None
    return tunnels


def _how_to_switch_on(address: Address) -> str:
    return ("start nodepass with --metrics %s to serve /status there, or give the address"
            " it serves: nodepass status --metrics HOST:PORT" % (address,))


def table(tunnels: Sequence[Dict[str, object]]) -> str:
    """The status dicts as aligned columns, one tunnel a line."""
    rows = [COLUMNS] + [_row(tunnel) for tunnel in tunnels]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    if not tunnels:
        lines.append("(no tunnel running)")
    return "\n".join(lines)


def _row(tunnel: Dict[str, object]) -> tuple:
    return (_text(tunnel.get("name")),  # "-": the lone tunnel of a one-URL command line
            _text(tunnel.get("role")), _text(tunnel.get("state")), _text(tunnel.get("peer")),
            _pair(tunnel, "tcp_active", "tcp_total"), _text(tunnel.get("udp_datagrams")),
            _pair(tunnel, "pool_idle", "pool_capacity"),
            _pair(tunnel, "data_dials", "data_dial_failures"),
            _age(tunnel.get("last_heartbeat_age")))


def _text(value) -> str:
    return "-" if value is None or value == "" else str(value)


def _pair(tunnel: Dict[str, object], first: str, second: str) -> str:
    return "%s/%s" % (_text(tunnel.get(first)), _text(tunnel.get(second)))


def _age(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return "%.1fs" % seconds if seconds < 600 else "%dm" % (seconds // 60)

