"""The tuning environment variables (SEMAPHORE_LIMIT ...) -> frozen Settings.

Pure, like config.py (which re-exports what is here): a mapping in, a frozen
Settings out, ``ConfigError`` (one readable line, the error every configuration
mistake raises) for anything wrong.

NodePass v1.14 spells its variables with an ``NP_`` prefix (NP_SEMAPHORE_LIMIT);
either spelling is read. The two set to different values is an error, since
neither can be the one meant. v1.14's variables with no counterpart here
(NP_TCP_DIAL_TIMEOUT ...) are checked and otherwise have no effect yet
(V114_ONLY). Defaults stay v1.0's, not v1.14's (SEMAPHORE_LIMIT 1024, not 65536).
"""

import os
import re
from dataclasses import dataclass, field, make_dataclass
from typing import Mapping, Optional, Union

V114_PREFIX = "NP_"


class ConfigError(ValueError):
    """A configuration mistake, worded for the operator who made it."""


@dataclass(frozen=True)
class Setting:
    """One of the seed's environment variables, as the operator sees it."""

    name: str      # the variable, e.g. SEMAPHORE_LIMIT; the Settings field is its lower case
    kind: str      # "int" (a whole number of at least 1) or "duration" (Go syntax, above 0)
    default: str   # as an operator would write it: "1024", "5s"
    help: str      # one line for `nodepass --help`

    @property
    def attribute(self) -> str:
        return self.name.lower()

    def parse(self, text: str) -> Union[int, float]:
        """The value of ``text`` for this variable (seconds for a duration); ConfigError."""
        if self.kind == "int":
            return _positive_int(self.name, text)
        return _positive_duration(self.name, text)


# The one list of tuning variables: Settings (at the end of this module, once
# the parsers exist), the CLI help's Environment section and nodepass-service's
# environment template are all made from it.
SETTINGS = (
    Setting("SEMAPHORE_LIMIT", "int", "1024", "Most concurrent connections and datagrams"),
    Setting("MIN_POOL_CAPACITY", "int", "16", "Fewest pooled data connections (client)"),
    Setting("MAX_POOL_CAPACITY", "int", "1024", "Most pooled data connections"),
    # On the v1.0 wire (one data connection per datagram), as in v1.0: a peer
    # reads a datagram or reply with one read of this size, so a larger one is
    # dropped whole (udp.py). udp=flow carries any datagram, whatever it says.
    Setting("UDP_DATA_BUF_SIZE", "int", "8192", "Largest UDP datagram (v1.0 wire), bytes"),
    Setting("UDP_READ_TIMEOUT", "duration", "5s", "How long a UDP exchange waits for a reply"),
    Setting("REPORT_INTERVAL", "duration", "5s", "Heartbeat and traffic report interval"),
    Setting("SERVICE_COOLDOWN", "duration", "5s", "Pause before reconnecting / re-arming"),
    Setting("SHUTDOWN_TIMEOUT", "duration", "5s", "Grace for open connections on SIGTERM"),
    Setting("RELOAD_INTERVAL", "duration", "1h", "How often tls=2 certificates are re-read"),
)


MAX_UDP_DATA_BUF_SIZE = 65535  # more than any UDP datagram: nothing is then dropped



def load_settings(environ: Optional[Mapping[str, str]] = None) -> "Settings":
    """Read the SETTINGS variables (or their NP_ spelling); one not set (or blank) keeps
    its default."""
    environ = os.environ if environ is None else environ
    texts = {setting: setting_text(setting, environ) for setting in SETTINGS}
    check_v114_only(environ)
    settings = Settings(**{setting.attribute: setting.parse(text)
                           for setting, text in texts.items() if text})
    if settings.min_pool_capacity > settings.max_pool_capacity:
        raise ConfigError("MIN_POOL_CAPACITY (%d) is larger than MAX_POOL_CAPACITY (%d)"
                          % (settings.min_pool_capacity, settings.max_pool_capacity))
    if settings.udp_data_buf_size > MAX_UDP_DATA_BUF_SIZE:
        raise ConfigError("UDP_DATA_BUF_SIZE must be at most %d" % MAX_UDP_DATA_BUF_SIZE)
    return settings


def _positive_int(name: str, text: str) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError("bad %s=%r: expected a whole number of at least 1" % (name, text))
    return int(text)


def _positive_duration(name: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ConfigError as exc:
        raise ConfigError("bad %s=%r: %s" % (name, text, exc)) from None
    if seconds <= 0:
        raise ConfigError("bad %s=%r: must be longer than zero" % (name, text))
    return seconds


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6,
                   "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go duration (``500ms``, ``5s``, ``1m30s``, ``1.5h``) into seconds."""
    text = text.strip()
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return 0.0
    position, seconds = 0, 0.0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if not match:
            raise ConfigError("expected a duration like 500ms, 5s or 1m30s")
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not body:
        raise ConfigError("expected a duration like 500ms, 5s or 1m30s")
    return -seconds if text.startswith("-") else seconds


# The parsed values of the environment variables; durations are in seconds.
Settings = make_dataclass(
    "Settings",
    [(setting.attribute, int if setting.kind == "int" else float,
      field(default=setting.parse(setting.default))) for setting in SETTINGS],
    frozen=True, namespace={"__module__": __name__,
                            "__doc__": "The seed's environment variables (SETTINGS), parsed."})


# v1.14's variables that have no counterpart here: read and checked (a typo is
# still an error), no effect yet; (name, kind) as Setting's kinds.
V114_ONLY = (("NP_TCP_DATA_BUF_SIZE", "int"), ("NP_HANDSHAKE_TIMEOUT", "duration"),
             ("NP_TCP_DIAL_TIMEOUT", "duration"), ("NP_UDP_DIAL_TIMEOUT", "duration"),
             ("NP_POOL_GET_TIMEOUT", "duration"), ("NP_MIN_POOL_INTERVAL", "duration"),
             ("NP_MAX_POOL_INTERVAL", "duration"))


def setting_text(setting: Setting, environ: Mapping[str, str]) -> str:
    """The variable's text, under our name or v1.14's NP_ one ('' if neither is set)."""
    ours = environ.get(setting.name, "").strip()
    theirs = environ.get(V114_PREFIX + setting.name, "").strip()
    if ours and theirs and ours != theirs:
        raise ConfigError("%s=%s and %s%s=%s disagree: set one of them" % (
            setting.name, ours, V114_PREFIX, setting.name, theirs))
    return ours or theirs


def check_v114_only(environ: Mapping[str, str]) -> None:
    """v1.14's variables we do not use yet must still be well formed."""
    for name, kind in V114_ONLY:
        text = environ.get(name, "").strip()
        if text:
            Setting(name, kind, text, "").parse(text)
