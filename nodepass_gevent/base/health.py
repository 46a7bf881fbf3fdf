"""Whether a tunnel can carry users now, and saying so.

Each role's status() carries a verdict, made here from what the role sees:

    problem               what it means                          who can see it
    not_running           starting, stopped, or failed           both
    control_down          no tunnel (control) connection         both
    no_data_connections   tunnel up, but no data connection      both
                          ready and none made for GRACE seconds
    target_unreachable    the private service refuses (or does   client (TCP)
                          not answer) the connections users need

/healthz (metrics.py) is 200 only while no tunnel has a problem; the
problem is a bounded label for /metrics, the reason a line for people.

The failures behind a problem are logged through a Throttle: the first line
at once, then at most one per REPEAT seconds carrying the count of what was
held back. A failing loop is never silent, and never floods the log.
"""

import logging
import socket
import ssl
import time
from typing import Optional

import gevent

from nodepass_gevent.base import net

# How long data connections may be missing before the tunnel is declared
# unable to carry users. 5 s is how long a user waits on the server for a data
# connection (server.POOL_WAIT) before being dropped, and the client's longest
# pause between data dials (pool.DIAL_BACKOFF_MAX): past it, a user arriving
# now is dropped. Shorter blips (one lost SYN costs 1 s, a data port busy for
# a moment) do not flap the check.
GRACE = 5.0
REPEAT = 30.0  # seconds between two lines about the same ongoing failure

NOT_RUNNING = "not_running"
CONTROL_DOWN = "control_down"
NO_DATA_CONNECTIONS = "no_data_connections"
TARGET_UNREACHABLE = "target_unreachable"
PROBLEMS = (NOT_RUNNING, CONTROL_DOWN, NO_DATA_CONNECTIONS, TARGET_UNREACHABLE)

OK = "ok"


