"""The semaphore's waits (semaphore.py): counted each, warned of once per interval.

End to end, test_hostile.py floods a server past SEMAPHORE_LIMIT over TCP and
UDP and reads the same figure from /status.
"""

import logging

import gevent
import gevent.event
import pytest

from nodepass_gevent.base import semaphore
from nodepass_gevent.base.semaphore import UserSemaphore
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.log import TunnelLog

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

WARNING = "Target: SEMAPHORE_LIMIT (1) reached: new users wait for a free place"


def warnings(records) -> list:
    return [message for message in records.messages(logging.WARNING) if message == WARNING]


@pytest.fixture
def held():
    """A semaphore of one place, taken by a user that stays until the test ends."""
    users, leave = UserSemaphore(1, Stats(), TunnelLog("")), gevent.event.Event()
    users.spawn(leave.wait)
    yield users
    leave.set()
    users.join(timeout=5)


def test_a_free_place_is_no_wait(records):
    users = UserSemaphore(1, Stats(), TunnelLog(""))
    assert not users.full()
    assert users.stats.semaphore_waits == 0 and not warnings(records)


def test_each_wait_counts_and_a_burst_warns_once(held, records):
    assert held.full() and held.full()
    held.count_wait()  # a datagram queued behind others (udp.py)
    assert held.stats.semaphore_waits == 3
    assert warnings(records) == [WARNING]


def test_the_warning_comes_again_after_the_interval(held, records, monkeypatch):
    monkeypatch.setattr(semaphore, "FULL_WARNING_INTERVAL", 0.05)
    assert held.full()
    gevent.sleep(0.1)
    assert held.full() and held.full()
    assert held.stats.semaphore_waits == 3
    assert warnings(records) == [WARNING, WARNING]
