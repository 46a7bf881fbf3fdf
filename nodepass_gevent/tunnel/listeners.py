"""Listening sockets as gevent's own servers: StreamServer for TCP, DatagramServer for UDP.

gevent's servers already accept from an event-loop callback (up to
``max_accept`` connections or datagrams per wake-up, without a greenlet
switch; for UDP without the steps around each, see UdpListener._do_read),
stop accepting while a bounded pool is full and start again when it frees a
place, and close an accepted socket when its handler returns. What is added
here:

- errors are ours to report: running out of descriptors or buffers backs off
  (doubling, capped) with one warning, never a traceback; anything else fails
  the owner (lifecycle.Component.fail);
- accepted TCP sockets get TCP_NODELAY: Linux copies it from the listening
  socket, which is checked on the first one accepted and then trusted (no
  setsockopt(2) per connection; elsewhere each accepted socket is set);
- a listener may hand its sockets on (the data port pools them), so that the
  handler's return does not close them;
- UDP datagrams are handled in the receive callback itself, so a handler must
  never block (udp.py queues what has to wait); reads are ``size`` large
  (udp.RECEIVE_SIZE: any datagram whole), not gevent's fixed 8192, which cut
  larger datagrams without a word. What is too large for the wire in use is
  for the handler to drop, whole.

The sockets are bound by net.listen_tcp/listen_udp first, so that a port in
use is a BindError with a clear line before anything is served.
"""

import errno
import socket
from typing import Callable, Optional

from gevent.server import DatagramServer, StreamServer

from nodepass_gevent.base import net

ACCEPT_BACKOFF_FIRST = 0.05
ACCEPT_BACKOFF_MAX = 1.0
RECEIVE_BACKOFF_FIRST = 0.01
RECEIVE_BACKOFF_MAX = 1.0
# Out of descriptors or memory, or a connection gone before accept(): wait
# for some to be released, keep the listener.
ACCEPT_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                    errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


class _Pausing:
    """Stop reading for a back-off delay, then start again (BaseServer's timer)."""

    def pause_for(self, delay: float) -> None:
        self.stop_accepting()
        self._timer = self.loop.timer(delay)
        self._timer.start(self._start_accepting_if_started)


class TcpListener(_Pausing, StreamServer):
    """Accepts TCP connections and runs ``handle(sock, peer)`` through ``spawn``
    (a gevent Pool bounds them; a callable decides itself). ``handle_now``, if
    given, is tried first in the accept callback itself (see __init__).

    ``owner`` is the component whose ``fail`` hears of a fatal accept error
    and whose ``log`` takes the warnings; ``name`` starts those lines.
    """

    def __init__(self, sock: socket.socket, handle: Callable, spawn, owner, name: str,
                 hands_on: bool = False,
                 handle_now: Optional[Callable[[socket.socket, tuple], bool]] = None) -> None:
        super().__init__(sock, handle, spawn=spawn)
        self.owner, self.name = owner, name
        self._hands_on = hands_on
        # Tried first, in the accept callback (it must not block); True: it dealt
        # with the socket, no greenlet needed. False: ``handle`` gets it.
        self._handle_now = handle_now
        self._backoff = net.Backoff(ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_MAX)
        net.set_nodelay(sock)  # for the accepted sockets to inherit
        self._nodelay_inherited = False  # until the first accepted socket shows it

    @property
    def port(self) -> int:
        return self.address[1]

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            self._accept_failed(exc)
            return None
        if accepted:
            self._backoff.reset()
            if not self._nodelay_inherited:
                self._nodelay_inherited = net.has_nodelay(accepted[0])
                if not self._nodelay_inherited:
                    net.set_nodelay(accepted[0])
        return accepted

    def do_handle(self, sock, peer) -> None:
        if self._handle_now is None or not self._handle_now(sock, peer):
            super().do_handle(sock, peer)

    def do_close(self, sock, *args) -> None:
        if not self._hands_on:  # else the handler has filed it somewhere, or closed it
            sock.close()

    def _accept_failed(self, exc: OSError) -> None:
        if self.closed:
            return
        if exc.errno not in ACCEPT_TRANSIENT:
            self.owner.fail("%s: accept failed: %s" % (self.name, exc))
            return
        delay = self._backoff.pause()
        self.owner.log.warning("%s: accept failed (%s); retrying in %.2fs", self.name,
                               exc.strerror, delay)
        self.pause_for(delay)


class UdpListener(_Pausing, DatagramServer):
    """Receives datagrams of up to ``size`` bytes (a larger one would be cut: give
    the largest there is) and calls ``handle(datagram, peer)`` for each, in the
    receive callback: ``handle`` must not block."""

    def __init__(self, sock: socket.socket, size: int, handle: Callable, owner,
                 name: str) -> None:
        super().__init__(sock, handle, spawn=None)
        self.size, self.owner, self.name = size, owner, name
        self._backoff = net.Backoff(RECEIVE_BACKOFF_FIRST, RECEIVE_BACKOFF_MAX)

    def _do_read(self) -> None:
        """The receive callback (BaseServer's, replaced): up to ``max_accept``
        datagrams, each handled at once, until the socket is empty. Reading on
        until EAGAIN keeps a burst (many senders) to one wake-up; what is left
        out are BaseServer's steps around each datagram (pool checks, a close
        after the handler), which do nothing for UDP."""
        receive, size, handle = self.receive, self.size, self.handle  # set_handle keeps it
        for _ in range(self.max_accept):
            try:
                datagram, peer = receive(size)
            except BlockingIOError:
                return  # read everything there was
            except OSError as exc:
                self._receive_failed(exc)
                return
            if self._backoff.failures:
                self.owner.log.info("%s: UDP receives work again after %d errors", self.name,
                                    self._backoff.reset())
            try:
                handle(datagram, peer)
            except Exception as exc:  # a bug: in the event loop's callback it would only print
                self.owner.fail(exc)
                return

    def receive(self, size: int) -> Optional[tuple]:
        """One datagram and its sender from the non-blocking socket underneath."""
        return self._socket.recvfrom(size)

    def _receive_failed(self, exc: OSError) -> None:
        """Not fatal (out of buffers, an ICMP error queued on the socket), but one
        that repeats would spin: back off, and warn for the first of a streak only."""
        if self.closed:
            return
        delay = self._backoff.pause()
        if self._backoff.failures == 1:
            self.owner.log.warning("%s: UDP receive failed (%s); retrying with back-off",
                                   self.name, exc.strerror or exc)
        else:
            self.owner.log.debug("%s: UDP receive failed again (%s); next try in %.2fs",
                                 self.name, exc.strerror or exc, delay)
        self.pause_for(delay)
