"""One module per workload; WORKLOADS numbers them as --only and the report do."""

import collections

from ..base import Workload
from .bulk import measure_bulk
from .churn import measure_churn
from .idle import measure_idle
from .latency import measure_latency
from .rate import run_rate
from .rr import measure_rr
from .tunnels import run_tunnels
from .udp import measure_udp


WORKLOADS = collections.OrderedDict(
    (w.number, w)
    for w in (
        Workload(1, "bulk", "iperf3", False, measure_bulk),
        Workload(2, "churn", "nginx", False, measure_churn),
        Workload(3, "latency", "echo", False, measure_latency),
        Workload(4, "idle", "echo", True, measure_idle),
        Workload(5, "udp", "echo", False, measure_udp),
        Workload(6, "cpu", "iperf3", False, measure_bulk),  # its figures come from workload 1
        Workload(7, "rr", "nginx", False, measure_rr),
        Workload(8, "tunnels", "echo", True, None, lambda bench, w: run_tunnels(bench, w)),
        Workload(9, "rate", "iperf3", False, None, lambda bench, w: run_rate(bench, w)),
    )
)
DEFAULT_WORKLOADS = tuple(w.number for w in WORKLOADS.values() if w.runner is None)
