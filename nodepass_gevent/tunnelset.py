"""The tunnels one process runs, from command-line URLs or a tunnels file.

Pure parsing and checking, like config.py: text in, a list of frozen Tunnel
definitions out, or one ``ConfigError`` line that names the bad tunnel. The
whole set is checked before anything listens, and again on every reload.

A tunnels file has one tunnel a line, an optional name first:

    # name       URL
    web          server://:10101/127.0.0.1:8080?tls=1&max=256
    ssh          client://KEY@relay.example.com:10102/127.0.0.1:22?min=8
    client://relay.example.com:10103/127.0.0.1:53      # named client-10103-53

``#`` starts a comment (at the start of a line or after a space). A tunnel
without a name is named ``<role>-<tunnel port>-<target port>``: derived from
its definition, never from its place in the file, so a reload that moves
lines around changes nothing.

Each URL may override the process-wide tuning variables (config.SETTINGS)
for its tunnel with query parameters, spelt as later NodePass versions spell
them where they have one (``min``, ``max``, ``slot``) and otherwise as the
variable's name in lower case (``shutdown_timeout=10s``). They change only
this process's behaviour, never the wire.
"""

import dataclasses
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nodepass_gevent.config import (SETTINGS, Config, ConfigError, Settings, parse_url,
                                    repeated_parameter, without_key)
from nodepass_gevent.urls import query_pairs

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # as nodepass-service names services
# Query parameter -> the SETTINGS variable it overrides for one tunnel.
OVERRIDES = {"min": "MIN_POOL_CAPACITY", "max": "MAX_POOL_CAPACITY", "slot": "SEMAPHORE_LIMIT"}
# The process's certificate timer is one for all tunnels: not a tunnel's setting.
PROCESS_WIDE = ("RELOAD_INTERVAL",)
OVERRIDES.update((s.name.lower(), s.name) for s in SETTINGS
                 if s.name not in OVERRIDES.values() and s.name not in PROCESS_WIDE)
# Overrides that mean nothing to the other role (the server keeps no minimum pool).
CLIENT_ONLY = ("min",)
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_COMMENT = re.compile(r"(^|\s)#.*")


@dataclass(frozen=True)
class Tunnel:
    """One tunnel of the set: its name, its endpoint and its own settings.

    Two Tunnels are equal when their name and definition are: that is how a
    reload tells an unchanged tunnel (left running) from a changed one.
    """

    name: str
    config: Config
    settings: Settings
    # Where it was defined, for error lines: "line 3" or "URL 2".
    origin: str = field(default="", compare=False)
    # What its URL itself set that the environment may set too: the override
    # parameters it gave, and "key" for a KEY@ (for --check to say which won).
    given: Tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        return "%s (%s)" % (self.name, self.origin) if self.origin else self.name


def parse_tunnel(url: str, settings: Settings, name: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None, origin: str = "") -> Tunnel:
    """One tunnel from its URL; the overrides are taken out before parse_url sees it."""
    base_url, overrides = split_overrides(url)
    try:
        config = parse_url(base_url, environ)
    except ConfigError as exc:
        if "unknown URL parameter" not in str(exc):
            raise
        raise ConfigError("%s, and the tunnel settings %s" % (exc, ", ".join(OVERRIDES))) \
            from None
    tunnel_settings = apply_overrides(settings, overrides, config.role)
    if name is None:
        name = default_name(config)
    elif name and not NAME_PATTERN.match(name):  # "" only for the lone command-line URL
        raise ConfigError("bad tunnel name %r: use 1-64 of A-Z a-z 0-9 _ -" % name)
    given = tuple(overrides) + (("key",) if without_key(base_url) != base_url else ())
    return Tunnel(name, config, tunnel_settings, origin, given)


