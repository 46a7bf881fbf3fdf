"""The server's edge: what happens to a user before and as the tunnel carries it.

    policy       the edge policy of one server, built from its Config, wired
    access       allow=/deny= lists and the per_user cap, refusal logs
    proxyheader  the PROXY protocol header (v1, v2) written for proxy=1|2
    ratelimit    rate=: token buckets, which the copy engines (copy/) ask

Above base/, below copy/; knows no wire.
"""
