"""Socket plumbing shared by both roles: listen, dial, check, close.

All of it is plain blocking socket code; gevent's monkey-patching (done by the
CLI before anything else) turns each blocking call into a greenlet switch. The
one exception, a TCP connect, waits on the gevent socket's own watcher itself
(_connect_stream): gevent's connect() costs two system calls more.
"""

import errno
import fcntl
import os
import socket
import struct
import termios
import time
from typing import Optional, Tuple

import gevent
from gevent import get_hub
from gevent.monkey import get_original

from nodepass_gevent.config import Address

# The unpatched poll: a zero-timeout readiness check must not yield, and
# select() cannot watch descriptors above 1023.
_poll = get_original("select", "poll")
_POLLIN_OR_ERROR = 0x001 | 0x008 | 0x010  # POLLIN | POLLERR | POLLHUP
_POLL_ERROR_OR_HANGUP = 0x008 | 0x010



class BindError(Exception):
    """A listening socket could not be opened (port in use, bad address...).

    ``errno`` is the system's error number (None when the address did not
    resolve), so that ``--check`` can tell a port in use from one it may not bind.
    """

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


# What to do about a listen that failed, by errno: the line names the port's
# role (tunnel, data, target, metrics), what is wrong, and this.
_BIND_REMEDIES = {
    errno.EADDRINUSE: "is another nodepass or service on it? pick another port",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE: pick a port above 1023"
                  " or grant the capability",
    errno.EADDRNOTAVAIL: "is the host an address of this machine? use one it has, or :PORT"
                         " for all interfaces",
}


class Backoff:
    """Pauses between retries after failures in a row: doubling from ``first``,
    capped at ``limit``; a success starts the next streak from ``first``."""

    def __init__(self, first: float, limit: float) -> None:
        self.first, self.limit = first, limit
        self.failures = 0  # in the current streak
        self._delay = first

    def pause(self) -> float:
        """Count one more failure; how long to wait before the next try."""
        self.failures += 1
        delay, self._delay = self._delay, min(self._delay * 2, self.limit)
        return delay

    def reset(self) -> int:
        """A success ends the streak; how many failures it had."""
        failures, self.failures, self._delay = self.failures, 0, self.first
        return failures


def resolve(address: Address, kind: int, passive: bool) -> Tuple[int, tuple]:
    """Family and sockaddr for an address; a passive empty host is every interface."""
    host = address.host or None if passive else address.dial_host
    flags = socket.AI_PASSIVE if passive else 0
    infos = socket.getaddrinfo(host, address.port, socket.AF_UNSPEC, kind, 0, flags)
    if passive and not address.host:
        # Prefer the IPv6 wildcard: with V6ONLY off it takes IPv4 users too.
        infos.sort(key=lambda info: info[0] != socket.AF_INET6)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def listen_tcp(address: Address, backlog: int = 1024, role: str = "") -> socket.socket:
    """A listening TCP socket; ``role`` ("tunnel port", "target port", ...) names
    it in the BindError line."""
    return _bind(address, socket.SOCK_STREAM, backlog, role)


def listen_udp(address: Address, role: str = "") -> socket.socket:
    return _bind(address, socket.SOCK_DGRAM, None, role)


def bind_only(address: Address, kind: int, role: str = "") -> socket.socket:
    """Bound as listen_tcp/listen_udp bind (SO_REUSEADDR for TCP, dual-stack
    wildcard) but not listening: what --check tries, so that two checks of the
    same port at once do not take it from each other."""
    return _bind(address, kind, None, role)


