"""The master's event stream (``GET /events``, SSE) and its JSON as Go writes it.

A stream starts with ``retry: 3000`` and one ``initial`` event per instance
(the key pseudo-instance too), then relays what instances.py publishes:
``create``, ``update``, ``delete``, ``log`` and ``shutdown`` (after which the
stream ends), each ``event: instance`` with ``{"type", "time", "instance",
"logs"}``, as v1.14's (transcripts/master-events.txt). A comment line every
SSE_KEEPALIVE s keeps idle proxies from cutting it.
"""

import json
import time

import gevent.queue

SSE_KEEPALIVE = 15.0
SSE_BACKLOG = 1000  # events waiting for one slow stream


def json_text(body) -> bytes:
    """JSON as Go's encoder writes it (&, <, > escaped), for byte-alike replies."""
    text = json.dumps(body, separators=(",", ":"))
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            + "\n").encode("utf-8")


def stream(instances):
    """The WSGI body of one /events answer: a generator function. Its
    initial events are taken now, when the request comes."""
    subscriber = _Subscriber()
    initial = [{"type": "initial", "instance": body, "logs": ""}
               for body in instances.listing()]
    instances.subscribers.add(subscriber)

    def events():
        try:
            yield b"retry: 3000\n\n"
            for event in initial:
                yield sse_event(event)
            while not subscriber.overflowed:
                try:
                    event = subscriber.queue.get(timeout=SSE_KEEPALIVE)
                except gevent.queue.Empty:
                    yield b": keepalive\n\n"
                    continue
                yield sse_event(event)
                if event["type"] == "shutdown":
                    return
        finally:
            instances.subscribers.discard(subscriber)
    return events


class _Subscriber:
    """One /events stream's backlog. A client that stops reading would make it
    grow without end: past SSE_BACKLOG events its stream is ended instead (the
    client reconnects, as SSE clients do, and gets fresh initial events)."""

    def __init__(self) -> None:
        self.queue = gevent.queue.Queue(SSE_BACKLOG)
        self.overflowed = False

    def __call__(self, event: dict) -> None:
        try:
            self.queue.put_nowait(event)
        except gevent.queue.Full:
            self.overflowed = True


def sse_event(event: dict) -> bytes:
    body = dict(event)
    body["time"] = rfc3339_now()
    ordered = {name: body[name] for name in ("type", "time", "instance", "logs")}
    return b"event: instance\ndata: " + json_text(ordered).rstrip(b"\n") + b"\n\n"


def rfc3339_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + (
        "%.9f" % (now % 1))[1:] + "Z"
