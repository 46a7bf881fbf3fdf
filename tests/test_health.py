"""/healthz tells the truth: real processes, real TLS, the verdict flips 200 -> 503 -> 200.

Each test breaks one thing a tunnel needs (the server's certificate is not
trusted, the server goes away, the private service is not listening), checks
the log lines, /healthz's code and body and the metric on each side, then
mends it and sees 200 again.
"""

import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodepass_gevent.base import health
from nodepass_gevent.base.lifecycle import Supervisor
from nodepass_gevent.ops.metrics import MetricsApp, unhealthy_lines
from nodepass_gevent.tunnel import pool as pool_module
from nodepass_gevent.tunnel.pool import ClientPool
from support import HOST, EchoServer, echo_works, free_port, make_test_ca, wait_until

MARGIN = 4.0  # on top of health.GRACE: a loaded CI machine


def healthz(process):
    url = "http://%s:%d/healthz" % (HOST, process.status_port)
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_health(process, code, timeout, text=""):
    """(code, body) once /healthz answers ``code`` with ``text`` in its body."""
    found = []

    def answered():
        found[:] = [healthz(process)]
        return found[0][0] == code and text in found[0][1]
    try:
        wait_until(answered, timeout, interval=0.1, what="/healthz %d %r" % (code, text))
    except AssertionError:
        raise AssertionError("last /healthz: %r\n%s" % (found, process.tail(30))) from None
    return found[0]


def samples(process):
    url = "http://%s:%d/metrics" % (HOST, process.status_port)
    with urllib.request.urlopen(url, timeout=3) as reply:
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def problem(process, role, name):
    return samples(process)[("nodepass_tunnel_problem",
                             (("name", ""), ("problem", name), ("role", role)))]


def user_tries(port, results):
    """A user in a thread: what the tunnel gave back (b"" when dropped)."""
    def run():
        try:
            with socket.create_connection((HOST, port), timeout=15) as sock:
                sock.sendall(b"hello")
                results.append(sock.recv(100))
        except OSError as exc:
            results.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def untrusted(text):
    """What OpenSSL says of a chain it cannot verify (Python 3.6 gives only the reason)."""
    return "TLS: unable to get local issuer certificate" in text or \
        "TLS: CERTIFICATE_VERIFY_FAILED" in text


def dropped_users(results):
    """How many users got nothing back (closed, or reset: their bytes were never read)."""
    return sum(1 for result in results if result == b"" or isinstance(result, ConnectionError))


def urls(tunnel_port, user_port, target_port, server_query=""):
    return ("server://%s:%d/%s:%d?log=info%s" % (HOST, tunnel_port, HOST, user_port,
                                                 server_query),
            "client://%s:%d/%s:%d?log=info" % (HOST, tunnel_port, HOST, target_port))


def test_untrusted_tls2_certificate_is_an_error_and_503_on_both_sides_until_trusted(
        nodepass, echo, test_ca, tmp_path):
    other_ca = make_test_ca(str(tmp_path))  # the client trusts this CA, not the server's
    tunnel_port, user_port = free_port(), free_port()
    server_url, client_url = urls(tunnel_port, user_port, echo.port,
                                  "&tls=2&crt=%s&key=%s" % (test_ca["crt"], test_ca["key"]))
    server = nodepass(server_url, status=True)
    assert server.status_port  # listening (the metrics line comes after the listeners)
    client = nodepass(client_url, {"SSL_CERT_FILE": other_ca["ca"]}, status=True)
    client.wait_for_output("Pool: data connection failed")
    opened = [line for line in client.output().splitlines() if " open: " in line][0]
    assert "tls=2" in opened and "verified" not in opened  # nothing verified yet
    error = [line for line in client.output().splitlines() if "Pool:" in line][0]
    assert " ERROR " in error and untrusted(error)
    assert "CA file %s" % other_ca["ca"] in error and "SSL_CERT_FILE" in error
    dropped = []
    user = user_tries(user_port, dropped)  # waits server.POOL_WAIT, then is dropped
    code, body = wait_health(client, 503, health.GRACE + MARGIN, "no data connection for")
    assert body.count("\n") == 1 and untrusted(body)
    code, body = wait_health(server, 503, MARGIN, "no data connection from client")
    assert "TLSV1_ALERT_UNKNOWN_CA" in body
    server.wait_for_output("Server: no data connection from client", 5)
    server.wait_for_output("Data: TLS handshake with client")
    assert "give the client the CA that signed crt=" in server.output()
    user.join(15)
    assert len(dropped) == 1 and dropped_users(dropped) == 1
    server.wait_for_output("Target: dropping users: no data connection ready within 5s")
    assert problem(client, "client", health.NO_DATA_CONNECTIONS) == 1
    assert problem(server, "server", health.NO_DATA_CONNECTIONS) == 1
    assert samples(server)[("nodepass_users_dropped_total",
                            (("name", ""), ("role", "server")))] == 1
    assert samples(client)[("nodepass_tunnel_healthy", (("name", ""), ("role", "client")))] == 0

    client.stop()  # the remedy the error names: trust the CA that signed crt=
    client = nodepass(client_url, {"SSL_CERT_FILE": test_ca["ca"]}, status=True)
    client.wait_for_output("tls=2 verified: CN=localhost, issued by CN=nodepass test CA")
    assert wait_health(client, 200, 10) == (200, "ok\n")
    assert wait_health(server, 200, 10) == (200, "ok\n")
    assert echo_works(user_port)
    assert problem(server, "server", health.NO_DATA_CONNECTIONS) == 0