def _bind(address: Address, kind: int, backlog: Optional[int], role: str = "") -> socket.socket:
    what = "TCP" if kind == socket.SOCK_STREAM else "UDP"
    where = "the %s at %s %s" % (role, what, address) if role else "%s %s" % (what, address)
    try:
        family, sockaddr = resolve(address, kind, passive=True)
    except (OSError, UnicodeError) as exc:
        raise BindError("cannot resolve %s%s: %s" % (address, " for the " + role if role else "",
                                                     getattr(exc, "strerror", None) or exc)) \
            from None
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not address.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        remedy = _BIND_REMEDIES.get(exc.errno)
        raise BindError("cannot listen on %s: %s%s" % (where, exc.strerror or exc,
                                                        ": " + remedy if remedy else ""),
                        exc.errno) from None
    return sock


def dial_tcp(address: Address, timeout: float, sockaddr: Optional[tuple] = None) -> socket.socket:
    """Connect (to ``sockaddr`` if already resolved), with Nagle off for low latency."""
    if sockaddr is None:
        sock = socket.create_connection((address.dial_host, address.port), timeout)
    else:
        sock = connect(sockaddr, socket.SOCK_STREAM, timeout)
    set_nodelay(sock)
    sock.settimeout(None)
    return sock


def connect(sockaddr: tuple, kind: int, timeout: Optional[float]) -> socket.socket:
    """A socket of ``kind`` connected to a resolved address (IPv4 or IPv6)."""
    family = socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            _connect_stream(sock, sockaddr, timeout)
        else:
            # A UDP connect never waits: made non-blocking it skips gevent's timer
            # and its two extra system calls (one UDP exchange of v1.0 makes one).
            sock.settimeout(0.0)
            sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    if kind == socket.SOCK_DGRAM:
        sock.settimeout(timeout)
    return sock


def _connect_stream(sock: socket.socket, sockaddr: tuple, timeout: Optional[float]) -> None:
    """connect(2), a wait for the handshake, one look at its outcome; the socket is
    left with ``timeout``.

    gevent's connect() makes two system calls more (it asks SO_ERROR before it
    starts, and connects again to learn that it is connected), twice for each
    tunneled connection on the client: its data connection and its target.
    """
    sock.settimeout(0)
    try:
        sock.connect(sockaddr)
    except BlockingIOError:  # EINPROGRESS: the handshake is under way
        with gevent.Timeout(timeout, socket.timeout("timed out")):
            get_hub().wait(sock._write_event)  # the gevent socket's own watcher
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
    sock.settimeout(timeout)


def start_tcp_dial(sockaddr: tuple) -> socket.socket:
    """A TCP socket (Nagle off) whose connect to ``sockaddr`` is under way, not done.

    For a connection on which the peer speaks first: the first read waits for
    the connect and the peer's bytes in one wake-up, not two, and a failed
    connect is that read's error (ConnectionRefusedError...).
    """
    family = socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    set_nodelay(sock)
    sock.settimeout(0.0)
    try:
        error = sock.connect_ex(sockaddr)
    except BaseException:
        sock.close()
        raise
    if error not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(error, os.strerror(error))
    return sock


