"""What operators of frp, rathole or chisel expect: JSON log lines, `nodepass
status`, bash completion and a man page made from --help. Real processes: the
CLI run as a user runs it, and for status a running tunnel pair serving
--metrics on a port the OS picked."""

import io
import json
import re
import shutil
import subprocess

import pytest

from nodepass_gevent import cli, log as logging_setup
from nodepass_gevent.config import ConfigError, parse_url
from support import FAST_ENV, HOST, NodepassProcess, free_port, run_nodepass, wait_until

JSON_KEYS = {"time", "level", "message"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d\Z")


def one_line_error(result, status: int, *words: str) -> str:
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodepass: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pair():
    """A server and its client in one process, JSON logs from the environment,
    /status on a port the OS picked."""
    tunnel, target = free_port(), free_port()
    env = dict(FAST_ENV, NODEPASS_LOG_FORMAT="json")
    process = NodepassProcess(["server://%s:%d/%s:%d" % (HOST, tunnel, HOST, target),
                               "client://%s:%d/%s:%d" % (HOST, tunnel, HOST, free_port())],
                              env, status=True)
    try:
        port = process.status_port
        wait_until(lambda: run_nodepass(["status", "--metrics", "%s:%d" % (HOST, port)])
                   .stdout.count(" up ") == 2, 15, interval=0.2, what="both tunnels up")
        yield process, port
    finally:
        process.stop_quietly()
        process.cleanup()


# -- JSON log lines --------------------------------------------------------------

def test_every_line_is_one_json_object_with_the_tunnel_name(pair):
    process, _ = pair
    lines = process.output().splitlines()
    assert len(lines) >= 3
    records = [json.loads(line) for line in lines]  # each line parses on its own
    for record in records:
        assert JSON_KEYS <= set(record) <= JSON_KEYS | {"tunnel"}, record
        assert TIME.match(record["time"]) and record["level"] in logging_setup.LEVELS
    server = [r for r in records if r.get("tunnel", "").startswith("server-")]
    client = [r for r in records if r.get("tunnel", "").startswith("client-")]
    assert server and client, lines
    # The name is a field of its own, not repeated before the message.
    assert not any(r["message"].startswith(r["tunnel"]) for r in server + client)
    assert any(r["message"].startswith("Metrics: http://") and "tunnel" not in r
               for r in records)


@pytest.mark.matrix
def test_text_stays_the_default_and_json_is_the_same_record():
    logger = logging_setup.log
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        for log_format in ("text", "json"):
            stream = io.StringIO()
            logging_setup.setup("info", stream, log_format=log_format)
            logging_setup.TunnelLog("web").warning("pool %d of %d", 3, 4)
            logging_setup.TunnelLog("").info("lone")
            first, second = stream.getvalue().splitlines()
            if log_format == "text":
                assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARN  web: pool 3 of 4\Z",
                                first), first
                assert second.endswith(" INFO  lone")
            else:
                record = json.loads(first)
                assert (record["level"], record["tunnel"], record["message"]) == \
                    ("warn", "web", "pool 3 of 4")
                assert json.loads(second) == dict(json.loads(second), level="info",
                                                  message="lone")
                assert "tunnel" not in json.loads(second)
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@pytest.mark.matrix
@pytest.mark.parametrize("url, environ, expected", [
    ("server://:1/:2", {}, "text"),
    ("server://:1/:2?log_format=json", {}, "json"),
    ("client://h:1/:2?log_format=JSON", {}, "json"),
    ("server://:1/:2", {"NODEPASS_LOG_FORMAT": "json"}, "json"),
    ("server://:1/:2?log_format=text", {"NODEPASS_LOG_FORMAT": "json"}, "text"),  # URL wins
    ("server://:1/:2", {"NODEPASS_LOG_FORMAT": " "}, "text"),
])
def test_log_format_from_the_url_or_the_environment(url, environ, expected):
    assert parse_url(url, environ).log_format == expected


@pytest.mark.matrix
@pytest.mark.parametrize("url, environ, message", [
    ("server://:1/:2?log_format=xml", {}, "bad log_format value 'xml': use text"),
    ("server://:1/:2?log_format=", {}, None),  # empty: the default
    ("server://:1/:2", {"NODEPASS_LOG_FORMAT": "yaml"}, "bad NODEPASS_LOG_FORMAT 'yaml'"),
])
def test_a_bad_log_format_is_refused(url, environ, message):
    if message is None:
        assert parse_url(url, environ).log_format == "text"
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_url(url, environ)


