"""Live traffic figures: plain counters, cheap on the hot path.

All greenlets run in one thread, so an integer add needs no lock.
"""

from contextlib import contextmanager
from typing import Iterator


class Stats:
    """Counters one role keeps for its periodic report line."""

    def __init__(self) -> None:
        self.tcp_active = 0
        self.tcp_total = 0
        self.udp_total = 0
        self.bytes_in = 0   # from users / the data side towards the target
        self.bytes_out = 0  # back towards users
        # Users the server turned away (access.py) and datagrams over rate= (ratelimit.py).
        self.users_refused = 0       # TCP users refused by allow=/deny=
        self.users_over_cap = 0      # TCP users beyond per_user= from one address
        self.datagrams_refused = 0   # UDP datagrams refused by allow=/deny=
        self.datagrams_over_rate = 0  # UDP datagrams dropped by rate=
        self._reported = self.snapshot()

    def count_bytes(self, size: int, inbound: bool) -> None:
        if inbound:
            self.bytes_in += size
        else:
            self.bytes_out += size

    def counter(self, inbound: bool):
        """A callable counting bytes one way (what the copy engines call per write)."""
        return lambda size: self.count_bytes(size, inbound)

    @contextmanager
    def tcp_connection(self) -> Iterator[None]:
        """Count a TCP connection as active for the duration of the block."""
        self.tcp_active += 1
        self.tcp_total += 1
        try:
            yield
        finally:
            self.tcp_active -= 1

    def udp_exchanged(self, size_in: int, size_out: int) -> None:
        self.udp_total += 1
        self.bytes_in += size_in
        self.bytes_out += size_out

    def snapshot(self) -> tuple:
        return (self.tcp_active, self.tcp_total, self.udp_total, self.bytes_in, self.bytes_out,
                self.refusals())

    def refusals(self) -> tuple:
        return (self.users_refused, self.users_over_cap, self.datagrams_refused,
                self.datagrams_over_rate)

    def changed_since_report(self) -> bool:
        """True (once) if anything moved since the previous call, or traffic is live."""
        now = self.snapshot()
        changed = now != self._reported or self.tcp_active > 0
        self._reported = now
        return changed

    def line(self, pool_idle: int, pool_capacity: int) -> str:
        line = ("Traffic: tcp active=%d total=%d | udp exchanges=%d | bytes in=%d out=%d"
                " | pool idle=%d capacity=%d"
                % (self.tcp_active, self.tcp_total, self.udp_total, self.bytes_in,
                   self.bytes_out, pool_idle, pool_capacity))
        if any(self.refusals()):  # only with allow=, deny=, per_user= or rate= at work
            line += (" | refused tcp=%d over_cap=%d udp=%d udp_over_rate=%d"
                     % self.refusals())
        return line
