"""The command line: help, version, and every kind of bad input -> one line, no traceback."""

import socket

import pytest

from nodepass_gevent.config import SETTINGS
from support import HOST, free_port, run_nodepass

pytestmark = pytest.mark.matrix  # the core suite, run on every Python


def assert_clean_failure(result, status, *words):
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nodepass: error: ")
    for word in words:
        assert word in lines[0]


def test_help_shows_url_forms_and_environment():
    result = run_nodepass(["--help"])
    assert result.returncode == 0
    for text in ("server://[KEY@]<tunnel_addr>/<target_addr>",
                 "client://[KEY@]<tunnel_addr>/<target_addr>", "NODEPASS_KEY",
                 "SEMAPHORE_LIMIT", "MIN_POOL_CAPACITY", "MAX_POOL_CAPACITY",
                 "UDP_DATA_BUF_SIZE", "UDP_READ_TIMEOUT", "REPORT_INTERVAL",
                 "SERVICE_COOLDOWN", "SHUTDOWN_TIMEOUT", "tls", "log"):
        assert text in result.stdout


def test_help_environment_section_is_made_from_the_settings_table():
    """cli.py writes its Environment rows from config.SETTINGS; the text stays this."""
    from nodepass_gevent import cli
    assert """
Environment:
  SEMAPHORE_LIMIT    Most concurrent connections and datagrams   [default: 1024]
  MIN_POOL_CAPACITY  Fewest pooled data connections (client)     [default: 16]
  MAX_POOL_CAPACITY  Most pooled data connections                [default: 1024]
  UDP_DATA_BUF_SIZE  Largest UDP datagram (v1.0 wire), bytes     [default: 8192]
  UDP_READ_TIMEOUT   How long a UDP exchange waits for a reply   [default: 5s]
  REPORT_INTERVAL    Heartbeat and traffic report interval       [default: 5s]
  SERVICE_COOLDOWN   Pause before reconnecting / re-arming       [default: 5s]
  SHUTDOWN_TIMEOUT   Grace for open connections on SIGTERM       [default: 5s]
  RELOAD_INTERVAL    How often tls=2 certificates are re-read    [default: 1h]
  NODEPASS_KEY       The shared key, if not given in the URL
  Durations use Go syntax: 500ms, 5s, 1m30s.""" in cli.__doc__
    assert [line.split()[0] for line in cli.environment_help().splitlines()] == \
        [setting.name for setting in SETTINGS] + ["NODEPASS_KEY"]


def test_version():
    result = run_nodepass(["--version"])
    assert result.returncode == 0
    assert result.stdout.startswith("nodepass-gevent ")


def test_no_arguments_prints_usage_and_fails():
    result = run_nodepass([])
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_check_accepts_a_good_url():
    result = run_nodepass(["--check", "server://:10101/127.0.0.1:8080?tls=1"])
    assert result.returncode == 0
    assert result.stdout.startswith("ok: server")


def test_check_shows_every_failover_server():
    result = run_nodepass(["--check", "client://a.example:1,[::1]:2,10.0.0.3:3/127.0.0.1:8080"])
    assert result.returncode == 0, result.stderr
    assert "tunnel=a.example:1,[::1]:2,10.0.0.3:3 " in result.stdout


def test_help_describes_failover():
    result = run_nodepass(["--help"])
    assert "client://[KEY@]<tunnel_addr>,<tunnel_addr>[,...]/<target_addr>" in result.stdout
    assert "tries the" in result.stdout


@pytest.mark.parametrize("url, words", [
    ("client://a:1,b:2,a:1/c:3", ["listed twice", "a:1"]),
    ("server://a:1,b:2/c:3", ["client:// only"]),
    ("ftp://a:1/b:2", ["unknown scheme"]),
    ("server://a/b:2", ["missing :port"]),
    ("server://a:99999/b:2", ["port"]),
    ("server://a:1/b:2?tls=7", ["tls"]),
    ("client://a:1", ["target"]),
    ("server://a:1/b:2?tls=2", ["crt"]),
])
def test_bad_urls_exit_2(url, words):
    assert_clean_failure(run_nodepass([url]), 2, *words)


@pytest.mark.parametrize("name, value", [("SEMAPHORE_LIMIT", "lots"),
                                         ("REPORT_INTERVAL", "5"),
                                         ("MIN_POOL_CAPACITY", "0")])
def test_bad_environment_exits_2(name, value):
    result = run_nodepass(["server://%s:%d/%s:%d" % (HOST, free_port(), HOST, free_port())],
                          env={name: value})
    assert_clean_failure(result, 2, name)


def test_unreadable_certificate_exits_2(tmp_path):
    url = "server://%s:%d/%s:%d?tls=2&crt=%s&key=%s" % (
        HOST, free_port(), HOST, free_port(), tmp_path / "missing.crt", tmp_path / "missing.key")
    assert_clean_failure(run_nodepass([url]), 2, "cannot read certificate")


def test_garbage_certificate_exits_2(tmp_path):
    crt, key = tmp_path / "bad.crt", tmp_path / "bad.key"
    crt.write_text("not a certificate")
    key.write_text("not a key")
    url = "server://%s:%d/%s:%d?tls=2&crt=%s&key=%s" % (HOST, free_port(), HOST, free_port(),
                                                        crt, key)
    assert_clean_failure(run_nodepass([url]), 2, "crt=%s is not a PEM file" % crt)


def test_key_not_matching_certificate_exits_2(tmp_path, test_ca):
    from support import make_test_ca
    other = make_test_ca(str(tmp_path))
    url = "server://%s:%d/%s:%d?tls=2&crt=%s&key=%s" % (HOST, free_port(), HOST, free_port(),
                                                        test_ca["crt"], other["key"])
    assert_clean_failure(run_nodepass([url]), 2, "key=%s is not the private key of the"
                         " certificate in crt=%s" % (other["key"], test_ca["crt"]))


@pytest.mark.parametrize("which", ["tunnel", "target"])
def test_port_in_use_exits_1(which):
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        used = busy.getsockname()[1]
        free = free_port()
        ports = (used, free) if which == "tunnel" else (free, used)
        result = run_nodepass(["server://%s:%d/%s:%d" % (HOST, ports[0], HOST, ports[1])])
    # Which port, what is wrong, what to do.
    assert_clean_failure(result, 1, "cannot listen on the %s port at TCP %s:%d" % (
        which, HOST, used), "Address already in use", "pick another port")


def test_unresolvable_listen_address_exits_1():
    url = "server://no-such-host.invalid:%d/%s:%d" % (free_port(), HOST, free_port())
    assert_clean_failure(run_nodepass([url]), 1, "cannot resolve")
