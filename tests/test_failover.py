"""The failover policy (failover.py): server order, pauses, jitter, backoff."""

import random

import pytest

from nodepass_gevent.config import Address
from nodepass_gevent.failover import BACKOFF_MAX_BASE, ServerOrder

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

A, B, C = Address("a", 1), Address("b", 2), Address("c", 3)
COOLDOWN = 5.0


def order(*servers, draws=None):
    """A ServerOrder whose jitter draws come from ``draws`` (default: always 0.5)."""
    values = iter(draws) if draws is not None else None
    return ServerOrder(servers, COOLDOWN,
                       random=(lambda: next(values)) if values is not None else (lambda: 0.5))


def test_one_server_behaves_as_without_failover():
    """Fixed SERVICE_COOLDOWN, same server, no jitter, no doubling: nothing changes."""
    single = ServerOrder([A], COOLDOWN, random=lambda: pytest.fail("no jitter with one server"))
    assert single.current == A
    for opened in (True, False, False, False, True):
        assert single.after(opened) == (COOLDOWN, A)


def test_starts_with_the_first_and_tries_the_rest_of_a_round_at_once():
    servers = order(A, B, C)
    assert servers.current == A and servers.position == "server 1 of 3"
    assert servers.after(False) == (0.0, B)
    assert servers.after(False) == (0.0, C)
    assert servers.position == "server 3 of 3"


def test_a_dead_tunnel_moves_on_to_the_next_server_after_a_jittered_cooldown():
    servers = order(A, B, C, draws=[0.0, 0.999, 0.5])
    assert servers.after(True) == (COOLDOWN, B)            # draw 0.0: the cooldown itself
    pause, server = servers.after(True)
    assert server == C and pause == pytest.approx(COOLDOWN * 1.999)
    assert servers.after(True) == (COOLDOWN * 1.5, A)      # wraps round


def test_rounds_without_a_tunnel_back_off_doubling_up_to_the_cap():
    servers = order(A, B)
    pauses = []
    for _ in range(12):
        servers.after(False)                   # A fails: B at once
        pauses.append(servers.after(False)[0])  # B fails too: end of a round
    bases = [pause / 1.5 for pause in pauses]
    assert bases[:4] == [COOLDOWN, 2 * COOLDOWN, 4 * COOLDOWN, min(BACKOFF_MAX_BASE, 8 * COOLDOWN)]
    assert max(bases) == BACKOFF_MAX_BASE and bases[-1] == BACKOFF_MAX_BASE
    assert servers.current == A                # every round starts from where it left off


def test_an_open_tunnel_resets_the_backoff():
    servers = order(A, B)
    for _ in range(3):
        servers.after(False)
        servers.after(False)
    assert servers.after(False) == (0.0, B)
    assert servers.after(True) == (COOLDOWN * 1.5, A)  # B opened, then died: plain cooldown
    servers.after(False)
    assert servers.after(False) == (COOLDOWN * 1.5, A)  # the first failed round again


def test_a_fleet_does_not_reconnect_in_lockstep():
    """100 clients that lose the same server at once pause for 100 different times,
    spread over [cooldown, 2 * cooldown)."""
    rng = random.Random(13)
    pauses = [ServerOrder([A, B], COOLDOWN, random=rng.random).after(True)[0]
              for _ in range(100)]
    assert all(COOLDOWN <= pause < 2 * COOLDOWN for pause in pauses)
    assert len(set(pauses)) == 100
    # Spread: no 0.5s window holds more than a fifth of the fleet.
    assert max(sum(1 for p in pauses if start <= p < start + 0.5)
               for start in (COOLDOWN + k * 0.1 for k in range(46))) <= 20


def test_needs_a_server():
    with pytest.raises(ValueError):
        ServerOrder([], COOLDOWN)
