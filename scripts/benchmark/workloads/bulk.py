"""Workload 1 (and 6, its CPU): bulk TCP through iperf3, 1 and 8 streams, both directions."""

from ..base import BenchError, Figures
from ..cpu import CpuMeter
from ..loadgen import run_iperf3
from ..targets import Route


BULK_CASES = ((1, False), (8, False), (1, True), (8, True))


def bulk_suffix(streams: int, reverse: bool) -> str:
    return "%d%s" % (streams, "r" if reverse else "f")


def measure_bulk(bench: "Bench", route: Route) -> Figures:
    figures: Figures = {}
    for streams, reverse in BULK_CASES:
        suffix = bulk_suffix(streams, reverse)
        meter = CpuMeter(bench, route, "iperf3")
        try:
            report = run_iperf3(
                route.port, streams, reverse, bench.scale.iperf_limit, bench.scale.budget
            )
        except BenchError as exc:
            raise BenchError("%d stream(s)%s: %s" % (streams, ", -R" if reverse else "", exc))
        route.settle()
        received = report["end"]["sum_received"]
        if received["bytes"] <= 0:
            raise BenchError("iperf3 moved no bytes (%d streams, reverse=%s)" % (streams, reverse))
        figures["bulk_" + suffix] = received["bits_per_second"] / 1e9
        split = meter.per_operation("bulk_" + suffix, received["bytes"] / 1e9, 1.0)
        figures.update(split)
        user, system = split.get("op_user_bulk_" + suffix), split.get("op_sys_bulk_" + suffix)
        # Workload 6: the relays' CPU per GB, user and system together.
        figures["cpu_" + suffix] = None if user is None else user + system
    return figures
