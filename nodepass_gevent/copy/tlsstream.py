"""A TLS data connection run by hand: ssl.SSLObject over memory BIOs on a plain socket.

gevent's SSLSocket reads and writes the socket through OpenSSL, one record
and one greenlet switch at a time. A TLSStream keeps OpenSSL away from the
socket: bytes from the network go into an incoming ssl.MemoryBIO, OpenSSL's
records come out of an outgoing one, and this module moves them. That lets
tlscopy.exchange() drive a TLS connection from event-loop callbacks, the way
zerocopy.exchange() drives a plain one.

Before the copy engine takes over, a TLSStream behaves like a blocking
socket (handshake(), recv(), sendall(), settimeout(), makefile("rb")...),
waiting with gevent, so readers.py, the key proof and the id exchange run on
it unchanged. The certificate checks are the context's own (tls.py): wrap_bio
applies them exactly as wrap_socket does.

shutdown(SHUT_WR) is a bare TCP FIN, never a close_notify (relay.half_close
says why), and close() closes the socket without a TLS goodbye, as
SSLSocket.close() does.
"""

import io
import socket
import ssl
from typing import Optional

from gevent import get_hub
from gevent.lock import Semaphore
from gevent.socket import wait

READ_SIZE = 65536       # bytes taken off the socket per recv while not in the copy engine
_READ, _WRITE = 1, 2    # libev event masks

# One buffer for every stream's socket reads: a read and the hand-over of its
# bytes to OpenSSL never yield in between, so streams cannot share it unsafely.
_scratch = bytearray(READ_SIZE)
_scratch_view = memoryview(_scratch)


