"""tunnelset.py: the tunnels file and command-line URLs -> checked Tunnel definitions."""

import pytest

from nodepass_gevent.config import SETTINGS as CONFIG_SETTINGS, ConfigError, load_settings
from nodepass_gevent.tunnelset import (OVERRIDES, diff, from_urls, parse_file_text,
                                       parse_tunnel, read_file, split_overrides)

pytestmark = pytest.mark.matrix

SETTINGS = load_settings({})
FILE = """\
# Two services behind one relay.
web   server://:10101/127.0.0.1:8080?tls=1&max=256      # the site
ssh   client://relay.example.com:10102/127.0.0.1:22?min=8&shutdown_timeout=10s

client://relay.example.com:10103/127.0.0.1:53?udp_read_timeout=2s
"""


def parse(text):
    return parse_file_text(text, SETTINGS, environ={})


def test_file_gives_names_overrides_and_defaults():
    web, ssh, dns = parse(FILE)
    assert (web.name, web.config.role, web.config.tls_mode) == ("web", "server", 1)
    assert web.settings.max_pool_capacity == 256
    assert web.settings.min_pool_capacity == SETTINGS.min_pool_capacity
    assert (ssh.name, ssh.settings.min_pool_capacity, ssh.settings.shutdown_timeout) == \
        ("ssh", 8, 10.0)
    assert dns.name == "client-10103-53" and dns.settings.udp_read_timeout == 2.0
    assert dns.origin == "line 5"


def test_every_setting_has_a_parameter_and_nodepass_spellings_are_used():
    assert sorted(OVERRIDES.values()) == sorted(s.name for s in CONFIG_SETTINGS
                                                if s.name != "RELOAD_INTERVAL")
    assert "reload_interval" not in OVERRIDES  # one certificate timer for the process
    assert OVERRIDES["min"] == "MIN_POOL_CAPACITY" and OVERRIDES["max"] == "MAX_POOL_CAPACITY"
    assert OVERRIDES["slot"] == "SEMAPHORE_LIMIT"


def test_overrides_are_taken_out_of_the_url_and_the_rest_kept_in_order():
    assert split_overrides("client://a:1/b:2?log=debug&min=3&tls=1#x") == \
        ("client://a:1/b:2?log=debug&tls=1#x", {"min": "3"})
    assert split_overrides("client://a:1/b:2?min=3") == ("client://a:1/b:2", {"min": "3"})
    assert split_overrides("client://a:1/b:2") == ("client://a:1/b:2", {})


def test_an_override_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"'min' is given twice \(min=3 and min=4\)"):
        split_overrides("client://a:1/b:2?min=3&tls=1&min=4")


def test_a_tunnel_remembers_what_its_url_set_itself():
    tunnel = parse_tunnel("client://k@a:1/b:2?min=3&slot=9", SETTINGS)
    assert set(tunnel.given) == {"min", "slot", "key"}
    assert parse_tunnel("client://a:1/b:2", SETTINGS).given == ()


def test_data_ports_are_checked_across_the_set():
    with pytest.raises(ConfigError, match="its tunnel port 7 is already the data port of"):
        from_urls(["server://:1/:2?data_port=7", "server://:7/:8"], SETTINGS)


def test_default_names_do_not_depend_on_the_order_of_lines():
    lines = FILE.splitlines()
    reordered = "\n".join([lines[4], lines[2], lines[1]])
    assert sorted(t.name for t in parse(reordered)) == sorted(t.name for t in parse(FILE))


