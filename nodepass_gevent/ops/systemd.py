"""systemd's notify protocol (sd_notify), in the standard library only.

With ``Type=notify`` systemd passes NOTIFY_SOCKET, a Unix datagram socket
(a path, or an abstract name written with a leading '@'); a service writes
newline-separated assignments to it: READY=1 once it serves, RELOADING=1 and
READY=1 around a reload, STOPPING=1 on the way out, STATUS=<text> for
`systemctl status`, WATCHDOG=1 at least every WATCHDOG_USEC when the unit has
WatchdogSec=. Without NOTIFY_SOCKET every call here does nothing, and a
failing socket is logged once, never raised: notification must not be what
stops a tunnel.
"""

import os
import socket
import time
from typing import Mapping, Optional

from nodepass_gevent.log import log


class Notifier:
    """The NOTIFY_SOCKET of this process, if systemd (or a test) gave one."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        self.socket_name = environ.get("NOTIFY_SOCKET", "")
        self.address = _socket_address(self.socket_name)
        self.watchdog_interval = _watchdog_interval(environ)
        self._socket = None  # type: Optional[socket.socket]
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send the assignments as one datagram; True if it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto("\n".join(assignments).encode("utf-8"), self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("systemd: cannot notify %s: %s", self.socket_name,
                            exc.strerror or exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+) match this reload to its own request.
        return self.notify("RELOADING=1", "MONOTONIC_USEC=%d" % int(time.monotonic() * 1e6))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str):
    return ["STATUS=" + text.replace("\n", " ")] if text else []


def _socket_address(text: str) -> Optional[str]:
    if not text:
        return None
    if text.startswith("@"):
        return "\0" + text[1:]  # Linux's abstract namespace
    if text.startswith("/"):
        return text
    return None  # systemd sends only these two forms (vsock ones we do not speak)


def _watchdog_interval(environ: Mapping[str, str]) -> Optional[float]:
    """How often to send WATCHDOG=1 (half the timeout, as sd_watchdog_enabled advises)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (one we were started by)
    return int(usec) / 2e6
