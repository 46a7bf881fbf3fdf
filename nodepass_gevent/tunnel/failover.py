"""The client's choice of server, and of the pause before dialing it.

``client://host1:port,host2:port/...`` lists servers in the order the operator
prefers. The client dials them in that order and stays with the first that
answers. When a tunnel dies, the client moves on to the *next* server
(wrapping round) rather than the one that just failed it. A *round* is one try
of every server; the client pauses only before a round, never between the
servers of a round (one that does not answer costs only its dial):

- the first round, at start-up, begins at once;
- after a tunnel that was open dies: a pause drawn uniformly from
  [SERVICE_COOLDOWN, 2 * SERVICE_COOLDOWN), so that a fleet of clients that
  lost the same server does not arrive at the next one in lockstep;
- after a round in which no server opened a tunnel: the same, and the base
  (SERVICE_COOLDOWN) doubles with every further such round, up to
  BACKOFF_MAX_BASE; the first tunnel that opens resets it.

With one server this is exactly the behaviour of a client without failover: a
fixed SERVICE_COOLDOWN before every retry, no jitter, no doubling.

Pure policy: no sockets, no clock; ``random`` is injectable for the tests.
"""

import random as random_module
from typing import Callable, Sequence, Tuple

from nodepass_gevent.config import Address

BACKOFF_MAX_BASE = 30.0  # seconds: jittered pauses stay below twice this


class ServerOrder:
    """Which server to dial next and how long to wait first (see the module docstring)."""

    def __init__(self, servers: Sequence[Address], cooldown: float,
                 random: Callable[[], float] = random_module.random) -> None:
        if not servers:
            raise ValueError("no servers to fail over between")
        self.servers = tuple(servers)
        self.cooldown = cooldown
        self._random = random
        self._index = 0          # the server being (or about to be) dialed
        self._tried = 0          # servers tried in this round without a tunnel
        self._failed_rounds = 0  # whole rounds in a row without a tunnel

    @property
    def current(self) -> Address:
        return self.servers[self._index]

    @property
    def position(self) -> str:
        """Where ``current`` stands in the list, for the log: "server 2 of 3"."""
        return "server %d of %d" % (self._index + 1, len(self.servers))

    def after(self, opened: bool) -> Tuple[float, Address]:
        """The attempt on ``current`` ended; ``opened``: its tunnel had opened.

        Returns the pause before the next attempt and the server to dial then
        (also the new ``current``).
        """
        if len(self.servers) == 1:
            return self.cooldown, self.current
        self._index = (self._index + 1) % len(self.servers)
        if opened:
            self._tried, self._failed_rounds = 0, 0
            return self._jittered(self.cooldown), self.current
        self._tried += 1
        if self._tried < len(self.servers):
            return 0.0, self.current  # the same round: the next server at once
        self._tried = 0
        self._failed_rounds += 1
        doubled = self.cooldown * 2 ** min(self._failed_rounds - 1, 32)
        return self._jittered(max(self.cooldown, min(BACKOFF_MAX_BASE, doubled))), self.current

    def _jittered(self, base: float) -> float:
        return base * (1.0 + self._random())
