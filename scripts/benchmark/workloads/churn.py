"""Workload 2: connection churn, ab without keep-alive against nginx's small file."""

from ..base import BenchError, Figures
from ..cpu import CpuMeter
from ..loadgen import run_ab
from ..targets import Route


def measure_churn(bench: "Bench", route: Route) -> Figures:
    scale = bench.scale
    meter = CpuMeter(bench, route, "nginx")
    result = run_ab(
        route.port, scale.churn_requests, scale.churn_concurrency, bench.workdir, scale.budget
    )
    if bench.strict(route.mode) and result.failed:
        raise BenchError("ab: %d of %d requests failed" % (result.failed, scale.churn_requests))
    figures = {
        "churn_rps": result.requests_per_second,
        "churn_p50": result.p50_ms,
        "churn_p99": result.p99_ms,
        "churn_failed": float(result.failed),
    }
    figures.update(meter.per_operation("churn", result.complete))
    return figures
