"""What every part of the bench shares: the modes, the scales (full and --smoke),
the error type and the progress line.
"""

import os
import sys
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple



# scripts/benchmark/base.py -> the checkout's root
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"

MODES = ("direct", "socat", "tls0", "tls1")
TUNNEL_MODES = ("tls0", "tls1")
MODE_TITLES = {
    "direct": "direct",
    "socat": "socat",
    "tls0": "nodepass tls=0",
    "tls1": "nodepass tls=1",
}

# Comparing interpreters (--pythons): figures of the older ones within 10% of the newest's.
PYTHONS_WORKLOADS = (1, 2, 3, 4, 6)
PYTHONS_TOLERANCE = 0.10
# Metrics where a larger figure is the better one; for all others smaller is better.
HIGHER_IS_BETTER = {"bulk_1f", "bulk_8f", "bulk_1r", "bulk_8r", "churn_rps", "idle_ok",
                    "udp_seq_rps", "udp_conc_rps", "rr_rps"}


# Environment of the nodepass processes: SEMAPHORE_LIMIT must admit the idle
# workload's connections; a short SHUTDOWN_TIMEOUT keeps the bench's stop quick.
NODEPASS_ENV = {
    "SEMAPHORE_LIMIT": "8192",
    "MAX_POOL_CAPACITY": "1024",
    "SHUTDOWN_TIMEOUT": "2s",
}

ROUTE_READY_TIMEOUT = 20.0
STOP_TIMEOUT = 8.0
PING_WARMUP = 50
UDP_PAYLOAD_SIZE = 64


class Scale(NamedTuple):
    """How much work one measurement does."""

    iperf_limit: Tuple[str, ...]  # iperf3 arguments that end a test
    churn_requests: int
    churn_concurrency: int
    pings: int
    idle_connections: int
    idle_window: int  # connections being set up at once
    datagrams: int
    udp_senders: int
    udp_timeout: float  # a datagram with no reply after this is lost
    budget: float  # seconds one measurement may take
    runs: int
    rr_connections: int  # persistent connections of the request/response workload
    rr_seconds: float  # how long it runs
    tunnel_counts: Tuple[int, ...]  # N of "N tunnels in one process vs N processes"
    tunnel_echoes: int  # connections opened through each of those tunnels
    rate_limit: Tuple[str, ...]  # iperf3 arguments that end a rate= test


FULL = Scale(("-t", "5"), 3000, 32, 5000, 5000, 256, 2000, 16, 2.0, 120.0, 3,
             50, 5.0, (1, 10, 50), 4, ("-t", "5"))
SMOKE = Scale(("-n", "64M"), 200, 8, 200, 50, 16, 100, 16, 2.0, 30.0, 1,
              50, 1.0, (1, 3), 2, ("-t", "2"))


class BenchError(Exception):
    """A workload failed outright: a tool failed, a route never came up, data was lost."""


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout can carry the report."""
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()


# --------------------------------------------------------------------------
# Workloads. Each measure_* takes the bench and one route and returns metric
# key -> value (None where the figure does not apply to the mode).

Figures = Dict[str, Optional[float]]


class Workload(NamedTuple):
    number: int
    name: str
    target: str
    fresh_route: bool  # memory figures need processes that served nothing before
    measure: Optional[Callable[["Bench", "Route"], Figures]]
    # Workloads with their own runs and report section (not one figure per mode) run
    # through runner instead, and only when named in --only (they start many processes).
    runner: Optional[Callable[["Bench", "Workload"], None]] = None
