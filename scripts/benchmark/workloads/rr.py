"""Workload 7: request/response on 50 persistent connections (ab -k) to nginx."""

from ..base import BenchError, Figures
from ..cpu import CpuMeter
from ..loadgen import run_ab
from ..targets import RR_PATH, Route


def measure_rr(bench: "Bench", route: Route) -> Figures:
    """Persistent connections, each sending a small request and waiting for the small
    reply, for a fixed time: ab -k against nginx's tiny RR_PATH reply (both native, so
    neither the load nor the target is what limits a tunnel)."""
    scale = bench.scale
    cap = max(10000, int(scale.rr_seconds * 200000))  # ab keeps 40 bytes per request
    meter = CpuMeter(bench, route, "nginx")
    result = run_ab(
        route.port,
        cap,
        scale.rr_connections,
        bench.workdir,
        scale.rr_seconds + scale.budget,
        RR_PATH,
        scale.rr_seconds,
    )
    if result.complete >= cap:
        bench.note("request/response %s: ab reached its cap of %d requests early" % (route.mode, cap))
    if result.keepalive < result.complete:
        # ab reconnects a closed connection: the workload would be measuring churn too.
        bench.note(
            "request/response %s: %d of %d requests not on a kept-alive connection"
            % (route.mode, result.complete - result.keepalive, result.complete)
        )
    if bench.strict(route.mode) and result.failed:
        raise BenchError("ab -k: %d of %d requests failed" % (result.failed, result.complete))
    figures = {
        "rr_rps": result.requests_per_second,
        "rr_p50": result.p50_ms,
        "rr_p99": result.p99_ms,
        "rr_failed": float(result.failed),
    }
    figures.update(meter.per_operation("rr", result.complete))
    return figures
