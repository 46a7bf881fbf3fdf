"""Token buckets for ``rate=``: a tunnel's bandwidth, one bucket per direction.

A bucket holds at most ``burst`` bytes of tokens and refills at ``rate``
bytes per second. The copy engines ask it before they move bytes, and only
once bytes are waiting to be read (so an idle connection never holds tokens):

- ``take(most)`` grants up to ``most`` bytes at once, or 0;
- on 0 the caller queues with ``wait(most, callback)``: the bucket keeps one
  timer and hands grants out first come, first served, ``callback(grant)``,
  as tokens come in. A connection that has had its turn and wants more goes
  to the back of the queue (``take`` refuses while others wait), so the
  tunnel's connections share the rate instead of the quickest taking it all;
- what a grant did not use goes back with ``give_back``.

The splice engine (zerocopy.py) caps each splice to its grant and, while it
waits, stops its read watcher, so the bytes under the limit still go
socket -> pipe -> socket in the kernel; the user-space engine (relay.py)
reads at most its grant. UDP (udp.py) polices instead: ``try_spend`` pays for
a datagram whole or it is dropped, as a router's policer would.

Grants are at least ``min_grant`` bytes (unless the bucket is smaller), so a
limited stream moves in chunks worth a system call, not byte by byte.
Single-threaded (one gevent hub): no locks.
"""

import time
from collections import deque
from typing import Callable, Optional

BURST_SECONDS = 0.1      # a bucket holds this much of its rate: the largest burst
GRANT_SECONDS = 0.02     # the smallest grant worth waiting for, as time at the rate
MIN_GRANT_BYTES = 1500   # ... but never below a packet
MAX_GRANT_BYTES = 16384  # ... nor above this, so a turn in the queue stays short
MIN_BURST_BYTES = 65536  # a bucket always holds the largest UDP datagram

Schedule = Callable[[float, Callable[[], None]], None]  # (delay, callback)


def mbit_to_bytes(mbit_per_second: float) -> float:
    return mbit_per_second * 1e6 / 8


def loop_timer(delay: float, callback: Callable[[], None]) -> None:
    """Call ``callback`` from the event loop after ``delay`` seconds (no greenlet)."""
    from gevent import get_hub
    timer = get_hub().loop.timer(delay)

    def fire() -> None:
        timer.close()
        callback()
    timer.start(fire)


class TokenBucket:
    """Tokens are bytes; see the module docstring."""

    def __init__(self, rate: float, burst: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Optional[Schedule] = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be above zero")
        self.rate = float(rate)
        self.burst = int(burst or max(rate * BURST_SECONDS, MIN_BURST_BYTES))
        self.min_grant = int(min(max(rate * GRANT_SECONDS, MIN_GRANT_BYTES), MAX_GRANT_BYTES,
                                 self.burst))
        self._clock = clock
        self._schedule = schedule or loop_timer
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._waiters = deque()  # (most, callback), first come first served
        self._timer_armed = False

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._tokens

    def _grantable(self, most: int) -> int:
        tokens = self._refill()
        return int(min(most, tokens)) if tokens >= min(self.min_grant, most) else 0

    def take(self, most: int) -> int:
        """Grant up to ``most`` bytes now; 0 if there is no grant or others wait first."""
        if self._waiters:
            return 0
        granted = self._grantable(most)
        self._tokens -= granted
        return granted

    def wait(self, most: int, callback: Callable[[int], None]) -> None:
        """Queue for a grant of up to ``most`` bytes: ``callback(grant)`` in turn."""
        self._waiters.append((most, callback))
        self._arm()

    def cancel(self, callback: Callable[[int], None]) -> None:
        """Leave the queue (a connection that ends while it waits)."""
        for waiter in self._waiters:
            if waiter[1] == callback:
                self._waiters.remove(waiter)
                return

    def give_back(self, unused: int) -> None:
        """Return the part of a grant that was not used."""
        self._tokens = min(self.burst, self._tokens + unused)

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

    def waiting(self) -> int:
        return len(self._waiters)

    def _arm(self) -> None:
        if not self._timer_armed:
            self._timer_armed = True
            self._schedule(self.delay(), self._serve_waiters)

    def _serve_waiters(self) -> None:
        self._timer_armed = False
        while self._waiters:
            most, callback = self._waiters[0]
            granted = self._grantable(min(most, MAX_GRANT_BYTES))
            if not granted:
                break
            self._waiters.popleft()
            self._tokens -= granted
            callback(granted)
        if self._waiters:
            self._arm()


class TunnelRate:
    """The two buckets of one tunnel: ``inbound`` towards the target (users'
    bytes, Stats' bytes in), ``outbound`` back towards the users."""

    def __init__(self, mbit_per_second: float,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Optional[Schedule] = None) -> None:
        self.mbit_per_second = mbit_per_second
        self.inbound = TokenBucket(mbit_to_bytes(mbit_per_second), clock=clock,
                                   schedule=schedule)
        self.outbound = TokenBucket(mbit_to_bytes(mbit_per_second), clock=clock,
                                    schedule=schedule)
