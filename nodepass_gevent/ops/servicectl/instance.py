"""What a unit must know of what one instance runs, read by the package's own parsers:
a tunnel URL, a tunnels file (--config) or a master (master://, the REST API)."""

import importlib
from types import ModuleType
from typing import Dict, List, Optional, Union

from nodepass_gevent.ops.servicectl.layout import STATE_ROOT
from nodepass_gevent.ops.servicectl.output import ServiceError, Status
from nodepass_gevent.ops.servicectl.package import effective_settings, tunnelset_module


class TunnelUrl:
    """What the unit needs to know about an already validated URL, read by the
    package's own URL parser (with the per-tunnel parameters, where it has them)."""

    def __init__(self, config: ModuleType, url: str, variables: Optional[Dict[str, str]] = None,
                 tunnel: object = None) -> None:
        tunnelset = tunnelset_module()
        if tunnel is None and tunnelset is not None:
            try:
                tunnel = tunnelset.parse_tunnel(url, effective_settings(config, variables or {}),
                                                "", {})
            except ValueError as error:  # config.ConfigError
                raise ServiceError("URL refused: {}".format(error), Status.USAGE)
        if tunnel is not None:
            parsed = tunnel.config
            # Its own SHUTDOWN_TIMEOUT (shutdown_timeout=) sets the stop timeout too.
            self.shutdown_seconds = tunnel.settings.shutdown_timeout  # type: Optional[float]
        else:
            try:
                parsed = config.parse_url(url, environ={})
            except ValueError as error:
                raise ServiceError("URL refused: {}".format(error), Status.USAGE)
            self.shutdown_seconds = None
        self.mode = parsed.role
        self.tls = str(parsed.tls_mode)
        self.crt = parsed.crt or ""
        self.key = parsed.key or ""
        # data_port= listens too (0: a random port above 1023; older packages lack it).
        self.ports = [parsed.tunnel.port, parsed.target.port, getattr(parsed, "data_port", 0)]

    def listens_below_1024(self) -> bool:
        # Only the server listens (tunnel and target ports); a client dials out.
        return self.mode == "server" and any(0 < port < 1024 for port in self.ports)

    def certificate_paths(self) -> List[str]:
        if self.tls != "2":
            return []
        return [path for path in (self.crt, self.key) if path]


class TunnelsFile:
    """What the unit needs to know about an already validated tunnels file:
    the same as TunnelUrl, for all its tunnels at once."""

    def __init__(self, config: ModuleType, path: str, variables: Dict[str, str]) -> None:
        tunnelset = tunnelset_module()
        if tunnelset is None:
            raise ServiceError("this nodepass_gevent has no tunnels files (--config): "
                               "update it first")
        try:
            tunnels = tunnelset.read_file(path, effective_settings(config, variables),
                                          environ={})
        except ValueError as error:
            raise ServiceError("tunnels file refused: {}".format(error), Status.USAGE)
        self.tunnels = [TunnelUrl(config, "", tunnel=tunnel) for tunnel in tunnels]
        # The longest drain any of its tunnels may take sets the stop timeout.
        self.shutdown_seconds = max(tunnel.settings.shutdown_timeout for tunnel in tunnels)

    def listens_below_1024(self) -> bool:
        return any(tunnel.listens_below_1024() for tunnel in self.tunnels)

    def certificate_paths(self) -> List[str]:
        return [path for tunnel in self.tunnels for path in tunnel.certificate_paths()]


def is_master_url(url: str) -> bool:
    return url.startswith("master://")


class MasterUrl:
    """What the unit needs to know about an already checked master:// URL (the
    package's `nodepass --check` read it as the master will): the ports it
    listens on and its tls=2 files. Its state is the unit's StateDirectory=,
    so a state= of its own is refused: ProtectSystem=strict would leave that
    directory read-only, and StateDirectory= keeps it for the service user."""

    def __init__(self, config: ModuleType, url: str) -> None:
        urls = importlib.import_module("nodepass_gevent.urls")
        parts = urls.split_url(url)
        params = dict(urls.query_pairs(parts.query))
        if params.get("state"):
            raise ServiceError("a master service keeps its state in {}/NAME (StateDirectory=, "
                               "$STATE_DIRECTORY): drop state= from the URL".format(STATE_ROOT),
                               Status.USAGE)
        try:
            ports = [config.parse_address(parts.netloc, "master address", lowest_port=0).port]
            if params.get("metrics"):
                ports.append(config.parse_address(params["metrics"], "metrics= address",
                                                  lowest_port=0).port)
        except ValueError as error:  # config.ConfigError
            raise ServiceError("URL refused: {}".format(error), Status.USAGE)
        self.ports = ports
        self.tls = params.get("tls", "0")
        self.crt, self.key = params.get("crt", ""), params.get("key", "")
        # The master stops its instances at once (no drain): SHUTDOWN_TIMEOUT alone.
        self.shutdown_seconds = None  # type: Optional[float]

    def listens_below_1024(self) -> bool:
        return any(0 < port < 1024 for port in self.ports)

    def certificate_paths(self) -> List[str]:
        if self.tls != "2":
            return []
        return [path for path in (self.crt, self.key) if path]


# What one instance runs.
Runs = Union[TunnelUrl, TunnelsFile, MasterUrl]
