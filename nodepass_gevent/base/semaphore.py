"""The semaphore: one place per user TCP connection or UDP exchange (SEMAPHORE_LIMIT).

A user who finds every place taken waits for one: gevent's server stops
accepting until a place frees, udp.py queues the datagram. Such a wait is
the operator's sign that SEMAPHORE_LIMIT is too low, so each is counted
(``semaphore_waits``: /status and /metrics) and warned of, at most once per
FULL_WARNING_INTERVAL, so that a flood of users does not flood the log too.
"""

import time

import gevent.pool

from nodepass_gevent.base.stats import Stats

FULL_WARNING_INTERVAL = 5.0  # at most one "semaphore full" warning this often
# Users accepted this soon after a wait may have queued in the listen backlog
# and given up there; the server checks those before it spends a data
# connection on them (server.py).
BACKLOG_WINDOW = 5.0


class UserSemaphore(gevent.pool.Pool):
    """A gevent Pool of SEMAPHORE_LIMIT places whose ``full()`` is asked only by
    those about to admit a user: gevent's server before each accept (given as a
    listener's ``spawn``, the pool's ``full`` becomes the listener's) and udp.py
    before each admission. So a True answer is a user who waits, and counts."""

    def __init__(self, size: int, stats: Stats, log) -> None:
        super().__init__(size)
        self.stats, self.log = stats, log
        self._next_warning = 0.0
        self._last_wait = float("-inf")

    def free_count(self) -> int:
        """Free places. Not gevent's count of greenlets in the pool: users served
        from callbacks (tunnel/tcp.CallbackUsers) hold places without one."""
        return max(0, self._semaphore.counter)

    def full(self) -> bool:
        if not super().full():
            return False
        self.count_wait()
        return True

    def count_wait(self) -> None:
        """A user waits for a place: counted, and said (not too often)."""
        self.stats.semaphore_waits += 1
        now = self._last_wait = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + FULL_WARNING_INTERVAL
            self.log.warning("Target: SEMAPHORE_LIMIT (%d) reached: new users wait for a free"
                             " place", self.size)

    def waited_lately(self) -> bool:
        """True within BACKLOG_WINDOW of a user's wait: users may be queued."""
        return time.monotonic() - self._last_wait < BACKLOG_WINDOW
