"""The plumbing every layer stands on: sockets, lifecycle, counters, places, health.

    net        listen / dial / check / close, Target, Backoff
    lifecycle  Component: start, stop (drain, then cut), close, closed; Supervisor
    stats      plain-integer counters and status figures
    semaphore  a server's user places (SEMAPHORE_LIMIT) and their waits
    health     a tunnel's verdict (can it carry users?), Throttle, Streak

Imports nothing from the other layers (only config and log from the top level).
"""
