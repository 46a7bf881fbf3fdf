"""TLS data connections on memory BIOs: tlsstream.TLSStream and tlscopy.exchange.

In-process, with real 127.0.0.1 TCP sockets and the project's real contexts
(tls.py: tls=1 self-signed, tls=2 with a test CA). The engine sits where a
role puts it:

    user end <-TCP-> plain [tlscopy.exchange] stream <-TLS over TCP-> peer

and the peer is either another TLSStream or gevent's ssl.SSLSocket, the
standard TLS peer a NodePass v1.0 (Go) end stands for. The engine runs on
both sides of the tunnel: the plain socket first (server: user -> data) or the
TLS stream first (client: data -> target).
"""

import errno
import os
import socket
import ssl
import struct
import sys
import time

import gevent
import gevent.ssl
import pytest

from nodepass_gevent import config
from nodepass_gevent.base.stats import Stats
from nodepass_gevent.copy import readers, tls, tlscopy
from nodepass_gevent.copy.tlsstream import TLSStream, client_handshake, server_handshake
from nodepass_gevent.tunnel import udp
from nodepass_gevent.wire.v1 import dataconn, protocol

from test_zerocopy import joined, read_exactly, read_to_eof, send_all_then_eof, tcp_pair

pytestmark = pytest.mark.matrix

WAIT = 20.0             # seconds any one step may take
SIZE = 4 * 1024 * 1024  # bytes each way in the bulk tests


# --------------------------------------------------------------------------
# Contexts: the project's own (tls.py), and a standard peer's (gevent.ssl).

class Mode:
    """The contexts of one TLS mode and the name the client checks."""

    def __init__(self, number, server, client, hostname, peer_server, peer_client) -> None:
        self.number, self.server, self.client, self.hostname = number, server, client, hostname
        self.peer_server, self.peer_client = peer_server, peer_client


def _peer_context(purpose: int, test_ca, verified: bool):
    """A standard gevent SSLContext: a Python peer, as a Go peer would be set up."""
    context = gevent.ssl.SSLContext(purpose)
    context.options |= tls._HALF_CLOSE_OPTIONS
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        context.load_cert_chain(test_ca["crt"], test_ca["key"])
    elif verified:
        context.load_verify_locations(test_ca["ca"])
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture(scope="module")
def modes(test_ca, tmp_path_factory):
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = test_ca["ca"]  # the trust store tls=2's client reads
    try:
        verified_client = tls.client_context(protocol.TLS_VERIFIED)
    finally:
        if saved is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = saved
    self_signed = config.parse_url("server://127.0.0.1:1/127.0.0.1:2?tls=1")
    verified = config.parse_url("server://127.0.0.1:1/127.0.0.1:2?tls=2&crt=%s&key=%s"
                                % (test_ca["crt"], test_ca["key"]))
    return {
        1: Mode(1, tls.server_context(self_signed), tls.client_context(protocol.TLS_SELF_SIGNED),
                "127.0.0.1", _peer_context(ssl.PROTOCOL_TLS_SERVER, test_ca, False),
                _peer_context(ssl.PROTOCOL_TLS_CLIENT, test_ca, False)),
        2: Mode(2, tls.server_context(verified), verified_client, "127.0.0.1",
                _peer_context(ssl.PROTOCOL_TLS_SERVER, test_ca, True),
                _peer_context(ssl.PROTOCOL_TLS_CLIENT, test_ca, True)),
    }


@pytest.fixture(params=[1, 2], ids=["tls=1", "tls=2"])
def mode(request, modes):
    return modes[request.param]


