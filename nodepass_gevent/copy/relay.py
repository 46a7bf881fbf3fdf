"""Moving bytes: the TCP exchange (both ways, half-close passed on), and the copy contract.

The readers that take one message off a stream before or instead of a copy
are readers.py's.

The copy contract. These engines copy both ways between two sockets:
exchange() below for TCP (zerocopy.exchange() between plain sockets when
splice works, user space when it does not, tlscopy.exchange() when one side
is a TLS data connection), and udp.ServerFlow.run() / udp.client_flow() for
UDP flows. Each of them:

1. owns both sockets it is given and has closed them when it returns (the
   one exception: a server flow's user side is the role's shared UDP
   listener, which the flow only borrows and never closes);
2. passes EOF on: a TCP end of stream becomes a half-close (SHUT_WR) of the
   other socket, so the answer still flows back; a flow's data connection
   ending ends the flow (UDP has no half-close);
3. aborts both sides on an error in either direction (reset, broken pipe,
   a failed write), so the other direction never waits forever;
4. always ends: after both EOFs, after an error, or (flows) when idle;
5. counts bytes through Stats as they are written: towards the target as
   ``bytes in``, back towards the user as ``bytes out``; a UDP datagram from
   a user counts as one ``udp exchange``, in v1.0 UDP and in flows alike.

With ``rate=`` the TCP exchange draws on the tunnel's two token buckets
(ratelimit.TunnelRate), in either engine: once bytes are waiting, no more is
read than the bucket grants, and a direction without a grant queues for its
turn.
"""

import socket
from typing import Optional, Tuple

import gevent
from gevent.event import AsyncResult
from gevent.socket import wait_read

from nodepass_gevent.base import net
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import tlscopy, zerocopy
from nodepass_gevent.copy.tlsstream import TLSStream
from nodepass_gevent.edge.ratelimit import TokenBucket, TunnelRate
from nodepass_gevent.log import log

CHUNK_SIZE = 262144       # one read from a plain socket; TLS writes it as 16 records


def exchange(left: socket.socket, right: socket.socket, stats: Optional[Stats] = None,
             rate: Optional[TunnelRate] = None) -> Tuple[int, int]:
    """Copy left->right and right->left until both directions end; close both.

    Returns the bytes moved each way. Obeys the copy contract (module
    docstring); left is the user's side, so left->right counts as bytes in
    (and draws on ``rate.inbound``, if a rate is given).
    """
    tls_stream = isinstance(left, TLSStream) or isinstance(right, TLSStream)
    if tls_stream and rate is None:  # a TLS data connection, no rate= to keep
        return tlscopy.exchange(left, right, _counter(stats, True), _counter(stats, False))
    # With rate=, TLS streams take the user-space pumps below (blocking-style
    # calls, like any socket), which draw on the buckets.
    forward_bucket = rate.inbound if rate is not None else None
    backward_bucket = rate.outbound if rate is not None else None
    # None: the kernel refuses splice (zerocopy probes once), copy through user space.
    splice = None if tls_stream else zerocopy.engine()
    if splice is not None:  # the same contract: it closes both sockets itself
        return zerocopy.exchange(left, right, _counter(stats, True), _counter(stats, False),
                                 splice, forward_bucket, backward_bucket)
    try:
        backward = gevent.spawn(_pump, right, left, stats, False, backward_bucket)
        try:
            forward_bytes = _pump(left, right, stats, True, forward_bucket)
            return forward_bytes, backward.get()
        finally:
            backward.kill(block=True)
    finally:
        net.close_quietly(left)
        net.close_quietly(right)


def _counter(stats: Optional[Stats], inbound: bool):
    if stats is None:
        return lambda size: None
    return stats.counter(inbound)


def _pump(source: socket.socket, sink: socket.socket, stats: Optional[Stats], inbound: bool,
          bucket: Optional[TokenBucket] = None) -> int:
    moved = 0
    try:
        moved = _copy(source, sink, _counter(stats, inbound), bucket)
        half_close(sink)
    except (OSError, ValueError) as exc:
        # Reset, broken pipe, or the other pump already closed: end both ways.
        log.debug("Relay: %s direction ended by %r", "inbound" if inbound else "outbound", exc)
        net.abort(source)
        net.abort(sink)
    return moved


def _copy(source: socket.socket, sink: socket.socket, count,
          bucket: Optional[TokenBucket] = None) -> int:
    moved = 0
    while True:
        # recv() allocates its buffer only while bytes are waiting, so an
        # idle connection holds no buffer at all.
        if bucket is None:
            chunk = source.recv(CHUNK_SIZE)
        else:
            grant = _grant(source, bucket)
            chunk = source.recv(min(grant, CHUNK_SIZE))
            bucket.give_back(grant - len(chunk))
        if not chunk:
            return moved
        sink.sendall(chunk)
        moved += len(chunk)
        count(len(chunk))


def _grant(source: socket.socket, bucket: TokenBucket) -> int:
    """How much the next read may take, once bytes (or EOF) wait on ``source``.

    Asked only then, so that a connection blocked in recv() holds no tokens
    the tunnel's busy connections could use.
    """
    pending = getattr(source, "pending", None)  # TLS: bytes already decrypted
    if not (pending and pending()):
        wait_read(source.fileno())
    grant = bucket.take(CHUNK_SIZE)
    if grant:
        return grant
    turn = AsyncResult()
    bucket.wait(CHUNK_SIZE, turn.set)
    try:
        return turn.get()
    except BaseException:  # killed while queued: leave the queue, return a grant
        bucket.cancel(turn.set)
        if turn.ready():
            bucket.give_back(turn.value)
        raise


def half_close(sock: socket.socket) -> None:
    """Send EOF (TCP FIN) but keep reading, also under TLS.

    Not a close_notify alert: OpenSSL refuses to write once it has received
    one, so the answer still flowing the other way would be lost. Peers take
    the bare FIN as the end of the stream (tls.py sets OP_IGNORE_UNEXPECTED_EOF;
    Go's TLS reports it as an unexpected EOF on reads only).
    """
    net.shutdown(sock, socket.SHUT_WR)
