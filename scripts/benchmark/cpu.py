"""CPU time of the tunnel processes and of the whole machine while a workload runs."""

import resource
import time
from typing import Tuple

from .processes import proc_cpu_seconds
from .targets import Route


class CpuMeter:
    """CPU seconds while one workload's operations ran: the relays' user and system
    time, and everything else the workload runs (its load generator, whether ab, iperf3
    or the bench itself, and its target), for the per-operation table (cpu_lines); and
    how busy the whole machine was meanwhile."""

    def __init__(self, bench: "Bench", route: Route, target: str) -> None:
        self.route = route
        self.target = bench.targets.get(target)
        self.started = time.monotonic()
        self.relays = route.cpu_split()
        self.rest = self._rest_seconds()
        self.machine = machine_cpu_ticks()

    def _rest_seconds(self) -> float:
        seconds = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            seconds += usage.ru_utime + usage.ru_stime
        if self.target is not None:
            seconds += sum(proc_cpu_seconds(proc.pid) for proc in self.target.procs)
        return seconds

    def per_operation(self, key: str, operations: float, scale: float = 1e6) -> "Figures":
        """Seconds per operation times scale (µs by default) since the meter started:
        the relays' user and system time, everyone else's, and how busy the machine was."""
        wall = time.monotonic() - self.started
        rest = self._rest_seconds() - self.rest
        relays = self.route.cpu_split()
        if operations <= 0 or wall <= 0:
            return {}
        figures = {"op_rest_" + key: rest * scale / operations}
        if relays is not None and self.relays is not None:
            user, system = relays[0] - self.relays[0], relays[1] - self.relays[1]
            figures["op_user_" + key] = user * scale / operations
            figures["op_sys_" + key] = system * scale / operations
        busy, total = (after - before for after, before in zip(machine_cpu_ticks(), self.machine))
        figures["op_busy_" + key] = busy / total if total > 0 else None
        return figures


def machine_cpu_ticks() -> Tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine so far, from /proc/stat: busy counts
    every process and the kernel's own work (softirqs, ksoftirqd) alike; idle and iowait
    are not busy."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:8]]
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)
