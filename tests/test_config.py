"""URL and environment parsing: pure functions, good and bad cases in tables."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from nodepass_gevent.config import (SETTINGS, Address, ConfigError, Settings, load_settings,
                                    parse_duration, parse_url)

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

GOOD_URLS = [
    ("server://10.1.0.1:10101/10.1.0.1:8080?log=debug&tls=0",
     ("server", Address("10.1.0.1", 10101), Address("10.1.0.1", 8080), "debug", 0)),
    ("server://:10101/127.0.0.1:8080?tls=1",
     ("server", Address("", 10101), Address("127.0.0.1", 8080), "info", 1)),
    ("server://0.0.0.0:10101/127.0.0.1:8080?log=warn&tls=2&crt=/c.pem&key=/k.pem",
     ("server", Address("0.0.0.0", 10101), Address("127.0.0.1", 8080), "warn", 2)),
    ("client://server.example.com:10101/127.0.0.1:8080",
     ("client", Address("server.example.com", 10101), Address("127.0.0.1", 8080), "info", 0)),
    ("client://[::1]:10101/[::1]:8080?log=error&tls=2",
     ("client", Address("::1", 10101), Address("::1", 8080), "error", 2)),
    ("client://nodepass-server:10101/web-service:80?log=FATAL",
     ("client", Address("nodepass-server", 10101), Address("web-service", 80), "fatal", 0)),
    # An IPv6 zone: ipaddress reads one only from 3.9 on, parse_url on every Python.
    ("client://[fe80::1%eth0]:10101/127.0.0.1:8080",
     ("client", Address("fe80::1%eth0", 10101), Address("127.0.0.1", 8080), "info", 0)),
]

BAD_URLS = [
    ("", "not a URL"),
    ("10.1.0.1:10101/127.0.0.1:8080", "not a URL"),
    ("tcp://a:1/b:2", "unknown scheme"),
    ("server:///127.0.0.1:8080", "missing tunnel address"),
    ("server://127.0.0.1:10101", "missing target address"),
    ("server://127.0.0.1/127.0.0.1:8080", "missing :port"),
    ("server://127.0.0.1:0/127.0.0.1:8080", "port must be"),
    ("server://127.0.0.1:70000/127.0.0.1:8080", "port must be"),
    ("server://127.0.0.1:http/127.0.0.1:8080", "port must be"),
    ("server://::1:10101/127.0.0.1:8080", "brackets"),
    ("server://[::1/127.0.0.1:8080", "ipv6"),
    ("server://[10.0.0.1]:1/127.0.0.1:8080", "brackets"),
    # The same answer on every Python, whatever urllib and ipaddress of that
    # release would say: leading zeros, control characters, ';' in a query.
    ("server://010.0.0.1:1/127.0.0.1:8080", "not an IPv4"),
    ("server://[::ffff:010.0.0.1]:1/127.0.0.1:8080", "not an IPv6"),
    ("server://[fe80::1%]:1/127.0.0.1:8080", "not an IPv6"),
    ("server://a\t:1/b:2", "control character"),
    ("server://a:1/b:2\n", "control character"),
    ("server://a:1/b:2?log=debug;tls=1", "bad log level"),
    ("server://a:\uff11\uff12/b:2", "port must be"),
    ("server://300.1.1.1:1/127.0.0.1:8080", "not an IPv4"),
    ("server://bad_host!:1/127.0.0.1:8080", "not a host name"),
    ("server://a:1/b:2?tls=3", "bad tls value"),
    ("server://a:1/b:2?tls=", "bad tls value"),
    ("server://a:1/b:2?log=loud", "bad log level"),
    ("server://a:1/b:2?tls=2", "needs both crt"),
    ("server://a:1/b:2?tls=2&crt=/c.pem", "needs both crt"),
    ("server://a:1/b:2?tls=1&crt=/c.pem&key=/k.pem", "only with tls=2"),
    ("server://a:1/b:2?tsl=1", "unknown URL parameter"),
    ("server://a:1/b:2?udp=fast", "bad udp value"),
    ("client://a:1/b:2?udp=flow", "unknown URL parameter"),
    ("client://a:1/b:2?crt=/c.pem", "unknown URL parameter"),
    ("server://user:pw@a:1/b:2", "no user:password"),
    ("server://@a:1/b:2", "empty shared key"),
    # Failover lists: client only, every address checked, no blanks or repeats.
    ("server://a:1,b:2/c:3", "for client:// only"),
    ("client://a:1,/c:3", "empty tunnel address (number 2)"),
    ("client://,a:1/c:3", "empty tunnel address (number 1)"),
    ("client://a:1,b/c:3", "missing :port"),
    ("client://a:1,b:0/c:3", "port must be"),
    ("client://a:1,[::1/c:3", "ipv6"),
    ("client://a:1,010.0.0.1:2/c:3", "not an IPv4"),
    ("client://a:1,b:2,a:1/c:3", "listed twice"),
    ("client://k@a:1,u:p@b:2/c:3", "no user:password"),
    # A parameter given twice: neither value is taken.
    ("server://a:1/b:2?tls=1&tls=0", "'tls' is given twice (tls=1 and tls=0)"),
    ("server://a:1/b:2?log=debug&log=", "'log' is given twice"),
    ("client://a:1/b:2?tls=0&tls=0", "'tls' is given twice"),
    # data_port= (server): a port of its own.
    ("server://a:1/b:2?data_port=1", "data_port=1 is the tunnel port"),
    ("server://a:1/b:2?data_port=65536", "bad data_port value '65536'"),
    ("server://a:1/b:2?data_port=-5", "bad data_port value '-5'"),
    ("server://a:1/b:2?data_port=", "bad data_port value ''"),
    ("client://a:1/b:2?data_port=5", "unknown URL parameter 'data_port'"),
]


@pytest.mark.parametrize("query, port", [("", 0), ("?data_port=0", 0), ("?data_port=7000", 7000),
                                         ("?data_port=65535", 65535)])
def test_data_port(query, port):
    """Absent or 0: chosen at random at start-up (server.py), as v1.0 does."""
    assert parse_url("server://a:1/b:2" + query).data_port == port


@pytest.mark.parametrize("url, expected", GOOD_URLS)
def test_good_urls_parse(url, expected):
    config = parse_url(url)
    assert (config.role, config.tunnel, config.target, config.log_level,
            config.tls_mode) == expected


@pytest.mark.parametrize("url, message", BAD_URLS)
def test_bad_urls_are_rejected_with_a_reason(url, message):
    with pytest.raises(ConfigError) as error:
        parse_url(url)
    assert message.lower() in str(error.value).lower()
    assert "\n" not in str(error.value)


def test_failover_list_keeps_order():
    config = parse_url("client://key@h1.example:10101,[::1]:10102,10.0.0.3:10103/127.0.0.1:80")
    assert config.servers == (Address("h1.example", 10101), Address("::1", 10102),
                              Address("10.0.0.3", 10103))
    assert config.tunnel == Address("h1.example", 10101)
    assert config.auth_key == b"key"  # one key for all the servers


def test_one_tunnel_address_is_a_list_of_one():
    config = parse_url("client://h1:10101/127.0.0.1:80")
    assert config.servers == (Address("h1", 10101),)
    assert config.tunnels == ()  # the Config is the one it always was


def test_udp_mode_offers_flows_unless_pinned_to_v1():
    assert parse_url("server://a:1/b:2").udp_mode == "flow"
    assert parse_url("server://a:1/b:2?udp=flow").udp_mode == "flow"
    assert parse_url("server://a:1/b:2?udp=v1").udp_mode == "v1"


def test_address_formats_back_to_url_form():
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("", 80)) == ":80"
    assert Address("", 80).dial_host == "localhost"


@given(st.text(max_size=200))
def test_any_text_parses_or_is_rejected_cleanly(text):
    for prefix in ("", "server://", "client://"):
        try:
            parse_url(prefix + text)
        except ConfigError:
            pass


DURATIONS = [("500ms", 0.5), ("5s", 5.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("2h45m", 9900.0),
             ("300us", 0.0003), ("10ns", 1e-8), ("0", 0.0), (".5s", 0.5), ("-1s", -1.0)]


@pytest.mark.parametrize("text, seconds", DURATIONS)
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "5x", "1m30", "ms5", "--1s"])
def test_bad_durations(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_settings_defaults_are_the_seeds():
    assert load_settings({}) == Settings(1024, 16, 1024, 8192, 5.0, 5.0, 5.0, 5.0)


def test_settings_from_environment():
    settings = load_settings({"SEMAPHORE_LIMIT": "2048", "MIN_POOL_CAPACITY": "32",
                              "MAX_POOL_CAPACITY": "4096", "UDP_DATA_BUF_SIZE": "16384",
                              "UDP_READ_TIMEOUT": "10s", "REPORT_INTERVAL": "1s",
                              "SERVICE_COOLDOWN": "3s", "SHUTDOWN_TIMEOUT": "1m"})
    assert settings == Settings(2048, 32, 4096, 16384, 10.0, 1.0, 3.0, 60.0)


def test_settings_fields_and_defaults_come_from_the_table():
    assert [f.name for f in dataclasses.fields(Settings)] == \
        [setting.name.lower() for setting in SETTINGS]
    for setting, value in zip(SETTINGS, dataclasses.astuple(Settings())):
        assert value == setting.parse(setting.default)
        assert type(value) is (int if setting.kind == "int" else float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().semaphore_limit = 1


@pytest.mark.parametrize("environ, message", [
    ({"SEMAPHORE_LIMIT": "many"}, "SEMAPHORE_LIMIT"),
    ({"SEMAPHORE_LIMIT": "0"}, "at least 1"),
    ({"MIN_POOL_CAPACITY": "-4"}, "MIN_POOL_CAPACITY"),
    ({"MIN_POOL_CAPACITY": "64", "MAX_POOL_CAPACITY": "32"}, "larger than"),
    ({"UDP_DATA_BUF_SIZE": "100000"}, "at most"),
    ({"UDP_READ_TIMEOUT": "5"}, "UDP_READ_TIMEOUT"),
    ({"REPORT_INTERVAL": "0s"}, "longer than zero"),
    ({"SERVICE_COOLDOWN": "-1s"}, "longer than zero"),
    ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT"),
])
def test_bad_settings_are_rejected(environ, message):
    with pytest.raises(ConfigError) as error:
        load_settings(environ)
    assert message in str(error.value)


@pytest.mark.parametrize("url, environ, key", [
    ("server://a:1/b:2", {}, None),
    ("server://s3cret@a:1/b:2", {}, b"s3cret"),
    ("client://p%40ss%2Fword@[::1]:1/b:2", {}, b"p@ss/word"),
    ("client://a:1/b:2", {"NODEPASS_KEY": "from-env"}, b"from-env"),
    ("client://url-wins@a:1/b:2", {"NODEPASS_KEY": "from-env"}, b"url-wins"),
])
def test_shared_key_from_url_or_environment(url, environ, key):
    config = parse_url(url, environ)
    assert config.auth_key == key
    assert "s3cret" not in repr(config) and "from-env" not in repr(config)


@pytest.mark.parametrize("url, stripped", [
    ("server://s3cret@a:1/b:2?tls=1", "server://a:1/b:2?tls=1"),
    ("client://k%40y@[::1]:1/b:2", "client://[::1]:1/b:2"),
    ("server://a:1/b:2?crt=/x@y", "server://a:1/b:2?crt=/x@y"),
])
def test_key_is_removed_from_the_url(url, stripped):
    from nodepass_gevent.config import without_key
    assert without_key(url) == stripped


def test_v114_np_spellings_of_the_variables_are_read():
    settings = load_settings({"NP_SEMAPHORE_LIMIT": "64", "NP_UDP_READ_TIMEOUT": "30s",
                              "REPORT_INTERVAL": "2s", "NP_REPORT_INTERVAL": "2s"})
    assert (settings.semaphore_limit, settings.udp_read_timeout) == (64, 30.0)
    assert settings.report_interval == 2.0


@pytest.mark.parametrize("environ, words", [
    ({"SEMAPHORE_LIMIT": "8", "NP_SEMAPHORE_LIMIT": "9"}, "disagree"),
    ({"NP_TCP_DIAL_TIMEOUT": "soon"}, "NP_TCP_DIAL_TIMEOUT"),
    ({"NP_TCP_DATA_BUF_SIZE": "0"}, "NP_TCP_DATA_BUF_SIZE"),
])
def test_v114_np_variables_are_checked(environ, words):
    with pytest.raises(ConfigError, match=words):
        load_settings(environ)
    assert load_settings({"NP_HANDSHAKE_TIMEOUT": "5s"}) == load_settings({})


@pytest.mark.parametrize("role", ["server", "client"])
def test_v114_pool_types_other_than_tcp_are_refused_in_one_line(role):
    url = "%s://127.0.0.1:10101/127.0.0.1:8080?type=" % role
    assert parse_url(url + "0").role == role
    with pytest.raises(ConfigError, match=r"type=2 \(WebSocket\) is not supported yet: only"
                                          r" type=0, the TCP pool"):
        parse_url(url + "2")
    with pytest.raises(ConfigError, match="bad type value '9'"):
        parse_url(url + "9")
