"""The NodePass v1.0 wire and its extensions (shared key, UDP flows).

    protocol  every byte, kind, mode and timeout, the wire diagram on top; pure
    auth      the shared key's challenge-response MACs (an extension); pure
    control   the control channel (the tunnel connection), both halves
    dataconn  the data connection, both halves: TLS, the key proof, the id

docs/protocol.md is the prose of the same wire.
"""
