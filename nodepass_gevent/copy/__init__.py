"""Moving bytes, for either wire: the copy engines and the TLS under them.

    relay      the copy contract; the TCP exchange; picks an engine
    zerocopy   splice(2) between plain sockets, from event-loop callbacks
    tlsstream  a TLS data connection run by hand (ssl.SSLObject, memory BIOs)
    tlscopy    plain <-> TLS copy from event-loop callbacks
    tls        SSL contexts for both roles, the self-signed certificate
    udplink    UDP flow frames from event-loop callbacks (FLOW_FRAME_HEADER)
    readers    one line, frame or burst off a stream, before a copy takes over

Above base/ and edge/ (rate limits); knows no wire: what the bytes mean is wire/'s.
"""