def test_control_channel_down_is_503_on_both_sides_and_200_once_back(nodepass, echo):
    tunnel_port, user_port = free_port(), free_port()
    server_url, client_url = urls(tunnel_port, user_port, echo.port)
    server = nodepass(server_url, status=True)
    assert wait_health(server, 503, 5, "control channel down: no tunnel client")[1]
    client = nodepass(client_url, status=True)
    wait_until(lambda: echo_works(user_port), 15, what="the tunnel")
    assert wait_health(client, 200, 5) == (200, "ok\n")
    assert wait_health(server, 200, 5) == (200, "ok\n")

    server.stop()  # the client is left reconnecting
    code, body = wait_health(client, 503, 5, "control channel down for")
    assert re.search(r"\d+ tries; last: 127\.0\.0\.1:%d: " % tunnel_port, body), body
    assert problem(client, "client", health.CONTROL_DOWN) == 1
    client.wait_for_output("Client: tunnel down for", health.GRACE + MARGIN)
    line = [line for line in client.output().splitlines() if "tunnel down for" in line][0]
    assert " ERROR " in line and "users cannot be served" in line

    server = nodepass(server_url, status=True)  # the same ports again
    assert wait_health(client, 200, 10) == (200, "ok\n")
    assert wait_health(server, 200, 10) == (200, "ok\n")
    assert problem(client, "client", health.CONTROL_DOWN) == 0

    client.stop()  # now the server has no client: a user is dropped at once, and said so
    wait_health(server, 503, 5, "no tunnel client connected")
    dropped = []
    user_tries(user_port, dropped).join(10)
    assert len(dropped) == 1 and dropped_users(dropped) == 1
    server.wait_for_output("Target: dropping users: no tunnel client is connected")


def test_unbound_target_is_503_on_the_client_until_it_listens(nodepass):
    tunnel_port, user_port, target_port = free_port(), free_port(), free_port()
    server_url, client_url = urls(tunnel_port, user_port, target_port)
    server = nodepass(server_url, status=True)
    assert server.status_port
    client = nodepass(client_url, status=True)
    assert wait_health(client, 200, 10) == (200, "ok\n")
    for _ in range(3):  # three users, one log line
        dropped = []
        user_tries(user_port, dropped).join(10)
        assert len(dropped) == 1 and dropped_users(dropped) == 1
    code, body = wait_health(client, 503, 5, "TCP target 127.0.0.1:%d unreachable" % target_port)
    assert "Connection refused (3 users turned away)" in body
    assert problem(client, "client", health.TARGET_UNREACHABLE) == 1
    assert samples(client)[("nodepass_target_failures_total",
                            (("name", ""), ("role", "client")))] == 3
    lines = [line for line in client.output().splitlines() if "cannot reach TCP target" in line]
    assert len(lines) == 1 and " ERROR " in lines[0]
    # The tunnel itself works: the server cannot see the client's target.
    assert healthz(server) == (200, "ok\n")

    target = EchoServer(port=target_port)  # the service comes up: a probe notices
    try:
        started = time.monotonic()
        assert wait_health(client, 200, health.TARGET_PROBE_INTERVAL + MARGIN) == (200, "ok\n")
        assert time.monotonic() - started < health.TARGET_PROBE_INTERVAL + MARGIN
        client.wait_for_output("answers again (3 users turned away")
        assert echo_works(user_port)
    finally:
        target.close()


