"""Master mode (ops/master.py): a real master process on loopback, driven with http.client."""

import http.client
import json
import os
import re
import signal
import socket
import stat
import time

import pytest

from support import echo_works, free_port, udp_exchange, wait_until

LISTENING = re.compile(r"Master API listening on http://127\.0\.0\.1:(\d+)/api/v1")
KEY_CREATED = re.compile(r"API Key created: ([0-9a-f]{32})")


class Master:
    """One master process and an http.client to it."""

    def __init__(self, nodepass, state_dir: str, extra: str = "") -> None:
        self.process = nodepass("master://127.0.0.1:0?state=%s%s" % (state_dir, extra))
        wait_until(lambda: LISTENING.search(self.process.output()) or not self.process.alive(),
                   10, what="the master's address in its log")
        match = LISTENING.search(self.process.output())
        assert match, self.process.tail()
        self.port = int(match.group(1))
        with open(os.path.join(state_dir, "master.json")) as stream:
            self.key = json.load(stream)["key"]

    def call(self, method: str, path: str, body=None, key=None, raw: bytes = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"X-API-Key": self.key if key is None else key} if key != "" else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                             else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, "/api/v1" + path, data, headers)
        reply = connection.getresponse()
        payload = reply.read()
        connection.close()
        return reply.status, (json.loads(payload.decode()) if payload else None), reply

    def events(self, **headers):
        """An open /events stream: (its connection, to close; the reply, to read)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers["X-API-Key"] = self.key
        connection.request("GET", "/api/v1/events", headers=headers)
        return connection, connection.getresponse()

    def instance(self, instance_id: str) -> dict:
        status, body, _ = self.call("GET", "/instances/" + instance_id)
        assert status == 200, body
        return body


def tunnel_pair(master, echo):
    """A server and a client instance carrying users of ``user_port`` to the echo."""
    tunnel_port, user_port = free_port(), free_port()
    status, server, _ = master.call("POST", "/instances", {
        "alias": "srv", "url": "server://127.0.0.1:%d/127.0.0.1:%d" % (tunnel_port, user_port),
        "unknown_field": 1})
    assert status == 201, server
    assert server["status"] == "stopped" and server["restart"] is True
    status, client, _ = master.call("POST", "/instances", {
        "url": "client://127.0.0.1:%d/127.0.0.1:%d" % (tunnel_port, echo.port)})
    assert status == 201, client
    # config: the URL with the values in force written out, keys sorted.
    assert server["config"] == ("server://127.0.0.1:%d/127.0.0.1:%d?data_port=0&log=info&max="
                                "1024&proxy=0&slot=1024&tls=0&udp=v1" % (tunnel_port, user_port))
    assert "min=" in client["config"] and "udp=" not in client["config"]
    return server["id"], client["id"], user_port


@pytest.mark.timeout(30)
def test_key_cors_and_refusals(nodepass, tmp_path):
    master = Master(nodepass, str(tmp_path))
    assert KEY_CREATED.search(master.process.output()).group(1) == master.key
    assert stat.S_IMODE(os.stat(str(tmp_path / "master.json")).st_mode) == 0o600
    status, body, reply = master.call("GET", "/info", key="")
    assert (status, body) == (401, {"error": "Unauthorized: API key required"})
    assert reply.getheader("Access-Control-Allow-Origin") == "*"
    status, body, _ = master.call("GET", "/instances", key="0" * 32)
    assert (status, body) == (401, {"error": "Unauthorized: Invalid API key"})
    status, body, reply = master.call("OPTIONS", "/instances", key="")
    assert status == 200 and "X-API-Key" in reply.getheader("Access-Control-Allow-Headers")
    status, body, _ = master.call("GET", "/instances")
    assert status == 200 and body[-1]["id"] == "********" and body[-1]["url"] == master.key
    assert master.call("POST", "/instances", {"url": "master://127.0.0.1:1/api"})[:2] == (
        400, {"error": "Invalid URL scheme"})
    status, body, _ = master.call("POST", "/instances", raw=b"{not json")
    assert status == 400 and body["error"].startswith("Invalid request body")
    assert master.call("POST", "/instances", raw=b"x" * (65 * 1024))[0] == 413
    chunked = http.client.HTTPConnection("127.0.0.1", master.port, timeout=10)
    chunked.request("POST", "/api/v1/instances", iter([b'{"url": "udp://', b'1.2.3.4:5"}']),
                    {"X-API-Key": master.key}, encode_chunked=True)
    reply = chunked.getresponse()
    assert (reply.status, json.loads(reply.read().decode())) == (
        400, {"error": "Invalid URL scheme"})
    chunked.close()
    assert master.call("GET", "/instances/deadbeef")[:2] == (404, {"error": "Instance not found"})
    assert master.call("DELETE", "/instances")[:2] == (405, {"error": "Method not allowed"})
    assert master.call("DELETE", "/instances/********")[0] == 403
    status, info, _ = master.call("GET", "/info")
    assert status == 200 and info["mem_total"] > 0 and info["os"] == "linux"
    status, probe, _ = master.call("GET", "/tcping?target=127.0.0.1:%d" % master.port)
    assert status == 200 and probe["connected"] is True and probe["error"] is None
    # Over-long values and bodies that are not what a route takes: 400 with a reason.
    url = "server://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port())
    for body, reason in (({"url": url, "alias": "a" * 257}, "Alias exceeds 256"),
                         ({"url": url + "?" + "x" * 4096}, "URL longer than 4096"),
                         ({"url": url + "?nosuch=1"}, "Invalid URL: unknown URL parameter"),
                         ({"url": url + "?mode=2"}, "Invalid URL: mode=2 is not supported"),
                         ({"url": 5}, "Invalid URL")):
        status, answer, _ = master.call("POST", "/instances", body)
        assert status == 400 and answer["error"].startswith(reason), (body, answer)
    for raw, reason in ((b"[1, 2]", "a JSON object is expected"), (b"\xff{}", "Invalid request")):
        status, answer, reply = master.call("POST", "/info", raw=raw)
        assert status == 400 and reason in answer["error"], answer
        assert reply.getheader("Access-Control-Allow-Origin") == "*"
    status, answer, _ = master.call("PATCH", "/instances/********", {"meta": {"tags": {
        "k": "v" * 300}}})
    assert status == 200  # v1.14: only the key's regeneration does anything there
    # OPTIONS on any path, with or without a key: 200, empty, v1.14's CORS headers.
    for path in ("/instances/deadbeef", "/nothing", "/events"):
        status, body, reply = master.call("OPTIONS", path, key="")
        assert (status, body, reply.getheader("Content-Length")) == (200, None, "0")
        assert reply.getheader("Access-Control-Allow-Methods") == (
            "GET, PATCH, POST, PUT, DELETE, OPTIONS")
        assert reply.getheader("Access-Control-Allow-Headers") == (
            "Content-Type, Authorization, X-API-Key, Cache-Control")


def probe(master, path: str, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", master.port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    reply = connection.getresponse()
    text = reply.read().decode()
    connection.close()
    return reply.status, text


@pytest.mark.timeout(20)
def test_master_healthz_status_and_metrics(nodepass, tmp_path):
    state = tmp_path / "state"
    master = Master(nodepass, str(state))
    assert probe(master, "/healthz") == (200, "ok\n")
    url = "server://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port())
    created = master.call("POST", "/instances", {"url": url})[1]
    master.call("PATCH", "/instances/" + created["id"], {"action": "stop"})
    wait_until(lambda: master.instance(created["id"])["status"] == "stopped", 10,
               what="the instance stopped")
    assert probe(master, "/status")[0] == 401
    assert probe(master, "/metrics", {"Authorization": "Bearer " + "0" * 32})[0] == 401
    status, text = probe(master, "/status", {"Authorization": "Bearer " + master.key})
    assert status == 200
    assert [(tunnel["name"], tunnel["state"]) for tunnel in json.loads(text)["tunnels"]] == [
        (created["id"], "stopped")]
    status, text = probe(master, "/metrics", {"X-API-Key": master.key})
    assert status == 200 and 'nodepass_tunnel_up{name="%s",role="server"} 0.0' % (
        created["id"]) in text
    # The state directory gone: 503 and why; back, and the next probe saves again.
    state.rename(tmp_path / "away")
    status, text = probe(master, "/healthz")
    assert status == 503 and "state directory" in text and "gone" in text
    status, body, _ = master.call("PATCH", "/instances/" + created["id"], {"alias": "x"})
    assert status == 500 and "cannot write the state file" in body["error"]
    (tmp_path / "away").rename(state)
    assert probe(master, "/healthz") == (200, "ok\n")
    with open(str(state / "master.json")) as saved:
        assert json.load(saved)["instances"][0]["alias"] == "x"


@pytest.mark.timeout(40)
def test_instances_carry_stop_delete_and_survive_kill(nodepass, echo, tmp_path):
    master = Master(nodepass, str(tmp_path))
    server_id, client_id, user_port = tunnel_pair(master, echo)
    wait_until(lambda: echo_works(user_port), 10, what="an echo through the instances")
    figures = master.instance(server_id)
    assert figures["status"] == "running" and figures["tcprx"] > 0, figures
    assert (figures["mode"], master.instance(client_id)["mode"]) == (1, 2)
    assert figures["pool"] > 0 and (figures["udprx"], figures["udptx"]) == (0, 0)
    # UDP bytes apart from TCP bytes, on both instances.
    tcp_before = {name: master.instance(name)["tcprx"] for name in (server_id, client_id)}
    assert udp_exchange(user_port, b"u" * 100) == b"u" * 100
    for instance_id in (server_id, client_id):
        after = master.instance(instance_id)
        assert (after["udprx"], after["udptx"]) == (100, 100), after
        assert after["tcprx"] == tcp_before[instance_id] > 0, after
    # ping: the control connection's round trip, in ms (0 on loopback); the
    # kernel's measure of it is in /status.
    status, text = probe(master, "/status", {"X-API-Key": master.key})
    rtts = [tunnel["control_rtt"] for tunnel in json.loads(text)["tunnels"]]
    assert all(0 < rtt < 0.5 for rtt in rtts), rtts
    assert isinstance(figures["ping"], int) and 0 <= figures["ping"] < 500
    assert master.call("PATCH", "/instances/" + server_id, {"action": "reset"})[0] == 200
    wait_until(lambda: master.instance(server_id)["tcprx"] == 0, 5, what="counters reset")
    assert master.call("PATCH", "/instances/" + server_id, {"action": "explode"})[:2] == (
        400, {"error": "Invalid action: explode"})
    status, body, _ = master.call("PATCH", "/instances/" + client_id, {"action": "stop"})
    assert status == 200
    wait_until(lambda: master.instance(client_id)["status"] == "stopped", 10,
               what="the client instance stopped")
    assert not echo_works(user_port)
    same = master.instance(server_id)["url"]
    assert master.call("PUT", "/instances/" + server_id, {"url": same})[:2] == (
        409, {"error": "Instance URL conflict"})
    # The stopped client keeps restart=true: after a kill -9 both run again.
    master.process.send_signal(signal.SIGKILL)
    master.process.wait(5)
    again = Master(nodepass, str(tmp_path))
    assert again.key == master.key and "API Key created" not in again.process.output()
    ids = [item["id"] for item in again.call("GET", "/instances")[1]]
    assert ids == [server_id, client_id, "********"]
    wait_until(lambda: echo_works(user_port), 10, what="the echo after the restart")
    moved_port = free_port()
    moved = again.instance(server_id)["url"].replace(":%d?" % user_port, ":%d?" % moved_port)
    status, body, _ = again.call("PUT", "/instances/" + server_id, {"url": moved})
    assert status == 200 and body["url"] == moved, body
    wait_until(lambda: echo_works(moved_port), 10, what="the echo on the moved user port")
    assert not echo_works(user_port)
    user_port = moved_port
    assert again.call("DELETE", "/instances/" + client_id)[0] == 204
    assert again.call("GET", "/instances/" + client_id)[0] == 404
    wait_until(lambda: not echo_works(user_port), 10, what="the echo gone with the client")


@pytest.mark.timeout(20)
def test_a_failing_instance_is_error_and_harms_no_one(nodepass, tmp_path):
    master = Master(nodepass, str(tmp_path), "&metrics=127.0.0.1:0")
    taken = free_port()
    status, first, _ = master.call("POST", "/instances", {
        "url": "server://127.0.0.1:%d/127.0.0.1:%d" % (taken, free_port())})
    assert status == 201
    wait_until(lambda: master.instance(first["id"])["status"] == "running", 10,
               what="the first server running")
    status, second, _ = master.call("POST", "/instances", {
        "url": "server://127.0.0.1:%d/127.0.0.1:%d" % (taken, free_port())})
    wait_until(lambda: master.instance(second["id"])["status"] == "error", 10,
               what="the second server, on a taken port, in error")
    assert master.instance(first["id"])["status"] == "running"
    # metrics=: every instance in /status, by id, the failed one too.
    metrics_port = int(re.search(r"Metrics: http://127\.0\.0\.1:(\d+)/metrics",
                                 master.process.output()).group(1))
    connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
    connection.request("GET", "/status")
    tunnels = json.loads(connection.getresponse().read().decode())["tunnels"]
    connection.close()
    assert [(tunnel["name"], tunnel["state"]) for tunnel in tunnels] == [
        (first["id"], "waiting"), (second["id"], "failed")]  # waiting: no client


def read_events(reply, wanted: int, logs=None) -> list:
    """The next ``wanted`` SSE events (``data:`` JSON) of a /events reply;
    ``log`` events go to ``logs`` instead (they come between the others)."""
    events = []
    while len(events) < wanted:
        line = reply.readline()
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            event = json.loads(line[len(b"data: "):].decode())
            if event["type"] == "log" and logs is not None:
                logs.append(event)
            else:
                events.append(event)
    return events


@pytest.mark.timeout(20)
def test_events_initial_create_update_delete(nodepass, tmp_path):
    master = Master(nodepass, str(tmp_path))
    connection, reply = master.events()
    assert reply.status == 200 and reply.getheader("Content-Type") == "text/event-stream"
    assert reply.readline() == b"retry: 3000\n"
    initial = read_events(reply, 1)[0]
    assert initial["type"] == "initial" and initial["instance"]["id"] == "********"
    status, created, _ = master.call("POST", "/instances", {
        "url": "server://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port())})
    logs = []
    create, running = read_events(reply, 2, logs)
    assert create["type"] == "create" and create["instance"]["status"] == "stopped"
    assert running["type"] == "update" and running["instance"]["status"] == "running"
    master.call("PATCH", "/instances/" + created["id"], {"action": "stop"})
    assert read_events(reply, 1, logs)[0]["instance"]["status"] == "stopped"
    assert any("Server: tunnel" in event["logs"] and event["instance"]["id"] == created["id"]
               for event in logs), logs
    assert master.call("DELETE", "/instances/" + created["id"])[0] == 204
    deleted = read_events(reply, 1, logs)[0]
    assert deleted["type"] == "delete" and deleted["instance"]["id"] == created["id"]
    connection.close()


@pytest.mark.timeout(20)
def test_sigterm_is_fast_and_keeps_key_instances_and_policy(nodepass, echo, tmp_path):
    master = Master(nodepass, str(tmp_path))
    status, created, _ = master.call("POST", "/instances", {
        "url": "server://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port())})
    master.call("PATCH", "/instances/" + created["id"], {"restart": False, "alias": "kept"})
    assert master.call("PATCH", "/instances/" + created["id"], {"alias": "x" * 257})[0] == 400
    server_id, client_id, user_port = tunnel_pair(master, echo)
    wait_until(lambda: echo_works(user_port), 10, what="an echo through the instances")
    # Instances running, a user connected through them, an event stream open.
    user = socket.create_connection(("127.0.0.1", user_port), timeout=5)
    stream, events = master.events()
    assert [event["type"] for event in read_events(events, 4)] == ["initial"] * 4
    started = time.monotonic()
    assert master.process.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 1.0, master.process.tail()
    assert [event["type"] for event in read_events(events, 1, logs=[])] == ["shutdown"]
    stream.close()
    user.close()
    again = Master(nodepass, str(tmp_path))
    assert again.key == master.key and "API Key created" not in again.process.output()
    kept = again.instance(created["id"])
    assert (kept["alias"], kept["restart"], kept["status"]) == ("kept", False, "stopped")
    wait_until(lambda: echo_works(user_port), 10, what="the echo after the SIGTERM restart")
    assert again.instance(server_id)["status"] == again.instance(client_id)["status"] == (
        "running")


@pytest.mark.timeout(20)
def test_openapi_document_and_router_agree(nodepass, tmp_path):
    master = Master(nodepass, str(tmp_path))
    status, document, _ = master.call("GET", "/openapi.json", key="")
    assert status == 200 and document["openapi"] == "3.1.1"
    status, _, _ = master.call("GET", "/events", key="0" * 32)
    assert status == 401
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item if method != "parameters"}
    # Every documented route is served (never 404/405): an unknown id gives the
    # route's own 404 body, a bad body the route's own 400.
    for path, method in sorted(documented):
        if path in ("/events", "/docs"):
            continue  # a stream (test_events_initial_create_update_delete), a page (below)
        concrete = path.replace("{id}", "deadbeef")
        status, body, _ = master.call(method, concrete + ("?target=127.0.0.1:1"
                                                          if path == "/tcping" else ""),
                                      raw=b"{}" if method in ("POST", "PATCH", "PUT") else None)
        assert status not in (405,) and body != {"error": "Not found"}, (method, path, body)
    # And every route or method the document leaves out is refused.
    for method in ("GET", "POST", "PATCH", "PUT", "DELETE"):
        for path in ("/instances", "/instances/{id}", "/info", "/tcping", "/events"):
            if (path, method) not in documented:
                status, _, _ = master.call(method, path.replace("{id}", "deadbeef"))
                assert status == 405, (method, path)
    assert master.call("GET", "/nothing")[:2] == (404, {"error": "Not found"})
    connection = http.client.HTTPConnection("127.0.0.1", master.port, timeout=10)
    connection.request("GET", "/api/v1/docs")
    page = connection.getresponse()
    assert page.status == 200 and b"/api/v1/openapi.json" in page.read()
    connection.close()


@pytest.mark.timeout(20)
def test_tls_masters_at_tls1_and_tls2(nodepass, tmp_path, test_ca):
    """tls=1: a self-signed certificate; tls=2: the crt=/key= files, which a
    client trusting the test CA verifies. Both under their own prefix."""
    import ssl
    https = re.compile(r"Master API listening on https://127\.0\.0\.1:(\d+)/manage/v1")
    own = nodepass("master://127.0.0.1:0/manage?tls=1&state=%s" % (tmp_path / "one"))
    files = nodepass("master://127.0.0.1:0/manage?tls=2&crt=%s&key=%s&state=%s" % (
        test_ca["crt"], test_ca["key"], tmp_path / "two"))
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    verified = ssl.create_default_context(cafile=test_ca["ca"])
    verified.check_hostname = False  # the test certificate names localhost, we dial 127.0.0.1
    for process, context in ((own, unverified), (files, verified)):
        wait_until(lambda: https.search(process.output()) or not process.alive(), 10,
                   what="the https master's address")
        assert "no TLS" not in process.output()
        port = int(https.search(process.output()).group(1))
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        connection.request("GET", "/manage/v1/info")
        reply = connection.getresponse()
        assert (reply.status, json.loads(reply.read().decode())) == (
            401, {"error": "Unauthorized: API key required"})
        connection.close()
    # The tls=1 master's certificate is its own: a client trusting the CA refuses it.
    port = int(https.search(own.output()).group(1))
    with pytest.raises(ssl.SSLError):
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                                 context=verified)
        connection.request("GET", "/manage/v1/info")


@pytest.mark.timeout(5)
def test_clear_text_warning_off_loopback_only():
    from nodepass_gevent.ops.master import MasterUrl, clear_text_warning
    assert "has no TLS" in clear_text_warning(MasterUrl("master://0.0.0.0:9090/api"))
    assert "has no TLS" in clear_text_warning(MasterUrl("master://:9090"))
    for url in ("master://127.0.0.1:9090", "master://[::1]:9090", "master://localhost:1",
                "master://0.0.0.0:9090?tls=1"):
        assert clear_text_warning(MasterUrl(url)) is None, url


@pytest.mark.timeout(20)
def test_dashboard_call_sequence(nodepass, tmp_path):
    """The calls NodePassDash makes (wire-v114 README), in its order."""
    master = Master(nodepass, str(tmp_path))
    stream, events = master.events(**{"Cache-Control": "no-cache"})
    assert read_events(events, 1)[0]["type"] == "initial"
    listing = [item for item in master.call("GET", "/instances")[1] if item["id"] != "********"]
    assert listing == []
    assert master.call("GET", "/info")[1]["ver"]
    url = "server://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port())
    status, created, _ = master.call("POST", "/instances", {"url": url})
    assert status == 201
    path = "/instances/" + created["id"]
    assert master.call("PATCH", path, {"alias": "web"})[1]["alias"] == "web"
    assert master.call("PATCH", path, {"restart": False})[1]["restart"] is False
    assert master.call("PATCH", path, {"action": "restart"})[0] == 200
    new_url = "server://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port())
    assert master.call("PUT", path, {"url": new_url})[0] == 200
    wait_until(lambda: master.instance(created["id"])["status"] == "running", 10,
               what="the instance running on its new URL")
    for _ in range(5):  # the dashboard's tcping: 5 times, 100 ms apart
        probe = master.call("GET", "/tcping?target=127.0.0.1:%d" % master.port)[1]
        assert probe["connected"] is True
        time.sleep(0.1)
    assert master.call("DELETE", path)[0] == 204
    kinds = [event["type"] for event in read_events(events, 1)]
    while "delete" not in kinds:
        kinds += [event["type"] for event in read_events(events, 1)]
    assert kinds.count("create") == 1 and "update" in kinds
    stream.close()


@pytest.mark.timeout(20)
def test_key_regeneration_ends_streams(nodepass, tmp_path):
    master = Master(nodepass, str(tmp_path))
    stream, events = master.events()
    read_events(events, 1)
    status, body, _ = master.call("PATCH", "/instances/********", {"action": "restart"})
    assert status == 200 and body["url"] != master.key and len(body["url"]) == 32
    shutdown = read_events(events, 1)[0]
    assert shutdown["type"] == "shutdown" and shutdown["instance"] is None
    assert events.read().strip() == b""  # the stream ends after it
    stream.close()
    assert master.call("GET", "/instances")[0] == 401
    with open(str(tmp_path / "master.json")) as state:
        assert json.load(state)["key"] == body["url"]
    assert master.call("GET", "/instances", key=body["url"])[0] == 200