class TLSStream:
    """One TLS connection over ``sock`` (a connected TCP socket); see the module docstring.

    ``server_hostname`` and ``session`` are wrap_bio's: the name the client checks
    (when the context checks names) and sends as SNI, and a session to resume.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                 server_hostname: Optional[str] = None,
                 session: Optional[ssl.SSLSession] = None) -> None:
        self.sock = sock
        # gevent's socket keeps a non-blocking socket inside (every one of its
        # calls goes through a Python frame first); a plain socket is made
        # non-blocking here. Either way, waiting is this class's business.
        raw = getattr(sock, "_sock", None)
        if raw is None:
            sock.setblocking(False)
            raw = sock
        self.raw = raw
        self._timeout = sock.gettimeout()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session)
        self._fileno = sock.fileno()
        loop = get_hub().loop
        self._read_event = loop.io(self._fileno, _READ)
        self._write_event = loop.io(self._fileno, _WRITE)
        self.unsent = b""  # ciphertext taken out of ``outgoing``, not yet sent
        self._send_lock = Semaphore()  # one greenlet sends at a time: records stay in order
        self.eof = False   # the peer's FIN has gone into ``incoming``
        self.closed = False

    # -- the TLS session ---------------------------------------------------

    def handshake(self) -> None:
        """Run the TLS handshake; the context checks the peer (ssl.SSLError, or
        on Python 3.6 ssl.CertificateError, if it fails). The alert OpenSSL
        writes on a failure is sent to the peer before raising, as SSLSocket does."""
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._fill():
                        raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF,
                                              "EOF occurred during the TLS handshake") from None
            self._flush()  # the last flight (client Finished; server session tickets)
        except ssl.SSLError:
            self._send_alert()
            raise

    def _send_alert(self) -> None:
        if self.outgoing.pending and not self.closed:
            try:
                self._flush()
            except (OSError, ValueError):
                pass

    @property
    def session(self) -> Optional[ssl.SSLSession]:
        return self.tls.session

    @property
    def session_reused(self) -> bool:
        return self.tls.session_reused

    def version(self) -> Optional[str]:
        return self.tls.version()

    def cipher(self):
        return self.tls.cipher()

    def getpeercert(self, binary_form: bool = False):
        return self.tls.getpeercert(binary_form)

    def pending(self) -> int:
        """Bytes (or records) received and not yet read: what the socket no longer shows."""
        return self.tls.pending() or self.incoming.pending

    # -- blocking-style reads and writes -----------------------------------

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; b"" at the end of the stream (close_notify,
        or a bare FIN, which tls.py's contexts accept as the end)."""
        if size <= 0:
            return b""
        while True:
            try:
                data = self.tls.read(size)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            if self.outgoing.pending:  # OpenSSL answered something (a key update)
                self._flush()
            return data

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        if size <= 0:
            return 0
        while True:
            try:
                got = self.tls.read(size, view)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            if self.outgoing.pending:
                self._flush()
            return got

    def sendall(self, data) -> None:
        if self.closed:
            raise OSError(9, "Bad file descriptor")
        if len(data):
            self.tls.write(data)  # OpenSSL takes it all: a memory BIO is never full
        self._flush()

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def makefile(self, mode: str = "rb", buffering: int = -1):
        """A buffered binary reader (the only kind the relay's readers use)."""
        if mode != "rb":
            raise ValueError("TLSStream.makefile supports mode 'rb' only")
        return io.BufferedReader(socket.SocketIO(self, "rb"),
                                 io.DEFAULT_BUFFER_SIZE if buffering < 0 else buffering)

    def _decref_socketios(self) -> None:
        """socket.SocketIO calls this when its reader closes; nothing to count here."""

    def _fill(self) -> bool:
        """Wait for bytes from the peer and give OpenSSL what has arrived; False at EOF."""
        if self.eof:
            return False
        while True:
            try:
                size = self.raw.recv_into(_scratch)
                break
            except BlockingIOError:
                self._wait(self._read_event)
            except InterruptedError:
                continue
        if size == 0:
            self.eof = True
            self.incoming.write_eof()
            return False
        self.incoming.write(_scratch_view[:size])
        return True

    def _flush(self) -> None:
        """Send every record OpenSSL has written, in order, waiting for room."""
        with self._send_lock:
            while True:
                if not self.unsent:
                    if not self.outgoing.pending:
                        return
                    self.unsent = memoryview(self.outgoing.read())
                try:
                    sent = self.raw.send(self.unsent)
                except BlockingIOError:
                    self._wait(self._write_event)
                    continue
                except InterruptedError:
                    continue
                self.unsent = self.unsent[sent:]

    def _wait(self, watcher) -> None:
        if self.closed:
            raise OSError(9, "Bad file descriptor")
        if self._timeout == 0.0:  # non-blocking use, as SSLSocket reports it
            raise (ssl.SSLWantReadError if watcher is self._read_event
                   else ssl.SSLWantWriteError)("The operation did not complete")
        wait(watcher, self._timeout, socket.timeout("timed out"))

    # -- the socket underneath ---------------------------------------------

    def settimeout(self, timeout: Optional[float]) -> None:
        self._timeout = timeout

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def fileno(self) -> int:
        return -1 if self.closed else self._fileno

    def getpeername(self):
        return self.sock.getpeername()

    def getsockname(self):
        return self.sock.getsockname()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def getsockopt(self, *args):
        return self.sock.getsockopt(*args)

    def shutdown(self, how: int) -> None:
        """shutdown(2) on the TCP socket: SHUT_WR is a bare FIN (no close_notify)."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close the socket (no close_notify); wakes a greenlet waiting on it. Never raises."""
        if self.closed:
            return
        self.closed = True
        hub = get_hub()
        waiting = False
        for watcher in (self._read_event, self._write_event):
            if watcher.callback is None:
                watcher.close()
            else:  # a greenlet waits on it: wake it with EBADF, as gevent's sockets do
                hub.cancel_wait(watcher, OSError(9, "Bad file descriptor"), True)
                waiting = True
        if waiting:  # callbacks run in order: the descriptor goes after its watchers
            hub.loop.run_callback(self._close_socket)
        else:
            self._close_socket()

    def _close_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "TLSStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<TLSStream fd=%d %s>" % (self.fileno(), "server" if self.tls.server_side
                                        else "client")


def server_handshake(sock: socket.socket, context: ssl.SSLContext) -> TLSStream:
    """Accept TLS on a connected socket; the stream keeps the socket's timeout.
    On a failure the socket is closed and the error raised."""
    return _handshaken(TLSStream(sock, context, server_side=True))


def client_handshake(sock: socket.socket, context: ssl.SSLContext,
                     server_hostname: Optional[str],
                     session: Optional[ssl.SSLSession] = None) -> TLSStream:
    """Start TLS on a connected socket, offering ``session`` for resumption.
    On a failure the socket is closed and the error raised."""
    return _handshaken(TLSStream(sock, context, server_side=False,
                                 server_hostname=server_hostname, session=session))


def _handshaken(stream: TLSStream) -> TLSStream:
    try:
        stream.handshake()
    except BaseException:
        stream.close()  # its watchers and the socket
        raise
    return stream
