"""The roles both wires share, and what a tunnel carries.

    server     the server role: wiring (listeners, control, data port, users)
    client     the client role: wiring (session loop, pool, launches)
    pool       pre-dialed data connections (server FIFO, client by id, refill)
    tcp        TCP users, both halves
    udp        UDP users, both halves: v1.0's datagram per connection, and flows
    listeners  gevent's StreamServer / DatagramServer, with back-off
    failover   the client's server order and jittered back-off

Above wire/, copy/, edge/ and base/; below ops/ and the entry points.
"""
