"""Token buckets for ``rate=``: a tunnel's bandwidth, one bucket per direction.

A bucket holds at most ``burst`` bytes of tokens and refills at ``rate``
bytes per second. The copy engines ask it before they move bytes:

- the splice engine (zerocopy.py) takes a grant before each splice, splices
  at most that much, and gives back what the socket did not have; with no
  grant it pauses the direction on a timer for ``delay()`` seconds, so the
  bytes under the limit still go socket -> pipe -> socket in the kernel;
- the user-space engine (relay.py) reads at most ``available()`` bytes and
  then ``spend()``s what it read (a bucket may go briefly into debt when
  several connections read at once; the next delay pays it back);
- UDP (server.py, udpflow.py) polices: a datagram the bucket cannot pay for
  at once is dropped, as a router's policer would.

Grants are at least ``min_grant`` bytes (unless the bucket is smaller), so a
limited stream moves in chunks worth a system call, not byte by byte.
Single-threaded (one gevent hub): no locks.
"""

import time
from typing import Callable

BURST_SECONDS = 0.1      # a bucket holds this much of its rate: the largest burst
GRANT_SECONDS = 0.02     # the smallest grant worth waiting for, as time at the rate
MIN_GRANT_BYTES = 1500   # ... but never below a packet
MAX_GRANT_BYTES = 16384  # ... nor above this, so bursts stay short and fair
MIN_BURST_BYTES = 65536  # a bucket always holds the largest UDP datagram


def mbit_to_bytes(mbit_per_second: float) -> float:
    return mbit_per_second * 1e6 / 8


class TokenBucket:
    """Tokens are bytes; see the module docstring."""

    def __init__(self, rate: float, burst: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be above zero")
        self.rate = float(rate)
        self.burst = int(burst or max(rate * BURST_SECONDS, MIN_BURST_BYTES))
        self.min_grant = int(min(max(rate * GRANT_SECONDS, MIN_GRANT_BYTES), MAX_GRANT_BYTES,
                                 self.burst))
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._tokens

    def available(self) -> int:
        """Bytes that may move now (0 while below a grant's worth, or in debt)."""
        tokens = self._refill()
        return int(tokens) if tokens >= self.min_grant else 0

    def take(self, most: int) -> int:
        """Grant up to ``most`` bytes now (0: none; wait ``delay()``)."""
        granted = min(most, self.available())
        if granted > 0:
            self._tokens -= granted
        return granted

    def give_back(self, unused: int) -> None:
        """Return the part of a grant that was not used."""
        self._tokens = min(self.burst, self._tokens + unused)

    def spend(self, size: int) -> None:
        """Pay for ``size`` bytes already moved; the bucket may go into debt."""
        self._refill()
        self._tokens -= size

    def try_spend(self, size: int) -> bool:
        """Pay for ``size`` bytes if the bucket holds them (a datagram: all or nothing)."""
        if self._refill() < size:
            return False
        self._tokens -= size
        return True

    def delay(self) -> float:
        """Seconds until the next grant can be had (0 if now)."""
        missing = self.min_grant - self._refill()
        return max(0.0, missing / self.rate)


class TunnelRate:
    """The two buckets of one tunnel: ``inbound`` towards the target (users'
    bytes, Stats' bytes in), ``outbound`` back towards the users."""

    def __init__(self, mbit_per_second: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mbit_per_second = mbit_per_second
        self.inbound = TokenBucket(mbit_to_bytes(mbit_per_second), clock=clock)
        self.outbound = TokenBucket(mbit_to_bytes(mbit_per_second), clock=clock)