def split_overrides(url: str) -> Tuple[str, Dict[str, str]]:
    """The URL without its override parameters, and those parameters."""
    base, question, rest = url.partition("?")
    if not question:
        return url, {}
    query, hash_mark, fragment = rest.partition("#")
    kept, overrides = [], {}
    for piece in query.split("&"):
        pairs = query_pairs(piece, keep_blank_values=True)
        if pairs and pairs[0][0] in OVERRIDES:
            name, value = pairs[0]
            if name in overrides:
                raise repeated_parameter(name, overrides[name], value)
            overrides[name] = value
        elif piece:
            kept.append(piece)
    if not kept:
        return base + hash_mark + fragment, overrides
    return base + "?" + "&".join(kept) + hash_mark + fragment, overrides


def apply_overrides(settings: Settings, overrides: Mapping[str, str], role: str) -> Settings:
    """``settings`` with this tunnel's overrides, checked as load_settings checks them."""
    if not overrides:
        return settings
    by_name = {setting.name: setting for setting in SETTINGS}
    changes = {}
    for parameter, text in overrides.items():
        if parameter in CLIENT_ONLY and role != "client":
            raise ConfigError("URL parameter %r is for client:// tunnels only" % parameter)
        setting = by_name[OVERRIDES[parameter]]
        try:
            changes[setting.attribute] = setting.parse(text)
        except ConfigError as exc:
            # The variable's message, spelt with the parameter the operator wrote.
            raise ConfigError(str(exc).replace(setting.name, parameter, 1)) from None
    result = dataclasses.replace(settings, **changes)
    # Only a client keeps a minimum: a server may set max= below the default min.
    if role == "client" and result.min_pool_capacity > result.max_pool_capacity:
        raise ConfigError("the minimum pool (%d) is larger than the maximum (%d): set min= or"
                          " max= accordingly" % (result.min_pool_capacity,
                                                 result.max_pool_capacity))
    return result


def default_name(config: Config) -> str:
    return "%s-%d-%d" % (config.role, config.tunnel.port, config.target.port)


def from_urls(urls: Sequence[str], settings: Settings,
              environ: Optional[Mapping[str, str]] = None) -> List[Tunnel]:
    """The command line's tunnels. With several, a key in a URL is refused: see
    ``refuse_keys_in_arguments``. One URL gets the empty name (today's log lines)."""
    if len(urls) == 1:
        tunnel = parse_tunnel(urls[0], settings, "", environ)
        check_set([tunnel])  # its own ports must differ too
        return [tunnel]
    refuse_keys_in_arguments(urls)
    tunnels = []
    for number, url in enumerate(urls, 1):
        origin = "URL %d" % number
        try:
            tunnels.append(parse_tunnel(url, settings, None, environ, origin))
        except ConfigError as exc:
            raise ConfigError("tunnel %s: %s" % (origin, exc)) from None
    check_set(tunnels)
    return tunnels


def refuse_keys_in_arguments(urls: Sequence[str]) -> None:
    """A key on the command line is visible to every user (ps). With one URL the
    CLI moves it to the environment and re-executes itself; NODEPASS_KEY holds
    one key only, so with several URLs there is nowhere safe to move each:
    keys go in NODEPASS_KEY (one for all) or in a tunnels file (0600)."""
    for number, url in enumerate(urls, 1):
        if without_key(url) != url:
            raise ConfigError("tunnel URL %d: a shared key on a command line of several URLs"
                              " would stay visible in the process list; use NODEPASS_KEY"
                              " (one key for all) or --config FILE" % number)


def parse_file_text(text: str, settings: Settings,
                    environ: Optional[Mapping[str, str]] = None) -> List[Tunnel]:
    """Every tunnel of a tunnels file's text; ConfigError naming the bad line."""
    tunnels = []
    for number, line in enumerate(text.splitlines(), 1):
        words = _COMMENT.sub("", line).split()
        if not words:
            continue
        origin = "line %d" % number
        if len(words) == 1 and "://" in words[0]:
            name, url = None, words[0]
        elif len(words) == 2 and "://" in words[1]:
            name, url = words
        else:
            raise ConfigError("%s: expected [NAME] URL, got %r" % (origin, line.strip()))
        try:
            tunnels.append(parse_tunnel(url, settings, name, environ, origin))
        except ConfigError as exc:
            raise ConfigError("tunnel %s: %s" % (name + " (%s)" % origin if name else origin,
                                                 exc)) from None
    if not tunnels:
        raise ConfigError("no tunnel in the file (one [NAME] URL a line)")
    check_set(tunnels)
    return tunnels