# -- in-process: the rules themselves -------------------------------------------------

@pytest.mark.matrix
def test_throttle_says_the_first_at_once_then_counts_what_it_held_back():
    now = [100.0]
    throttle = health.Throttle(every=30, clock=lambda: now[0])
    assert throttle.due() == 0
    now[0] += 10
    assert throttle.due() is None and throttle.due() is None
    now[0] += 25
    assert throttle.due() == 2  # the next line, with the two held back
    throttle.reset()
    assert throttle.due() == 0  # a new failure after a success is news at once


@pytest.mark.matrix
def test_healthz_body_has_one_line_per_unhealthy_tunnel_and_bounded_problem_labels():
    def status(name, state, verdict):
        figures = {"name": name, "role": "client", "state": state, "tunnel": "a:1",
                   "target": "b:2", "tls": 0, "peer": None}
        figures.update(verdict)
        return figures
    tunnels = [status("web", "up", health.verdict(None)),
               status("db", "up", health.verdict(health.TARGET_UNREACHABLE, "target down")),
               status("ssh", "waiting", health.verdict(health.CONTROL_DOWN, "control down"))]
    assert unhealthy_lines(tunnels) == ["db up: target down", "ssh waiting: control down"]
    replies = []
    app = MetricsApp(lambda: tunnels)
    body = b"".join(app({"PATH_INFO": "/healthz", "REQUEST_METHOD": "GET"},
                        lambda code, headers: replies.append(code)))
    assert replies == ["503 Service Unavailable"]
    assert body == b"db up: target down\nssh waiting: control down\n"
    text = b"".join(app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET"},
                        lambda code, headers: None)).decode()
    problems = {sample.labels["problem"] for family in text_string_to_metric_families(text)
                if family.name == "nodepass_tunnel_problem" for sample in family.samples}
    assert problems == set(health.PROBLEMS)
    tunnels[1:] = []
    assert b"".join(app({"PATH_INFO": "/healthz", "REQUEST_METHOD": "GET"},
                        lambda code, headers: replies.append(code))) == b"ok\n"


def test_a_failing_dial_loop_is_an_error_again_and_again_never_silent(records, monkeypatch):
    monkeypatch.setattr(pool_module, "DIAL_BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(pool_module, "DIAL_BACKOFF_MAX", 0.02)
    monkeypatch.setattr(health, "GRACE", 0.1)
    supervisor, working = Supervisor("Client"), []

    def dial():
        if working:
            return "%08x" % len(records.records), socket.socket()
        raise ConnectionRefusedError(111, "Connection refused")

    pool = ClientPool(dial, min_capacity=2, max_capacity=2, supervisor=supervisor,
                      remedy=lambda exc: "open the data port")
    pool.streak.throttle.every = 0.2  # health.REPEAT, shortened
    pool.start()
    try:
        def errors():
            return [text for text in records.messages(logging.ERROR)
                    if "Pool: no data connection for" in text]
        with gevent.Timeout(5):
            while len(errors()) < 3:
                gevent.sleep(0.02)
        first = [text for text in records.messages(logging.WARNING) if "Pool:" in text]
        assert first == ["Pool: data connection failed: Connection refused (retrying with"
                         " backoff)"]  # a blip is a warning; the loop becomes an error
        assert all("users cannot be served: Connection refused" in text and
                   text.endswith("; open the data port") for text in errors())
        assert pool.starved_for() > health.GRACE and pool.streak.active
        working.append(True)
        with gevent.Timeout(5):
            while not pool.idle:
                gevent.sleep(0.02)
        assert pool.starved_for() == 0 and not pool.streak.active
        assert any("data connections work again after" in text
                   for text in records.messages(logging.INFO))
    finally:
        pool.close()
        supervisor.kill()
