"""The wires NodePass speaks, one subpackage per version.

    v1    NodePass v1.0 (two ports, "//port#tls" signals) and our extensions to it
          (shared key, UDP flows): the wire the roles speak today
    v114  NodePass v1.14 (one port, an HTTP handshake, XOR+base64 JSON signals):
          pure codecs, not used by the roles yet

Above copy/ (a wire reads its messages with copy.readers), below tunnel/.
"""