def test_bad_or_disagreeing_log_formats_are_one_line_errors():
    one_line_error(run_nodepass(["--check", "server://:10101/127.0.0.1:8080?log_format=xml"]),
                   2, "bad log_format value 'xml'")
    one_line_error(run_nodepass(["--check", "server://:10101/127.0.0.1:8080"],
                                env={"NODEPASS_LOG_FORMAT": "jsn"}), 2, "NODEPASS_LOG_FORMAT")
    one_line_error(run_nodepass(["--check", "server://:10101/127.0.0.1:8080?log_format=json",
                                 "client://h:10102/127.0.0.1:22"]), 2,
                   "different log formats (json: server-10101-8080; text: client-10102-22)")


# -- nodepass status ---------------------------------------------------------------

def test_status_prints_a_table_of_the_running_tunnels(pair):
    process, port = pair
    result = run_nodepass(["status", "--metrics", "%s:%d" % (HOST, port)])
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ROLE", "STATE", "PEER", "TCP", "UDP", "POOL", "DIALS",
                              "HEARTBEAT"]
    by_role = {row.split()[1]: row.split() for row in rows}
    assert set(by_role) == {"server", "client"}
    for role, cells in by_role.items():
        assert cells[0].startswith(role + "-") and cells[2] == "up"
        assert re.match(r"\d+/\d+\Z", cells[4]) and re.match(r"\d+/\d+\Z", cells[6])
    assert by_role["server"][3].startswith(HOST + ":")   # the client, seen by the server
    # The client's peer is the server it dialed: the tunnel port its name carries.
    assert by_role["client"][3] == "%s:%s" % (HOST, by_role["client"][0].split("-")[1])


def test_status_with_nothing_listening_says_how_to_switch_it_on():
    port = free_port()
    line = one_line_error(run_nodepass(["status", "--metrics", "%s:%d" % (HOST, port)]), 1,
                          "nothing answers at http://%s:%d/status" % (HOST, port),
                          "start nodepass with --metrics %s:%d" % (HOST, port))
    assert "nodepass status --metrics HOST:PORT" in line