def set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def has_nodelay(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False


def set_user_timeout(sock: socket.socket, seconds: float) -> None:
    """Fail writes that stay unacknowledged this long (Linux TCP_USER_TIMEOUT).

    Without it a write to a peer behind a cut link succeeds into the send
    buffer and the loss is noticed only after minutes of retransmissions.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
    except (OSError, AttributeError):
        pass


# struct tcp_info (linux/tcp.h): 8 one-byte fields, then 32-bit ones;
# tcpi_rtt, the smoothed round trip in microseconds, is the 16th of those.
_TCP_INFO_RTT_OFFSET = 8 + 15 * 4


def smoothed_rtt(sock: Optional[socket.socket]) -> Optional[float]:
    """The kernel's smoothed round trip of a TCP connection, in seconds
    (Linux TCP_INFO), measured from the ACKs of what we sent on it; None
    without one (no socket, closed, not Linux)."""
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _TCP_INFO_RTT_OFFSET + 4:
        return None
    return struct.unpack_from("I", info, _TCP_INFO_RTT_OFFSET)[0] / 1e6


def local_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def is_idle(sock: socket.socket) -> bool:
    """True if a pooled connection is open and silent (nothing to read, no EOF).

    A pooled connection must say nothing until it is used: readable means the
    peer closed it, reset it, or talks out of turn; either way it is unusable.
    """
    try:
        fileno = sock.fileno()
        if fileno < 0:
            return False
        poller = _poll()
        poller.register(fileno, _POLLIN_OR_ERROR)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def closed_by_peer(socks) -> list:
    """The sockets among ``socks`` whose peer closed or reset them: one poll(2)
    for all of them, however many.

    Readable alone is not enough: bytes may be waiting (a user's first bytes
    can overtake the launch signal that hands the connection out), and those
    connections are very much alive.
    """
    poller, by_fileno = _poll(), {}
    for sock in socks:
        fileno = sock.fileno()
        if fileno >= 0:
            poller.register(fileno, _POLLIN_OR_ERROR)
            by_fileno[fileno] = sock
    return [by_fileno[fileno] for fileno, events in poller.poll(0)
            if events & _POLL_ERROR_OR_HANGUP or not _bytes_waiting(fileno)]


def _bytes_waiting(fileno: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fileno, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def recv_by(sock: socket.socket, deadline: float, size: int) -> bytes:
    """One recv() that must come by ``deadline`` (a time.monotonic() time);
    socket.timeout once it has passed. A loop reading one bounded message calls
    it for each read, so the message has one deadline, not each read a timeout
    of its own: a peer sending a byte a second gets something to every read."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    sock.settimeout(left)
    return sock.recv(size)


def send_message(sock: socket.socket, message: bytes) -> None:
    """sendall() for a short message: one send(2) when the send buffer has room,
    as it nearly always has; sendall() for what it did not take. (gevent's
    sendall() asks for SO_SNDBUF, a getsockopt(2), on every call.)"""
    sent = sock.send(message)
    if sent < len(message):
        sock.sendall(message[sent:])


def abort(sock: socket.socket) -> None:
    """Stop both directions at once (wakes any greenlet blocked on it)."""
    shutdown(sock, socket.SHUT_RDWR)


def shutdown(sock: socket.socket, how: int) -> None:
    """shutdown(2) on the TCP socket, also under TLS (a TLSStream's is the TCP
    socket's, relay.half_close says why); never raises."""
    try:
        sock.shutdown(how)
    except (OSError, ValueError):
        pass


def close_quietly(sock: Optional[socket.socket]) -> None:
    """Close a socket; never raises."""
    if sock is None:
        return
    try:
        sock.close()
    except Exception:  # closing must never raise, whatever state the socket is in
        pass


def format_address(sockaddr: tuple) -> str:
    """host:port, or [v6]:port, for logs (from accept() or getpeername())."""
    host, port = sockaddr[:2]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def describe(exc: BaseException) -> str:
    """An error in a few words, for a log line."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class Target:
    """Where the client forwards users: resolved once, again after a failure
    (the name may have moved)."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.address, self.timeout = address, timeout
        self._resolved = {}  # type: dict  (socket kind -> sockaddr)

    def resolved(self, kind: int) -> Optional[tuple]:
        """The address a connect() of ``kind`` found last, None before (or after a failure)."""
        return self._resolved.get(kind)

    def forget(self, kind: int) -> None:
        """A connect to the resolved address failed: resolve again next time."""
        self._resolved.pop(kind, None)

    def connect(self, kind: int, timeout: Optional[float] = None) -> socket.socket:
        """A TCP (timeout: ``self.timeout``) or UDP (``timeout``) socket connected to it."""
        try:
            sockaddr = self._resolved.get(kind)
            if sockaddr is None:
                sockaddr = self._resolved[kind] = resolve(self.address, kind, passive=False)[1]
            if kind == socket.SOCK_STREAM:
                return dial_tcp(self.address, self.timeout, sockaddr)
            return connect(sockaddr, kind, timeout)
        except OSError:
            self._resolved.pop(kind, None)
            raise
