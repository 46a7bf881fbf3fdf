"""Workload 4: many idle connections, each verified to echo; memory per connection."""

import errno
import selectors
import socket
import time
from typing import List, Tuple

from ..base import BenchError, Figures, HOST
from ..targets import Route


def measure_idle(bench: "Bench", route: Route) -> Figures:
    scale = bench.scale
    count = scale.idle_connections
    memory_before = route.memory_kb()
    started = time.monotonic()
    sockets, failed = open_echoing(route.port, count, scale.idle_window, started + scale.budget)
    try:
        established = time.monotonic() - started
        time.sleep(1.0)  # idle, as the workload says, before memory is read
        memory_after = route.memory_kb()
        failed += len(sockets) - echo_again(sockets, time.monotonic() + scale.budget)
    finally:
        for sock in sockets:
            sock.close()
    ok = count - failed
    if failed and bench.strict(route.mode):
        raise BenchError("%d of %d idle connections did not echo" % (failed, count))
    per_connection = None
    if memory_before is not None and memory_after is not None:
        per_connection = (memory_after - memory_before) / count
    return {"idle_ok": float(ok), "idle_seconds": established, "idle_kb": per_connection}


def open_echoing(
    port: int, count: int, window: int, deadline: float
) -> Tuple[List[socket.socket], int]:
    """Open count connections, at most window of them being set up at once.

    A connection is established when a tag sent on it came back; returns the
    established sockets and how many failed (refused, cut, wrong echo, too late).
    """
    selector = selectors.DefaultSelector()
    established: List[socket.socket] = []
    failed = 0
    opened = 0
    pending = 0

    def drop(sock: socket.socket) -> None:
        selector.unregister(sock)
        sock.close()

    while (opened < count or pending) and time.monotonic() < deadline:
        while pending < window and opened < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((HOST, port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                failed += 1
            else:
                tag = b"%08d\n" % opened
                selector.register(sock, selectors.EVENT_WRITE, [tag, b""])
                pending += 1
            opened += 1
        for key, mask in selector.select(timeout=0.2):
            sock, state = key.fileobj, key.data
            if mask & selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    drop(sock)
                    failed += 1
                    pending -= 1
                    continue
                try:
                    sock.send(state[0])  # 9 bytes always fit an empty send buffer
                except OSError:
                    drop(sock)
                    failed += 1
                    pending -= 1
                    continue
                selector.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                data = sock.recv(64)
            except OSError:
                data = b""
            state[1] += data
            if data and len(state[1]) < len(state[0]):
                continue
            selector.unregister(sock)
            pending -= 1
            if state[1] == state[0]:
                established.append(sock)
            else:
                sock.close()
                failed += 1
    for key in list(selector.get_map().values()):  # still pending at the deadline
        key.fileobj.close()
    failed += pending + (count - opened)
    selector.close()
    return established, failed


def echo_again(sockets: List[socket.socket], deadline: float) -> int:
    """Send a tag on every socket at once; return how many echoed it back in time."""
    selector = selectors.DefaultSelector()
    tag = b"idle-ok\n"
    for sock in sockets:
        try:
            sock.send(tag)
        except OSError:
            continue
        selector.register(sock, selectors.EVENT_READ, [b""])
    echoed = 0
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            try:
                data = key.fileobj.recv(64)
            except OSError:
                data = b""
            key.data[0] += data
            if data and len(key.data[0]) < len(tag):
                continue
            selector.unregister(key.fileobj)
            echoed += key.data[0] == tag
    selector.close()
    return echoed