def test_status_refuses_a_bad_address_and_reads_only_nodepass():
    one_line_error(run_nodepass(["status", "--metrics", "localhost"]), 2, "missing :port")
    with socket_answering(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n") as port:
        one_line_error(run_nodepass(["status", "--metrics", "%s:%d" % (HOST, port)]), 1,
                       "HTTP 404: not a nodepass --metrics endpoint")


class socket_answering:
    """A loopback listener that answers every connection with ``reply`` (one thread)."""

    def __init__(self, reply: bytes) -> None:
        import socket
        import threading
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(8)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    connection.recv(65536)
                    connection.sendall(self.reply)
                except OSError:
                    pass

    def __enter__(self) -> int:
        self.thread.start()
        return self.listener.getsockname()[1]

    def __exit__(self, *exc_info) -> None:
        # close() does not wake a thread blocked in accept(): shut the socket down.
        import socket
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_status_is_a_command_and_urls_run_as_before():
    """docopt: `status` is the command, not a URL; a URL is still one."""
    one_line_error(run_nodepass(["status", "server://:1/:2"]), 2, "not a URL: 'status'")
    result = run_nodepass(["--check", "server://:10101/127.0.0.1:8080"])
    assert result.returncode == 0 and result.stdout.startswith("ok: server")


# -- bash completion -----------------------------------------------------------

@pytest.fixture(scope="module")
def completion_script(tmp_path_factory):
    result = run_nodepass(["--completion", "bash"])
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("completion") / "nodepass"
    path.write_text(result.stdout)
    return path


COMPLETION_CASES = [
    # The line typed so far, bash's own word (it splits at : = &), the previous word.
    ("nodepass ", "", "nodepass", ["server://", "client://", "status"]),
    ("nodepass cl", "cl", "nodepass", ["client://"]),
    ("nodepass --me", "--me", "nodepass", ["--metrics"]),
    ("nodepass --config ", "", "--config", None),  # files
    ("nodepass status ", "", "status", ["--metrics"]),
    ("nodepass 'server://:10101/127.0.0.1:80?tl", "80?tl", ":", ["80?tls="]),
    ("nodepass server://:10101/127.0.0.1:80?tls=1&log", "log", "&", ["log=", "log_format="]),
    ("nodepass server://:10101/127.0.0.1:80?log_format=", "", "=", ["text", "json"]),
    ("nodepass client://h:10101/127.0.0.1:80?pro", "80?pro", ":", []),  # server only
    ("nodepass client://h:10101/127.0.0.1:80?mi", "80?mi", ":", ["80?min="]),
    ("nodepass server://:10101/127.0.0.1:80?mi", "80?mi", ":", []),   # client only
    ("nodepass server://:10101/127.0.0.1:80?udp=f", "f", "=", ["flow"]),
    ("nodepass client://h:10101/127.0.0.1:80?wire=", "", "=", ["auto", "1.0", "1.14"]),
]


@pytest.mark.parametrize("line, word, previous, expected", COMPLETION_CASES)
def test_bash_completes_options_schemes_and_url_parameters(completion_script, tmp_path,
                                                           line, word, previous, expected):
    bash = shutil.which("bash")
    assert bash, "bash is missing"
    (tmp_path / "nodepass.tunnels").write_text("")
    program = ('source "$1"; complete -p nodepass; COMP_LINE="$2"; COMP_POINT=${#2}; '
               'cd "$5"; _nodepass nodepass "$3" "$4"; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run([bash, "-c", program, "bash", str(completion_script), line, word,
                             previous, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=10)
    assert result.returncode == 0 and not result.stderr, result.stderr
    registered, *offered = result.stdout.splitlines()
    assert registered == "complete -F _nodepass nodepass"
    offered = [item for item in offered if item]
    if expected is None:
        assert offered == ["nodepass.tunnels"]
    else:
        assert offered == expected


def test_the_completion_names_every_url_parameter_the_parser_takes(completion_script):
    text = completion_script.read_text()
    from nodepass_gevent import tunnelset
    from nodepass_gevent.config import SERVER_PARAMS
    for name in list(SERVER_PARAMS) + list(tunnelset.OVERRIDES):
        assert " %s " % name in text or "(%s " % name in text or " %s)" % name in text, name


def test_an_unknown_shell_is_a_one_line_error():
    one_line_error(run_nodepass(["--completion", "zsh"]), 2, "no completion for 'zsh'", "bash")


# -- the man page --------------------------------------------------------------

def test_man_page_is_the_help_text_in_roff():
    result = run_nodepass(["--man"])
    assert result.returncode == 0, result.stderr
    page = result.stdout
    assert page.startswith('.TH NODEPASS 1 "" "nodepass-gevent ')
    assert "\nnodepass \\- a TCP/UDP reverse tunnel" in page
    help_text = run_nodepass(["--help"]).stdout
    headings = re.findall(r"^([A-Z][A-Za-z ]*):$", help_text, re.M)
    assert headings[:2] == ["Usage", "URLs"] and "Options" in headings
    for heading in headings:
        assert "\n.SH %s\n" % heading.upper() in page
    options = re.findall(r"^  (-\S.*?)(?:\s{2,}|$)", cli.__doc__.split("\nOptions:")[1]
                         .split("\n\n")[0], re.M)
    assert "--man" in options and "--completion=<shell>" in options
    for option in options:
        assert "\n.TP\n\\fB%s\\fR\n" % option.replace("-", "\\-") in page
    # Every other line of the help is in the page, word for word.
    for line in help_text.split("\nOptions:")[0].splitlines()[2:]:
        if line.strip() and not re.match(r"[A-Z][A-Za-z ]*:$", line):
            assert line.strip().replace("\\", "\\e").replace("-", "\\-") in page, line


def test_man_renders_without_warnings():
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("no groff on this machine")
    page = run_nodepass(["--man"]).stdout
    result = subprocess.run([groff, "-man", "-Tutf8", "-ww"], input=page,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    text = re.sub(r".\x08", "", result.stdout)
    assert "--metrics=<addr>" in text.replace("\u2010", "-") and "SERVICE_COOLDOWN" in text
