"""Workload 5: request/reply datagrams, one sender and 16 concurrent senders."""

import selectors
import socket
import time
from typing import Dict, List, NamedTuple, Tuple

from ..base import BenchError, Figures, HOST, UDP_PAYLOAD_SIZE
from ..cpu import CpuMeter
from ..loadgen import percentile
from ..targets import Route


class UdpResult(NamedTuple):
    replies_per_second: float
    p50_ms: float
    p99_ms: float
    lost: int
    unsent: int
    replies: int


def exchange_datagrams(
    port: int, total: int, senders: int, timeout: float, budget: float
) -> UdpResult:
    """Send total datagrams from senders sockets, one outstanding per socket.

    A datagram with no reply within timeout is lost and the socket moves on;
    late replies are recognised by their sequence number and ignored.
    """
    selector = selectors.DefaultSelector()
    outstanding: Dict[socket.socket, Tuple[int, float]] = {}
    latencies: List[float] = []
    counters = {"next": 0, "lost": 0}
    started = time.monotonic()
    finished = started

    def send_next(sock: socket.socket) -> None:
        outstanding.pop(sock, None)
        if counters["next"] >= total or time.monotonic() - started > budget:
            return
        seq = counters["next"]
        counters["next"] += 1
        payload = (b"%d;" % seq).ljust(UDP_PAYLOAD_SIZE, b".")
        outstanding[sock] = (seq, time.monotonic())
        try:
            sock.send(payload)
        except OSError:
            pass  # counted as lost when its time is up

    sockets = []
    try:
        for _ in range(senders):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.connect((HOST, port))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        for sock in sockets:
            send_next(sock)
        while outstanding:
            oldest = min(sent for _, sent in outstanding.values())
            events = selector.select(timeout=max(0.0, oldest + timeout - time.monotonic()))
            for key, _ in events:
                sock = key.fileobj
                while True:
                    try:
                        reply = sock.recv(65536)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    seq = int(reply.split(b";", 1)[0])
                    if sock in outstanding and outstanding[sock][0] == seq:
                        now = time.monotonic()
                        latencies.append((now - outstanding[sock][1]) * 1000.0)
                        finished = now
                        send_next(sock)
            now = time.monotonic()
            for sock, (_, sent) in list(outstanding.items()):
                if now - sent > timeout:
                    counters["lost"] += 1
                    send_next(sock)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    if not latencies:
        raise BenchError("no datagram came back (%d sent)" % counters["next"])
    return UdpResult(
        len(latencies) / max(finished - started, 1e-9),
        percentile(latencies, 50),
        percentile(latencies, 99),
        counters["lost"],
        total - counters["next"],
        len(latencies),
    )


def measure_udp(bench: "Bench", route: Route) -> Figures:
    scale = bench.scale
    figures: Figures = {}
    for name, senders in (("seq", 1), ("conc", scale.udp_senders)):
        meter = CpuMeter(bench, route, "echo")
        result = exchange_datagrams(
            route.port, scale.datagrams, senders, scale.udp_timeout, scale.budget
        )
        if result.unsent:
            bench.note(
                "udp %s %s: budget of %.0f s ran out with %d datagrams unsent"
                % (name, route.mode, scale.budget, result.unsent)
            )
        if (result.lost or result.unsent) and bench.strict(route.mode):
            raise BenchError(
                "udp %s: %d of %d datagrams lost, %d unsent"
                % (name, result.lost, scale.datagrams, result.unsent)
            )
        figures.update(
            {
                "udp_%s_rps" % name: result.replies_per_second,
                "udp_%s_p50" % name: result.p50_ms,
                "udp_%s_p99" % name: result.p99_ms,
                "udp_%s_lost" % name: float(result.lost),
            }
        )
        figures.update(meter.per_operation("udp_" + name, result.replies))
    return figures
