"""Live traffic figures: plain counters, cheap on the hot path.

All greenlets run in one thread, so an integer add needs no lock.
"""


class Stats:
    """Counters one role keeps for its report line and its status (status()).

    Every field is a plain integer that the code paths add to; readers
    (the report line, /status, /metrics) only look at them.
    """

    def __init__(self) -> None:
        self.tcp_active = 0
        self.tcp_total = 0
        self.udp_total = 0  # user datagrams (v1.0 exchanges and datagrams of flows)
        self.udp_flows_active = 0
        self.bytes_in = 0   # from users / the data side towards the target
        self.bytes_out = 0  # back towards users
        # The UDP part of bytes_in / bytes_out (datagrams and their replies), so
        # the master can report TCP and UDP bytes apart, as v1.14 does.
        self.udp_bytes_in = 0
        self.udp_bytes_out = 0
        self.data_dials = 0           # client: data connections dialed
        self.data_dial_failures = 0   # client: ... that failed (refused, TLS, handshake)
        self.reconnects = 0           # client: tunnels lost and dialed again
        self.auth_failures = 0        # key proofs that failed (either side)
        self.tls_failures = 0         # TLS handshakes that failed on data connections
        self.semaphore_waits = 0      # users that found SEMAPHORE_LIMIT reached
        self.users_dropped = 0        # server: users closed for want of a client or data connection
        self.target_failures = 0      # client: users whose target did not answer (TCP)
        # Server: users turned away at the edge (access.py) and datagrams over rate=.
        self.users_refused = 0        # TCP users refused by allow=/deny=
        self.users_over_cap = 0       # TCP users beyond per_user= from one address
        self.datagrams_refused = 0    # UDP datagrams refused by allow=/deny=
        self.datagrams_over_rate = 0  # UDP datagrams (or replies) dropped by rate=
        # Either side, the v1.0 wire only (udp.py): above UDP_DATA_BUF_SIZE, dropped whole.
        self.udp_too_large_datagrams = 0  # user datagrams, on their way to the target
        self.udp_too_large_replies = 0    # replies, on their way back to the user
        self._reported = self.snapshot()

    # Status field -> attribute, for status() and the metrics.
    FIELDS = ("tcp_active", "tcp_total", "udp_flows_active", "bytes_in", "bytes_out",
              "udp_bytes_in", "udp_bytes_out", "data_dials", "data_dial_failures", "reconnects", "auth_failures",
              "tls_failures", "semaphore_waits", "users_dropped", "target_failures",
              "users_refused", "users_over_cap",
              "datagrams_refused", "datagrams_over_rate", "udp_too_large_datagrams",
              "udp_too_large_replies")

    def figures(self) -> dict:
        """Every counter by its status name (udp_total is "udp_datagrams" there)."""
        figures = {name: getattr(self, name) for name in self.FIELDS}
        figures["udp_datagrams"] = self.udp_total
        return figures

    def count_bytes(self, size: int, inbound: bool) -> None:
        if inbound:
            self.bytes_in += size
        else:
            self.bytes_out += size

    def count_inbound(self, size: int) -> None:
        self.bytes_in += size

    def count_outbound(self, size: int) -> None:
        self.bytes_out += size

    def counter(self, inbound: bool):
        """A callable counting bytes one way (what the copy engines call per write):
        a bound method, one call per write and nothing made per connection."""
        return self.count_inbound if inbound else self.count_outbound

    def tcp_opened(self) -> None:
        """A TCP connection starts (active until tcp_closed(); a plain call, not a
        context manager: this runs once per connection, on the churn path)."""
        self.tcp_active += 1
        self.tcp_total += 1

    def tcp_closed(self) -> None:
        self.tcp_active -= 1

    def udp_datagram(self, size: int) -> None:
        """A user datagram passed on towards the target (its replies are bytes out)."""
        self.udp_total += 1
        self.bytes_in += size
        self.udp_bytes_in += size

    def udp_reply(self, size: int) -> None:
        """A reply datagram passed back towards the user."""
        self.bytes_out += size
        self.udp_bytes_out += size

    def snapshot(self) -> tuple:
        return (self.tcp_active, self.tcp_total, self.udp_total, self.bytes_in, self.bytes_out,
                self.refusals(), self.udp_too_large_datagrams, self.udp_too_large_replies)

    def refusals(self) -> tuple:
        return (self.users_refused, self.users_over_cap, self.datagrams_refused,
                self.datagrams_over_rate)

    def changed_since_report(self) -> bool:
        """True (once) if anything moved since the previous call, or traffic is live."""
        now = self.snapshot()
        changed = now != self._reported or self.tcp_active > 0
        self._reported = now
        return changed

    def line(self, pool: str) -> str:
        """The report line; ``pool``: the pool's own figures (its describe())."""
        line = ("Traffic: tcp active=%d total=%d | udp exchanges=%d | bytes in=%d out=%d"
                " | pool %s"
                % (self.tcp_active, self.tcp_total, self.udp_total, self.bytes_in,
                   self.bytes_out, pool))
        if any(self.refusals()):  # only with allow=, deny=, per_user= or rate= at work
            line += (" | refused tcp=%d over_cap=%d udp=%d udp_over_rate=%d"
                     % self.refusals())
        if self.udp_too_large_datagrams or self.udp_too_large_replies:  # the v1.0 wire
            line += (" | udp too large: datagrams=%d replies=%d"
                     % (self.udp_too_large_datagrams, self.udp_too_large_replies))
        return line
