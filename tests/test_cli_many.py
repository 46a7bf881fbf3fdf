"""The command line for many tunnels: several URLs, --config, --metrics, --check."""

import socket

import pytest

from multi_support import http_get
from support import HOST, NodepassProcess, free_port, run_nodepass, wait_until

pytestmark = pytest.mark.matrix


def assert_one_line_failure(result, status, *words):
    assert result.returncode == status, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodepass: error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_check_prints_every_tunnel_with_its_own_settings():
    result = run_nodepass(["--check", "--metrics", "127.0.0.1:9100",
                           "server://:10101/127.0.0.1:8080?tls=1&max=64",
                           "client://relay:10102/127.0.0.1:22?min=4&shutdown_timeout=1m30s"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok: server-10101-8080: server tunnel=:10101 target=127.0.0.1:8080 tls=1 log=info"
        " auth=off max=64",
        "ok: client-10102-22: client tunnel=relay:10102 target=127.0.0.1:22 tls=0 log=info"
        " auth=off min=4 shutdown_timeout=90s",
        "ok: metrics http://127.0.0.1:9100/metrics",
    ]


def test_check_of_a_lone_url_prints_what_it_always_did():
    result = run_nodepass(["--check", "server://:10101/127.0.0.1:8080?tls=1"])
    assert result.stdout == "ok: server tunnel=:10101 target=127.0.0.1:8080 tls=1 log=info" \
                            " auth=off\n"


def test_check_a_tunnels_file(tmp_path):
    path = tmp_path / "tunnels"
    path.write_text("# edge\nweb server://:10101/127.0.0.1:8080\nclient://h:1/127.0.0.1:2\n")
    result = run_nodepass(["--check", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["web:", "client-1-2:"]


@pytest.mark.parametrize("args, status, words", [
    (["client://k@a:1/b:2", "client://a:3/b:4"], 2, ["tunnel URL 1", "NODEPASS_KEY"]),
    (["--config", "/nonexistent/tunnels"], 2, ["cannot read tunnels file"]),
    (["--metrics", "nowhere", "client://a:1/b:2"], 2, ["bad --metrics address"]),
    (["--metrics", "127.0.0.1:65536", "client://a:1/b:2"], 2, ["from 0 to 65535"]),
    (["server://127.0.0.1:0/b:2"], 2, ["from 1 to 65535"]),
    (["client://a:1/b:2?min=0"], 2, ["bad min='0'"]),
    (["server://a:1/b:2?min=3"], 2, ["'min' is for client:// tunnels only"]),
    (["server://:1/:2", "server://:3/:2"], 2, ["target port 2 is already the target port"]),
])
def test_bad_input_is_one_line(args, status, words):
    assert_one_line_failure(run_nodepass(args), status, *words)


def test_metrics_on_port_0_takes_a_free_port_and_logs_it():
    process = NodepassProcess("server://%s:%d/%s:%d" % (HOST, free_port(), HOST, free_port()),
                              status=True)
    try:
        assert process.status_port > 0
        assert http_get(process.status_port, "/healthz")[0] in (200, 503)
    finally:
        process.cleanup()


def test_a_taken_metrics_port_is_a_start_failure():
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_nodepass(["--metrics", "%s:%d" % (HOST, port),
                               "server://%s:%d/%s:%d" % (HOST, free_port(), HOST, free_port())])
    assert_one_line_failure(result, 1, "cannot listen on the metrics port (--metrics) at TCP"
                            " 127.0.0.1:%d" % port)
    assert result.stdout == ""  # refused before any tunnel started


def test_a_key_in_a_lone_url_leaves_the_command_line_with_the_options_kept():
    url = "server://secret-key@%s:%d/%s:%d" % (HOST, free_port(), HOST, free_port())
    process = NodepassProcess(url, status=True)
    try:
        metrics = process.status_port
        wait_until(lambda: http_get(metrics, "/status")[0] == 200, 30, interval=0.2,
                   what="the metrics endpoint")
        with open("/proc/%d/cmdline" % process.pid, "rb") as cmdline:
            arguments = cmdline.read().split(b"\0")
        assert b"--metrics" in arguments and not any(b"secret-key" in a for a in arguments)
        assert '"auth_failures": 0' in http_get(metrics, "/status")[1]
    finally:
        process.cleanup()
