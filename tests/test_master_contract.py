"""Our master side by side with v1.14.0's: the call sequence of
wire-v114/transcripts/master-curl.txt replayed against ours, the same status
codes, CORS headers and at least every JSON field v1.14 returned; the event
stream meanwhile carries every event type of master-events.txt with at least
its fields. The captures stay in the shared folder: skipped without them."""

import http.client
import json
import os
import re
import threading

import pytest

from support import EchoServer, free_port, wait_until
from test_master import Master

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSCRIPTS = os.environ.get(
    "NODEPASS_V114_TRANSCRIPTS",
    os.path.join(os.path.dirname(ROOT), "shared", "wire-v114", "transcripts"))
CURL = os.path.join(TRANSCRIPTS, "master-curl.txt")
EVENTS = os.path.join(TRANSCRIPTS, "master-events.txt")
CASE = re.compile(r"^=== (?:(?P<label>[^:]+): )?(?P<method>[A-Z]+) (?P<path>\S+)"
                  r"(?: body=(?P<body>.*))?")
CAPTURED_SERVER, CAPTURED_CLIENT = "8a8c1663", "503fa983"
CAPTURED_PORTS = ("10201", "18081", "19001")  # tunnel, server's users, client's target

pytestmark = pytest.mark.skipif(not os.path.exists(CURL), reason="no v1.14 captures here")


def captured_calls() -> list:
    """Each call of master-curl.txt: label, method, path, body text, and the
    reply's status, headers and JSON body (None when empty)."""
    calls, call, lines = [], None, []
    with open(CURL, encoding="utf-8") as stream:
        text = stream.read().splitlines()
    for line in text + ["=== END"]:
        match = CASE.match(line)
        if line.startswith("=== "):
            if call is not None:
                calls.append(finish(call, lines))
            call = match.groupdict() if match and match.group("method") != "END" else None
            lines = []
        elif call is not None:
            lines.append(line)
    return calls


def finish(call: dict, lines: list) -> dict:
    call["status"] = int(lines[0].split()[1])
    blank = lines.index("")
    call["headers"] = dict(line.split(": ", 1) for line in lines[1:blank])
    body = "\n".join(line for line in lines[blank + 1:]
                     if not line.startswith("docs ")).strip()  # a note after OPTIONS
    call["json"] = json.loads(body) if body else None
    return call


def field_paths(value, prefix: str = "") -> set:
    """Every key path of a JSON value ("meta.peer.sid"), list items merged."""
    paths = set()
    if isinstance(value, dict):
        for name, item in value.items():
            if prefix == "meta.tags.":
                continue  # the tags themselves are the caller's
            paths.add(prefix + name)
            paths |= field_paths(item, prefix + name + ".")
    elif isinstance(value, list):
        for item in value:
            paths |= field_paths(item, prefix)
    return paths


class EventLog:
    """Every event of an /events stream, read in a thread until it ends."""

    def __init__(self, master: Master) -> None:
        self.connection, self.reply = master.events()
        self.events = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.reply:
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[len(b"data: "):].decode()))
        except OSError:
            pass


@pytest.mark.timeout(40)
def test_curl_sequence_side_by_side(nodepass, tmp_path):
    echo = EchoServer()
    try:
        replay(nodepass, str(tmp_path), echo.port)
    finally:
        echo.close()


def replay(nodepass, state_dir: str, echo_port: int) -> None:
    master = Master(nodepass, state_dir)
    stream = EventLog(master)
    ports = {"10201": str(free_port()), "18081": str(free_port()), "19001": str(echo_port)}
    ids = {}
    for call in captured_calls():
        path, body = call["path"], call["body"]
        for captured, ours in list(ports.items()) + list(ids.items()):
            path = path.replace(captured, ours)
            body = body.replace(captured, ours) if body else body
        key = {"no key": "", "bad key": "0" * 32}.get(call["label"])
        if call["method"] == "OPTIONS":
            key = ""
        if call["label"] == "list":  # v1.14 ran 11 s here: both instances up
            wait_until(lambda: all(item["status"] == "running"
                                   for item in master.call("GET", "/instances")[1]
                                   if item["id"] != "********"), 10, what="both running")
        status, ours, reply = master.call(call["method"], path, key=key,
                                          raw=body.encode() if body else None)
        where = "%s %s" % (call["method"], call["path"])
        assert status == call["status"], (where, ours)
        for name, value in call["headers"].items():
            if name.startswith("Access-Control-") or name == "Content-Type":
                assert reply.getheader(name) == value, (where, name)
        if call["json"] is not None:
            missing = field_paths(call["json"]) - field_paths(ours)
            assert not missing, (where, sorted(missing))
        if call["label"] in ("create-server", "create-client"):
            ids[CAPTURED_SERVER if call["label"] == "create-server" else CAPTURED_CLIENT] = \
                ours["id"]
        if call["label"] == "stop":  # v1.14 gave its child 2 s; our stop is in the background
            wait_until(lambda: master.instance(ids[CAPTURED_CLIENT])["status"] == "stopped",
                       10, what="the client stopped")
    # The last call regenerated the key: the stream got "shutdown" and ended.
    stream.thread.join(10)
    compare_events(stream.events)
    stream.connection.close()


def compare_events(ours: list) -> None:
    theirs = []
    with open(EVENTS, encoding="utf-8") as capture:
        for line in capture:
            if line.startswith("data: "):
                theirs.append(json.loads(line[len("data: "):]))
    kinds = {event["type"] for event in theirs}
    assert kinds == {"initial", "create", "update", "log", "delete", "shutdown"}
    for kind in sorted(kinds):
        their_fields = set().union(*(field_paths(event) for event in theirs
                                     if event["type"] == kind))
        our_events = [event for event in ours if event["type"] == kind]
        assert our_events, "no %s event in our stream" % kind
        missing = their_fields - set().union(*(field_paths(event) for event in our_events))
        assert not missing, (kind, sorted(missing))
    assert ours[-1]["type"] == "shutdown" and ours[-1]["instance"] is None
