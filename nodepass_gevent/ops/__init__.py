"""Operator features: many tunnels in one process, and what an operator reads or runs.

    fleet         the running tunnels: start, restart a failed one, reload a set
    metrics       --metrics: /metrics (Prometheus), /status, /healthz
    statusclient  `nodepass status`: reads /status, prints a table
    portcheck     --check: bind and release every port a tunnel set listens on
    systemd       sd_notify: READY, RELOADING, STOPPING, WATCHDOG
    servicectl/   nodepass-service: tunnels as systemd services (runs without gevent)
    debug         NODEPASS_DEBUG_COUNTS: greenlet/fd/RSS figures on SIGUSR2

The top layer: above tunnel/; only the entry points (cli, service) import it.
This package's __init__ imports nothing, so servicectl runs where gevent is missing.
"""