class Throttle:
    """At most one log line per ``every`` seconds, the first at once; counts the
    lines held back in between."""

    def __init__(self, every: float = REPEAT, clock=time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.held = 0
        self._last = None  # type: Optional[float]

    def due(self) -> Optional[int]:
        """None: hold this line back (counted). Else write it now, with the
        number of lines held back since the previous one."""
        now = self.clock()
        if self._last is not None and now - self._last < self.every:
            self.held += 1
            return None
        held, self.held, self._last = self.held, 0, now
        return held

    def reset(self) -> None:
        """The failure is over: the next one is news, logged at once."""
        self.held, self._last = 0, None


class Streak:
    """Failures in a row of one thing (data dials, target connects): since
    when, how many, the last reason; ended by a success."""

    def __init__(self) -> None:
        self.since = None  # type: Optional[float]
        self.failures = 0
        self.reason = ""
        self.throttle = Throttle()

    @property
    def active(self) -> bool:
        return self.since is not None

    def age(self) -> float:
        return time.monotonic() - self.since if self.since is not None else 0.0

    def begin(self) -> None:
        """Start a streak before any failure (a tunnel not open yet)."""
        if self.since is None:
            self.since = time.monotonic()

    def fail(self, reason: str) -> bool:
        """Count one failure; True if it starts the streak."""
        self.failures += 1
        self.reason = reason
        if self.since is None:
            self.since = time.monotonic()
            return True
        return False

    def end(self) -> int:
        """A success: the failures the streak had (0: there was none)."""
        failures, self.failures, self.since, self.reason = self.failures, 0, None, ""
        self.throttle.reset()
        return failures


def verdict(problem: Optional[str], reason: str = "") -> dict:
    """The health fields of a status(): ``healthy``, ``problem`` (a PROBLEMS
    value or None) and ``health`` ("ok", or the reason in one line)."""
    return {"healthy": problem is None, "problem": problem,
            "health": OK if problem is None else reason}


def not_running(state: str, why: str = "") -> dict:
    return verdict(NOT_RUNNING, "tunnel %s%s" % (state, ": " + why if why else ""))


def describe_failure(exc: BaseException) -> str:
    """A failure in a few words, with what OpenSSL said for a TLS one."""
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
        return "TLS: %s" % (reason or exc)
    if isinstance(exc, OSError) and getattr(exc, "strerror", None):
        return exc.strerror
    text = str(exc)
    if isinstance(exc, OSError) and text == "timed out":
        return text
    return text or type(exc).__name__


def is_untrusted_certificate(exc: BaseException) -> bool:
    """The server's certificate did not verify (chain or name): a setup
    mistake that no retry fixes."""
    if isinstance(exc, getattr(ssl, "SSLCertVerificationError", ())):
        return True
    if isinstance(exc, ssl.CertificateError):  # 3.6: a name mismatch
        return True
    return isinstance(exc, ssl.SSLError) and getattr(exc, "reason", "") == \
        "CERTIFICATE_VERIFY_FAILED"


def trust_remedy(host: str) -> str:
    """What to do when the server's tls=2 certificate does not verify: which
    CAs this client trusts, and how to make it trust the right one."""
    paths = ssl.get_default_verify_paths()
    return ("this client trusts the CA file %s and the CA directory %s"
            " (SSL_CERT_FILE and SSL_CERT_DIR override them); the server's certificate must"
            " be signed by one of those CAs and name %s: set SSL_CERT_FILE=/path/to/ca.pem"
            " (the CA that signed the server's crt=), or add that CA to the system store,"
            " or run the server with tls=1"
            % (paths.cafile or paths.openssl_cafile, paths.capath or paths.openssl_capath,
               host))


def level_for(exc: BaseException) -> int:
    """A dial failure's log level: an untrusted certificate is an error at once."""
    return logging.ERROR if is_untrusted_certificate(exc) else logging.WARNING


TARGET_PROBE_INTERVAL = 2.0  # seconds between checks of a target that refused a user


class TargetWatch:
    """The client's view of its TCP target, from its users' connects (the
    ``on_target`` of tcp.launch).

    Once a connect fails the target counts as unreachable until one works
    again: a user's, or a probe (a connect, closed at once) every
    TARGET_PROBE_INTERVAL. Probes run only while the target fails, so a
    healthy service never sees one; without them the verdict would stay
    stuck on the last failure while no user comes.
    """

    def __init__(self, target, stats, log, spawn) -> None:
        self.target, self.stats, self.log = target, stats, log
        self._spawn = spawn  # supervised: a probe dies with the client
        self.streak = Streak()
        self._prober = None

    def __call__(self, error: Optional[OSError]) -> None:
        if error is None:
            self._answered()
            return
        self.stats.target_failures += 1
        self.streak.fail(describe_failure(error))
        held = self.streak.throttle.due()
        if held is not None:
            self.log.error("Client: cannot reach TCP target %s: %s; users are turned away"
                           " until it answers (%d so far, the first %.0fs ago; checking every"
                           " %.0fs)", self.target.address, self.streak.reason,
                           self.streak.failures, self.streak.age(), TARGET_PROBE_INTERVAL)
        if self._prober is None or self._prober.dead:
            self._prober = self._spawn(self._probe)

    def _answered(self) -> None:
        if self.streak.active:
            failures, age = self.streak.failures, self.streak.age()
            self.streak.end()
            self.log.info("Client: TCP target %s answers again (%d users turned away in %.0fs)",
                          self.target.address, failures, age)

    def _probe(self) -> None:
        while self.streak.active:
            gevent.sleep(TARGET_PROBE_INTERVAL)
            try:
                sock = self.target.connect(socket.SOCK_STREAM)
            except OSError as exc:
                self.streak.reason = describe_failure(exc)
                continue
            net.close_quietly(sock)
            self._answered()

    def verdict(self) -> Optional[dict]:
        if not self.streak.active:
            return None
        return verdict(TARGET_UNREACHABLE, "TCP target %s unreachable for %.0fs: %s (%d users"
                       " turned away)" % (self.target.address, self.streak.age(),
                                          self.streak.reason, self.streak.failures))
