"""fleet.py in-process, with real roles on 127.0.0.1: a tunnel whose role fails
(a crash inside it: role.fail, as supervision calls it) is started again after
its SERVICE_COOLDOWN while the other tunnels keep their roles; a lone tunnel
fails the fleet instead (the process exits, as before).
"""

import gevent
import pytest

from nodepass_gevent import service
from nodepass_gevent.config import load_settings
from nodepass_gevent.ops.fleet import Fleet, StartError
from nodepass_gevent.tunnelset import parse_file_text, parse_tunnel

from support import HOST, free_port

pytestmark = pytest.mark.matrix

SETTINGS = load_settings({"SERVICE_COOLDOWN": "200ms", "SHUTDOWN_TIMEOUT": "500ms"})


def servers(*names):
    return parse_file_text("\n".join("%s server://%s:%d/%s:%d" % (name, HOST, free_port(), HOST,
                                                                   free_port())
                                     for name in names), SETTINGS, {})


def wait_for(predicate, timeout=5.0):
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        assert gevent.get_hub().loop.now() < deadline, "timed out"
        gevent.sleep(0.02)


def test_a_failed_tunnel_is_started_again_and_the_others_are_not_touched(
        cooperative_sockets, records):
    fleet = Fleet(service.build)
    fleet.start(servers("one", "two"), {})
    try:
        assert fleet.wait_ready(5)
        one, two = fleet.roles()
        one.fail(RuntimeError("a bug"))
        wait_for(lambda: one not in fleet.roles())
        assert [s["state"] for s in fleet.statuses()] == ["failed", "waiting"]
        wait_for(lambda: len(fleet.roles()) == 2 and fleet.ready())
        again = fleet.roles()[0]
        assert again is not one and one.closed and fleet.roles()[1] is two
        assert not fleet.failed.is_set()
        text = records.text()
        assert "one: Server: internal failure: RuntimeError('a bug'" in text
        assert "one: failed; starting it again in 0.2s" in text and "one: started again" in text
    finally:
        fleet.stop(0)
    assert all(role.closed for role in (again, two))


def test_a_lone_tunnel_that_fails_fails_the_fleet(cooperative_sockets, records):
    lone = parse_tunnel("server://%s:%d/%s:%d" % (HOST, free_port(), HOST, free_port()),
                        SETTINGS, "", {})
    fleet = Fleet(service.build, restart_failed=False)
    fleet.start([lone], {})
    try:
        fleet.roles()[0].fail("a bug")
        assert fleet.failed.wait(5)
    finally:
        fleet.stop(0)


def test_a_port_taken_at_start_stops_the_whole_set(cooperative_sockets):
    tunnels = servers("free", "taken")
    blocker = Fleet(service.build)
    blocker.start(tunnels[1:], {})  # holds the second tunnel's ports
    fleet = Fleet(service.build)
    try:
        with pytest.raises(StartError, match="tunnel taken"):
            fleet.start(tunnels, {})
        assert fleet.roles() == []
        # Nothing of the set is left listening: the first tunnel can start again.
        again = Fleet(service.build)
        again.start(tunnels[:1], {})
        again.stop(0)
    finally:
        blocker.stop(0)