@pytest.mark.parametrize("text, words", [
    ("x y z", ["line 1", "expected [NAME] URL"]),
    ("web server://:1/:2\nweb client://a:1/b:2", ["line 1 and line 2", "'web'"]),
    ("client://a:1/b:2\nclient://c:1/d:2", ["client-1-2", "give one a name"]),
    ("server://:1/:2?min=3", ["line 1", "'min' is for client:// tunnels only"]),
    ("a server://:1/:2\nb server://127.0.0.1:2/:3", ["b (line 2)", "port 2", "a (line 1)"]),
    ("a server://127.0.0.1:5/:6\nb server://127.0.0.2:5/:7\nc server://[::1]:6/:8",
     ["c (line 3)", "tunnel port 6", "target port of tunnel a"]),
    ("client://a:1/b:2?max=1&min=2", ["minimum pool (2) is larger than the maximum (1)"]),
    ("t client://a:1/b:2?max=x", ["t (line 1)", "bad max='x'"]),
    ("t client://a:1/b:2?shutdown_timeout=0s", ["bad shutdown_timeout='0s'"]),
    ("bad!name client://a:1/b:2", ["bad tunnel name 'bad!name'"]),
    ("# only a comment\n", ["no tunnel in the file"]),
    ("ok client://a:1/b:2\nnot client://a:1/b:2?tls=9", ["not (line 2)", "bad tls value"]),
    ("client://a:1/b:2?foo=1", ["unknown URL parameter 'foo'", "min, max, slot"]),
])
def test_bad_files_are_refused_with_a_line_naming_the_tunnel(text, words):
    with pytest.raises(ConfigError) as error:
        parse(text)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_different_hosts_may_share_a_port():
    tunnels = parse("a server://127.0.0.1:5/127.0.0.1:6\nb server://127.0.0.2:5/127.0.0.2:6")
    assert [t.name for t in tunnels] == ["a", "b"]


def test_read_file_names_the_file(tmp_path):
    path = tmp_path / "tunnels"
    path.write_text("x client://a:1/b:2?tls=7\n")
    with pytest.raises(ConfigError, match=str(path) + ": tunnel x"):
        read_file(str(path), SETTINGS, {})
    with pytest.raises(ConfigError, match="cannot read tunnels file"):
        read_file(str(tmp_path / "missing"), SETTINGS, {})


def test_one_url_keeps_the_empty_name_and_several_get_theirs():
    [one] = from_urls(["client://a:1/b:2"], SETTINGS, {})
    assert one.name == ""
    assert [t.name for t in from_urls(["client://a:1/b:2", "server://:3/:4"], SETTINGS, {})] \
        == ["client-1-2", "server-3-4"]


def test_keys_on_a_command_line_of_several_urls_are_refused():
    with pytest.raises(ConfigError, match="tunnel URL 2: a shared key"):
        from_urls(["client://a:1/b:2", "server://secret@:3/:4"], SETTINGS, {})
    # One URL: the CLI moves its key to the environment, as before.
    [one] = from_urls(["server://secret@:3/:4"], SETTINGS, {})
    assert one.config.auth_key == b"secret"
    # NODEPASS_KEY serves all of them; a file may hold a key per tunnel.
    both = from_urls(["client://a:1/b:2", "server://:3/:4"], SETTINGS, {"NODEPASS_KEY": "k"})
    assert {t.config.auth_key for t in both} == {b"k"}
    [keyed] = parse_file_text("t server://own@:3/:4", SETTINGS, {"NODEPASS_KEY": "k"})
    assert keyed.config.auth_key == b"own"


def test_diff_by_name_and_definition():
    old = parse("a client://h:1/t:2\nb client://h:3/t:4\nc client://h:5/t:6")
    new = parse("b client://h:3/t:4\nc client://h:5/t:6?min=2\nd client://h:7/t:8")
    added, removed, changed, unchanged = diff(old, new)
    assert [t.name for t in added] == ["d"]
    assert [t.name for t in removed] == ["a"]
    assert [t.name for t in changed] == ["c"] and changed[0].settings.min_pool_capacity == 2
    assert [t.name for t in unchanged] == ["b"]
    # Moving a line changes its origin, not its definition.
    assert parse("\n\nb client://h:3/t:4")[0] == parse("b client://h:3/t:4")[0]


def test_a_changed_key_is_a_changed_definition():
    first = parse_tunnel("server://one@:3/:4", SETTINGS, "t", {})
    second = parse_tunnel("server://two@:3/:4", SETTINGS, "t", {})
    assert first != second and "two" not in repr(second)
