"""The failover policy (failover.py): server order, pauses, jitter, backoff."""

import random
import re
import time

import pytest
from support import HOST, echo_works, free_port, tcp_exchange, wait_until

from nodepass_gevent.config import Address
from nodepass_gevent.tunnel.failover import BACKOFF_MAX_BASE, ServerOrder

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


# -- the client process between real servers ------------------------------------

def payload_round_trip(port):
    payload = bytes(range(256)) * 400
    return tcp_exchange(port, payload) == payload


# SERVICE_COOLDOWN in FAST_ENV is 0.5 s: after a tunnel dies the client pauses
# 0.5 to 1 s (jittered), dials the next server, then fills its pool.
SWITCH_BOUND = 2 * 0.5 + 4.0


def failover_urls(echo_port, count):
    tunnels = [free_port() for _ in range(count)]
    users = [free_port() for _ in range(count)]
    servers = ["server://%s:%d/%s:%d?log=debug" % (HOST, tunnel, HOST, user)
               for tunnel, user in zip(tunnels, users)]
    client = "client://%s/%s:%d?log=debug" % (
        ",".join("%s:%d" % (HOST, tunnel) for tunnel in tunnels), HOST, echo_port)
    return servers, client, tunnels, users


def listening(server):
    server.wait_for_output("Server: tunnel ")
    return server


def served_within(port, seconds):
    started = time.monotonic()
    wait_until(lambda: echo_works(port), seconds, interval=0.05,
               what="traffic through port %d" % port)
    return time.monotonic() - started


def test_client_takes_the_first_server_that_answers(nodepass, echo):
    servers, client_url, tunnels, users = failover_urls(echo.port, 3)
    listening(nodepass(servers[2]))  # only the third is up
    client = nodepass(client_url)
    served_within(users[2], 10)
    client.wait_for_output("tunnel to %s:%d open" % (HOST, tunnels[2]))
    assert "(server 3 of 3)" in client.output()
    assert payload_round_trip(users[2])


def test_client_moves_to_the_next_server_and_wraps_round(nodepass, echo):
    servers, client_url, tunnels, users = failover_urls(echo.port, 2)
    first, second = listening(nodepass(servers[0])), listening(nodepass(servers[1]))
    client = nodepass(client_url)
    served_within(users[0], 10)
    assert "tunnel to %s:%d open" % (HOST, tunnels[0]) in client.output()
    assert "tunnel to %s:%d" % (HOST, tunnels[1]) not in client.output()  # the first answered

    first.kill()  # server 1 dies: the client moves to server 2 by itself
    seconds = served_within(users[1], SWITCH_BOUND)
    print("  failover from server 1 to server 2 in %.2fs (bound %.1fs)" % (seconds, SWITCH_BOUND))
    client.wait_for_output("tunnel to %s:%d open" % (HOST, tunnels[1]))
    assert "(server 2 of 2)" in client.output()
    assert payload_round_trip(users[1])

    first = nodepass(servers[0])  # back, but the client stays where it is...
    time.sleep(1.5)
    assert not echo_works(users[0])
    second.kill()  # ...until that one dies too: round to the first again
    seconds = served_within(users[0], SWITCH_BOUND + 1.5)  # + server 1's start-up
    print("  failover from server 2 back to server 1 in %.2fs" % seconds)
    assert client.alive()
    assert client.output().count("tunnel to %s:%d open" % (HOST, tunnels[0])) == 2


def test_no_server_answers_backs_off_and_recovers(nodepass, echo):
    servers, client_url, tunnels, users = failover_urls(echo.port, 2)
    client = nodepass(client_url)
    # Rounds of two refused dials, each round followed by a longer pause.
    wait_until(lambda: client.output().count("reconnecting in") >= 2, 10,
               what="two rounds of refused dials")
    # In a round the next server at once (no "0.0s" pause), between rounds >= cooldown.
    assert "trying the next server at once: %s:%d (server 2 of 2)" % (HOST, tunnels[1]) \
        in client.output()
    assert "cannot reach server %s:%d: Connection refused" % (HOST, tunnels[0]) \
        in client.output()
    assert "reconnecting in 0.0s" not in client.output()
    pauses = [float(p) for p in re.findall(r"reconnecting in ([0-9.]+)s", client.output())]
    assert pauses[0] >= 0.5
    round_pauses = pauses
    assert round_pauses[1] >= 1.0  # the second failed round doubles the base
    nodepass(servers[1])
    served_within(users[1], 10)
    assert client.alive()


def test_status_names_the_current_server_and_the_list():
    from nodepass_gevent.config import load_settings, parse_url
    from nodepass_gevent.tunnel.client import Client
    client = Client(parse_url("client://a.example:1,[::1]:2/127.0.0.1:80"), load_settings({}))
    status = client.status()
    assert (status["tunnel"], status["servers"], status["peer"]) == (
        "a.example:1", "a.example:1,[::1]:2", None)
    client.servers.after(True)  # its tunnel died: the next session goes to the second
    assert client.status()["tunnel"] == "[::1]:2"