def read_file(path: str, settings: Settings,
              environ: Optional[Mapping[str, str]] = None) -> List[Tunnel]:
    try:
        with open(path, "r", encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read tunnels file %s: %s"
                          % (path, getattr(exc, "strerror", None) or exc)) from None
    try:
        return parse_file_text(text, settings, environ)
    except ConfigError as exc:
        raise ConfigError("%s: %s" % (path, exc)) from None


def exposed_key(path: str, tunnels: Sequence[Tunnel]) -> Optional[str]:
    """A warning if the tunnels file holds a shared key and others may read it
    (as ssh warns of a private key); None if not. Group-readable (0640, for the
    service's group) is fine."""
    if not any("key" in tunnel.given for tunnel in tunnels):
        return None
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        return None
    if not mode & stat.S_IROTH:
        return None
    return "%s is readable by others (mode %04o) and holds a key: chmod 600 %s" % (path, mode,
                                                                                   path)


def check_set(tunnels: Sequence[Tunnel]) -> None:
    """Refuse duplicate names, and two servers that would listen on one port."""
    names = {}  # type: Dict[str, Tunnel]
    for tunnel in tunnels:
        other = names.get(tunnel.name)
        if other is not None:
            hint = "" if _named(tunnel) and _named(other) else ": give one a name of its own"
            raise ConfigError("tunnels %s and %s are both named %r%s"
                              % (other.origin, tunnel.origin, tunnel.name, hint))
        names[tunnel.name] = tunnel
    listening = []  # type: List[Tuple[str, int, Tunnel, str]]
    for tunnel in tunnels:
        for host, port, what in _listening(tunnel):
            for other_host, other_port, other, other_what in listening:
                if port == other_port and _overlap(host, other_host) and other is tunnel:
                    raise ConfigError("%s %s and %s ports are both %d: each needs a port"
                                      " of its own" % ("tunnel %s: its" % tunnel.describe()
                                                       if tunnel.name else "the", other_what,
                                                       what, port))
                if port == other_port and _overlap(host, other_host):
                    raise ConfigError("tunnel %s: its %s port %d is already the %s port of"
                                      " tunnel %s" % (tunnel.describe(), what, port,
                                                      other_what, other.describe()))
            listening.append((host, port, tunnel, what))


def _named(tunnel: Tunnel) -> bool:
    return tunnel.name != default_name(tunnel.config)


def _listening(tunnel: Tunnel):
    if tunnel.config.role != "server":
        return []
    config = tunnel.config
    ports = [(config.tunnel.host, config.tunnel.port, "tunnel"),
             (config.target.host, config.target.port, "target")]
    if config.data_port:  # on the tunnel address's host (server.py)
        ports.append((config.tunnel.host, config.data_port, "data"))
    return ports


def _overlap(host: str, other: str) -> bool:
    return host == other or host in _WILDCARD_HOSTS or other in _WILDCARD_HOSTS


def diff(running: Sequence[Tunnel], wanted: Sequence[Tunnel]):
    """(added, removed, changed, unchanged) by name: changed ones are in ``wanted``'s form."""
    old = {tunnel.name: tunnel for tunnel in running}
    new = {tunnel.name: tunnel for tunnel in wanted}
    added = [tunnel for name, tunnel in new.items() if name not in old]
    removed = [tunnel for name, tunnel in old.items() if name not in new]
    changed = [tunnel for name, tunnel in new.items() if name in old and old[name] != tunnel]
    unchanged = [tunnel for name, tunnel in new.items() if old.get(name) == tunnel]
    return added, removed, changed, unchanged
