"""scripts/bench as a package: one module per role, run through scripts/bench.

  cli              options (its docstring is the usage text), main()
  runner           one run: routes of every mode, workloads --runs times, figures
  workloads/       one module per workload (bulk, churn, latency, idle, udp, rr,
                   tunnels, rate); WORKLOADS numbers them
  peers            the relays side by side: socat, nodepass-gevent (and variants)
  targets          the services behind a route (echo, iperf3, nginx) and a route
  loadgen, cpu     iperf3/ab drivers; CPU meters
  processes        processes started by the bench, /proc readings
  checks           the results table's metrics and the issues' targets
  report*          the markdown report
Standard library only: the bench runs on any python3 with the tools installed.
"""
