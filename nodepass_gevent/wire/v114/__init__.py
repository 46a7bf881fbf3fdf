"""The NodePass v1.14 wire (TCP transport, type=0): pure encoders and parsers, no I/O.

The contract is the shared folder's wire-v114/README.md (cited below as
"contract (x)" by its section letter); bytes were checked against the real
captures in its transcripts/. Everything crosses ONE tunnel port:

    client                                          server
      | -- TCP connect ----------------------------->  |
      | -- "GET / HTTP/1.1" + Bearer HMAC(key, "") ->  |   handshake.py (always plaintext)
      | <- "HTTP/1.1 200 OK" + {"flow","max",...}\\n -  |   or 405 / 404 / 401, then wait again
      |    both sides close; the server re-listens     |
      |                                                |
      | -- TCP connect (TLS 1.3 if tls is 1 or 2) ---> |   pool connection, same port
      | <- 4 bytes: the connection id ---------------  |   ids.py; the first one is 00000000
      |      ... idle: nothing more, either way ...    |
      |                                                |
      |    on 00000000, the control channel, both ways:|
      | <> base64(JSON XOR key) + "\\n" ------------->  |   signals.py: ping, pong, tcp, udp,
      |                                                |   verify, flush
      |    on the connection a tcp/udp signal names:   |
      | <> raw user bytes (TCP) / raw datagrams (UDP)  |   no header, no length, no framing

Glossary: *key* the tunnel key (URL user part, else FNV-1a-32 of the port
string), used both as the HMAC key and as the XOR pad; *pool connection* a
connection dialled by the client and named by the server's 4-byte id; *control*
pool connection 00000000; *flow* "-" when the server accepts users (reverse),
"+" when the client does (forward).

Modules: keys (key, bearer, certificate fingerprint), handshake (the HTTP
exchange), signals (control lines), ids (connection ids).
The I/O on top of them (TCP pool, reverse mode): control (the control
channel, both roles); for the client client_session (the handshake over a
socket) and pool_dial (pool connections), wired by tunnel/client_v114.py; for
the server server_session (answering the handshake, accepting pool
connections), wired by tunnel/server_v114.py.
"""