def _result(function, *args, **kwargs):
    """Run ``function`` returning its value or the exception it raised (no greenlet
    dies with a traceback on stderr)."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # the test asserts on it
        return exc


def stream_pair(mode, session=None):
    """(client TLSStream, server TLSStream), handshaken, over one loopback TCP connection."""
    near, far = tcp_pair()
    for sock in (near, far):
        sock.settimeout(WAIT)
    server = gevent.spawn(_result, server_handshake, far, mode.server)
    try:
        client = client_handshake(near, mode.client, mode.hostname, session)
    except BaseException:
        server.kill()
        far.close()
        near.close()
        raise
    made = server.get(timeout=WAIT)
    assert isinstance(made, TLSStream), made
    return client, made


def close_all(*socks) -> None:
    for sock in socks:
        sock.close()


@pytest.fixture
def streams(mode):
    """stream_pair(mode): (client, server), closed after the test."""
    client, server = stream_pair(mode)
    yield client, server
    close_all(client, server)


# --------------------------------------------------------------------------
# The stream before the copy: handshake, readers, certificate checks.

@pytest.mark.timeout(30)
def test_handshake_then_the_auth_and_id_exchange_run_on_the_readers(streams):
    client, server = streams
    assert client.version() == server.version() and client.version() in ("TLSv1.2",
                                                                          "TLSv1.3")
    nonce, connection_id = "n" * protocol.AUTH_NONCE_LENGTH, protocol.new_connection_id()
    server.sendall(nonce.encode("ascii"))
    assert readers.recv_exactly(client, protocol.AUTH_NONCE_LENGTH).decode() == nonce
    client.sendall(b"m" * protocol.AUTH_MAC_LENGTH)
    assert readers.recv_exactly(server, protocol.AUTH_MAC_LENGTH) == b"m" * 64
    server.sendall(connection_id.encode("ascii") + b"line one\n")
    assert dataconn.read_id(client) == connection_id
    assert readers.recv_line(client, 100) == b"line one\n"
    assert client.getpeername() == server.getsockname()


@pytest.mark.timeout(30)
def test_a_frame_reader_works_through_makefile(streams):
    client, server = streams
    datagrams = [os.urandom(size) for size in (1, 1400, 40000)]
    server.sendall(b"".join(udp.frame(d) for d in datagrams))
    reader = client.makefile("rb")
    assert [readers.read_frame(reader, 65535) for _ in datagrams] == datagrams
    server.shutdown(socket.SHUT_WR)
    assert readers.read_frame(reader, 65535) is None  # a bare FIN is the clean end
    reader.close()


@pytest.mark.timeout(30)
def test_a_read_times_out_and_close_wakes_a_waiting_reader(streams):
    client, server = streams
    client.settimeout(0.2)
    with pytest.raises(socket.timeout):
        client.recv(10)
    client.settimeout(None)
    reader = gevent.spawn(_result, client.recv, 10)
    gevent.sleep(0.05)
    client.close()
    woke = reader.get(timeout=WAIT)
    assert isinstance(woke, OSError) and woke.errno == errno.EBADF
    assert client.fileno() == -1


@pytest.mark.timeout(30)
def test_tls2_refuses_a_name_the_certificate_does_not_carry(modes):
    mode = modes[2]
    near, far = tcp_pair()
    server = gevent.spawn(_result, server_handshake, far, mode.server)
    try:
        # Python 3.6 checks the name after the handshake, in Python: CertificateError
        # (a ValueError there, an SSLError from 3.7 on), as with wrap_socket.
        with pytest.raises((ssl.SSLError, ssl.CertificateError)) as refused:
            client_handshake(near, mode.client, "other.example")
        assert ("certificate verify failed" in str(refused.value)
                or "doesn't match" in str(refused.value))
        # The client's alert reaches the server, which fails at once, not by a timeout
        # (3.6: the handshake itself succeeded, the client then drops the connection).
        served = server.get(timeout=WAIT)
        assert isinstance(served, ssl.SSLError) or (sys.version_info < (3, 7)
                                                    and isinstance(served, TLSStream))
    finally:
        close_all(near, far)
        if isinstance(server.value, TLSStream):
            server.value.close()


@pytest.mark.timeout(30)
def test_tls2_refuses_a_certificate_it_does_not_trust(modes):
    near, far = tcp_pair()
    server = gevent.spawn(_result, server_handshake, far, modes[1].server)  # self-signed
    try:
        with pytest.raises(ssl.SSLError) as refused:
            client_handshake(near, modes[2].client, "127.0.0.1")
        assert "certificate verify failed" in str(refused.value)
        assert isinstance(server.get(timeout=WAIT), ssl.SSLError)
    finally:
        close_all(near, far)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("side", ["server", "client"])
def test_a_peer_speaking_garbage_instead_of_tls_fails_the_handshake_at_once(modes, side,
                                                                            capfd):
    near, far = tcp_pair()
    try:
        near.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        far.settimeout(WAIT)
        started = time.monotonic()
        if side == "server":
            failed = _result(server_handshake, far, modes[1].server)
        else:
            failed = _result(client_handshake, far, modes[1].client, None)
        assert isinstance(failed, ssl.SSLError), failed
        assert time.monotonic() - started < WAIT / 2  # at once, not by the timeout
    finally:
        close_all(near, far)
    assert "Traceback" not in capfd.readouterr().err


def read_to_eof_quietly(sock):
    try:
        return read_to_eof(sock)
    except OSError:
        return b""


@pytest.mark.timeout(30)
def test_a_peer_closing_during_the_handshake_fails_it_at_once(modes):
    near, far = tcp_pair()
    far.settimeout(WAIT)
    server = gevent.spawn(_result, server_handshake, far, modes[1].server)
    try:
        near.close()
        assert isinstance(server.get(timeout=WAIT), (ssl.SSLError, OSError))
    finally:
        far.close()


@pytest.mark.timeout(30)
def test_the_servers_context_sends_no_session_tickets(streams):
    """Nobody resumes (tls._issue_no_session_tickets): from Python 3.8 on, the
    server spends nothing on tickets."""
    client, server = streams
    server.sendall(b"12345678")
    assert readers.recv_exactly(client, 8) == b"12345678"  # tickets would come before
    if sys.version_info >= (3, 8):
        assert not client.session.has_ticket


@pytest.mark.timeout(30)
def test_a_session_offered_again_is_resumed_by_a_server_that_issues_tickets(mode):
    """The stream can resume (scripts/tls-ab measures what it saves)."""
    ticketing = Mode(mode.number, mode.peer_server, mode.client, mode.hostname, None, None)
    client, server = stream_pair(ticketing)
    server.sendall(b"12345678")
    assert readers.recv_exactly(client, 8) == b"12345678"  # the tickets came before it
    session = client.session
    close_all(client, server)
    assert session is not None and session.has_ticket
    again, server_again = stream_pair(ticketing, session)
    try:
        assert again.session_reused and server_again.session_reused
    finally:
        close_all(again, server_again)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ours", ["client", "server"])
def test_the_stream_interoperates_with_a_standard_sslsocket(mode, ours):
    near, far = tcp_pair()
    for sock in (near, far):
        sock.settimeout(WAIT)
    if ours == "client":
        peer = gevent.spawn(_result, mode.peer_server.wrap_socket, far, server_side=True)
        stream = client_handshake(near, mode.client, mode.hostname)
    else:
        peer = gevent.spawn(_result, mode.peer_client.wrap_socket, near,
                            server_hostname=mode.hostname)
        stream = server_handshake(far, mode.server)
    standard = peer.get(timeout=WAIT)
    assert isinstance(standard, gevent.ssl.SSLSocket), standard
    try:
        payload = os.urandom(300000)
        writer = gevent.spawn(stream.sendall, payload)
        assert read_exactly(standard, len(payload)) == payload
        writer.get(timeout=WAIT)
        standard.sendall(payload[::-1])
        assert readers.recv_exactly(stream, len(payload)) == payload[::-1]
    finally:
        close_all(stream, standard)


# --------------------------------------------------------------------------
# The copy engine.

class TlsLink:
    """user <-TCP-> plain [tlscopy.exchange] stream <-TLS-> peer.

    ``order``: "plain first" (the server's user -> data) or "tls first" (the
    client's data -> target); bytes from the user count as forward either way
    they are passed, as the roles count towards the target.
    """

    def __init__(self, mode, peer_kind: str, order: str) -> None:
        self.user, plain = tcp_pair()
        near, far = tcp_pair()
        for sock in (near, far):
            sock.settimeout(WAIT)
        if peer_kind == "tlsstream":
            peer = gevent.spawn(_result, client_handshake, near, mode.client, mode.hostname)
        else:
            peer = gevent.spawn(_result, mode.peer_client.wrap_socket, near,
                                server_hostname=mode.hostname)
        self.stream = server_handshake(far, mode.server)
        self.stream.settimeout(None)
        self.peer = peer.get(timeout=WAIT)
        assert not isinstance(self.peer, Exception), self.peer
        self.peer.settimeout(WAIT)
        self.plain, self.order = plain, order
        self.stats = Stats()
        if order == "plain first":
            args = (plain, self.stream, self.stats.counter(True), self.stats.counter(False))
        else:  # the user's bytes go right -> left: they are the backward direction here
            args = (self.stream, plain, self.stats.counter(False), self.stats.counter(True))
        self.engine = gevent.spawn(tlscopy.exchange, *args)

    def moved(self):
        """(from the user, towards the user) as exchange() returned them."""
        result = self.engine.get(timeout=WAIT)
        return result if self.order == "plain first" else result[::-1]

    def shutdown_peer(self) -> None:
        """The peer's half-close: a bare FIN, whatever kind of peer it is."""
        if isinstance(self.peer, gevent.ssl.SSLSocket):  # its own shutdown() unwraps TLS
            super(gevent.ssl.SSLSocket, self.peer).shutdown(socket.SHUT_WR)
        else:
            self.peer.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.engine.kill(block=True, timeout=WAIT)
        close_all(self.user, self.peer, self.plain, self.stream)


@pytest.fixture(params=["tlsstream", "sslsocket"])
def peer_kind(request):
    return request.param


@pytest.fixture(params=["plain first", "tls first"])
def tls_link(request, mode, peer_kind):
    link = TlsLink(mode, peer_kind, request.param)
    yield link
    link.close()


def closed(sock) -> bool:
    return sock.fileno() == -1


def peer_send_then_eof(link, data: bytes) -> None:
    link.peer.sendall(data)
    link.shutdown_peer()


@pytest.mark.timeout(60)
def test_bulk_both_ways_at_once_arrives_exact_and_is_counted(tls_link):
    upload, download = os.urandom(SIZE), os.urandom(SIZE + 12345)
    uploaded, downloaded, _, _ = joined(
        gevent.spawn(read_to_eof, tls_link.peer),
        gevent.spawn(read_to_eof, tls_link.user),
        gevent.spawn(send_all_then_eof, tls_link.user, upload),
        gevent.spawn(peer_send_then_eof, tls_link, download),
    )
    assert uploaded == upload
    assert downloaded == download
    assert tls_link.moved() == (len(upload), len(download))
    assert (tls_link.stats.bytes_in, tls_link.stats.bytes_out) == (len(upload), len(download))
    assert closed(tls_link.plain) and closed(tls_link.stream)


@pytest.mark.timeout(60)
def test_the_users_half_close_reaches_the_peer_and_the_answer_still_flows(tls_link):
    request, answer = os.urandom(SIZE // 4), os.urandom(SIZE // 2)
    send_all_then_eof(tls_link.user, request)
    assert read_to_eof(tls_link.peer) == request  # the FIN came through as the end
    writer = gevent.spawn(peer_send_then_eof, tls_link, answer)
    assert read_to_eof(tls_link.user) == answer
    joined(writer)
    assert tls_link.moved() == (len(request), len(answer))


@pytest.mark.timeout(60)
def test_the_peers_half_close_reaches_the_user_and_the_answer_still_flows(tls_link):
    request, answer = os.urandom(SIZE // 4), os.urandom(SIZE // 2)
    peer_send_then_eof(tls_link, request)
    assert read_to_eof(tls_link.user) == request
    writer = gevent.spawn(send_all_then_eof, tls_link.user, answer)
    assert read_to_eof(tls_link.peer) == answer  # TLS still writes after its FIN came
    joined(writer)
    assert tls_link.moved() == (len(answer), len(request))


@pytest.mark.timeout(60)
def test_small_messages_go_back_and_forth(tls_link):
    for number in range(200):
        message = b"ping %d" % number
        tls_link.user.sendall(message)
        assert read_exactly(tls_link.peer, len(message)) == message
        tls_link.peer.sendall(b"pong")
        assert read_exactly(tls_link.user, 4) == b"pong"
    tls_link.user.shutdown(socket.SHUT_WR)
    tls_link.shutdown_peer()
    assert tls_link.moved() == (sum(len(b"ping %d" % n) for n in range(200)), 800)


def _stream_until_cut(sock):
    chunk = os.urandom(65536)
    try:
        while True:
            sock.sendall(chunk)
    except OSError as exc:
        return exc.errno if exc.errno is not None else -1


@pytest.mark.timeout(60)
def test_a_user_reset_aborts_both_sides_and_ends_the_exchange(tls_link, capfd):
    tls_link.user.sendall(b"hello")
    assert read_exactly(tls_link.peer, 5) == b"hello"
    streamer = gevent.spawn(_stream_until_cut, tls_link.peer)
    read_exactly(tls_link.user, 512 * 1024)
    tls_link.user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls_link.user.close()
    tls_link.moved()  # returns: the exchange ended
    assert tls_link.stats.bytes_in == 5 and tls_link.stats.bytes_out >= 512 * 1024
    assert joined(streamer)[0] is not None  # the peer's writes failed: shut down, not silent
    assert closed(tls_link.plain) and closed(tls_link.stream)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_the_peer_vanishing_mid_transfer_aborts_both_sides(tls_link, capfd):
    streamer = gevent.spawn(_stream_until_cut, tls_link.user)
    read_exactly(tls_link.peer, 512 * 1024)
    raw = tls_link.peer.sock if isinstance(tls_link.peer, TLSStream) else tls_link.peer
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls_link.peer.close()
    tls_link.moved()
    assert joined(streamer)[0] in (errno.EPIPE, errno.ECONNRESET)
    assert read_to_eof_quietly(tls_link.user) == b""
    assert closed(tls_link.plain) and closed(tls_link.stream)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_garbage_instead_of_records_aborts_both_sides_cleanly(mode, capfd):
    link = TlsLink(mode, "tlsstream", "plain first")
    try:
        link.user.sendall(b"before")
        assert read_exactly(link.peer, 6) == b"before"
        link.peer.sock.sendall(b"\x17\x03\x03\x00\x20" + b"x" * 32)  # a record, not decryptable
        link.moved()
        assert read_to_eof_quietly(link.user) == b""
        assert closed(link.plain) and closed(link.stream)
    finally:
        link.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_bytes_the_stream_read_behind_the_id_are_relayed(streams):
    """The id and the first user bytes can arrive in one read: the engine must
    start with what the stream already holds, the socket will not say it again."""
    client, server = streams
    user, plain = tcp_pair()
    try:
        server.sendall(b"0123abcd" + b"first bytes")
        assert dataconn.read_id(client) == "0123abcd"
        stats = Stats()
        engine = gevent.spawn(tlscopy.exchange, client, plain, stats.counter(True),
                              stats.counter(False))
        assert read_exactly(user, 11) == b"first bytes"
        server.shutdown(socket.SHUT_WR)
        assert read_to_eof(user) == b""
        user.shutdown(socket.SHUT_WR)
        assert engine.get(timeout=WAIT) == (11, 0)
    finally:
        close_all(user, plain)


@pytest.mark.timeout(60)
def test_a_backed_up_exchange_keeps_the_rest_and_an_idle_one_holds_nothing(mode):
    """While the user reads nothing, the engine keeps what the plain socket had
    no room for (a copy: the shared buffers are the next wake-up's); once it is
    all delivered, the connection holds no buffer."""
    link = TlsLink(mode, "tlsstream", "plain first")
    try:
        link.plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        link.user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer = gevent.spawn(link.peer.sendall, b"y" * SIZE)
        gevent.sleep(0.3)  # the user reads nothing yet
        (run,) = _exchanges_of(link.engine)
        assert run.clear and not run.tls_readable.active  # backed up: TLS not read
        assert read_exactly(link.user, SIZE) == b"y" * SIZE
        joined(writer)
        gevent.sleep(0.05)
        assert not run.clear and not run.cipher and run.tls_readable.active
        assert link.stats.bytes_out == SIZE
    finally:
        link.close()


@pytest.mark.timeout(60)
def test_records_the_peer_has_no_room_for_wait_and_the_user_is_not_read_meanwhile(mode):
    """While the peer reads nothing, the engine keeps the records a send did not
    take, stops reading the user and counts only what went out; once the peer
    reads, every byte arrives and is counted."""
    link = TlsLink(mode, "tlsstream", "plain first")
    try:
        link.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        link.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        payload = os.urandom(SIZE)
        writer = gevent.spawn(link.user.sendall, payload)
        gevent.sleep(0.3)  # the peer reads nothing yet
        (run,) = _exchanges_of(link.engine)
        assert run.cipher and not run.plain_readable.active  # backed up: the user not read
        assert link.stats.bytes_in < SIZE  # what is still held is not counted
        assert read_exactly(link.peer, SIZE) == payload
        joined(writer)
        gevent.sleep(0.05)
        assert not run.cipher and run.plain_readable.active
        assert link.stats.bytes_in == SIZE
    finally:
        link.close()


def _exchanges_of(greenlet):
    """The _Exchange a running tlscopy.exchange() greenlet drives (from its frames)."""
    found, frame = [], greenlet.gr_frame
    while frame is not None:
        run = frame.f_locals.get("run")
        if isinstance(run, tlscopy._Exchange):
            found.append(run)
        frame = frame.f_back
    return found
