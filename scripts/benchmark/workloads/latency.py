"""Workload 3: 1-byte ping-pongs on one connection to the echo target."""

import socket
import time

from ..base import BenchError, Figures, HOST, PING_WARMUP
from ..cpu import CpuMeter
from ..loadgen import percentile
from ..targets import Route


def measure_latency(bench: "Bench", route: Route) -> Figures:
    samples = []
    meter = CpuMeter(bench, route, "echo")
    with socket.create_connection((HOST, route.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(PING_WARMUP + bench.scale.pings):
            started = time.perf_counter()  # not perf_counter_ns: the bench runs on 3.6 too
            sock.sendall(b"x")
            reply = sock.recv(1)
            elapsed_us = (time.perf_counter() - started) * 1e6
            if reply != b"x":
                raise BenchError("ping %d: got %r instead of the echo" % (index, reply))
            if index >= PING_WARMUP:
                samples.append(elapsed_us)
    figures = {"ping_p50": percentile(samples, 50), "ping_p99": percentile(samples, 99)}
    figures.update(meter.per_operation("ping", PING_WARMUP + bench.scale.pings))
    return figures
