"""The relays run side by side: socat (one process per connection) and
nodepass-gevent (server + client, with the variants of --compare-query and
--scrape-metrics); `direct` needs no process. The Go original is not run yet.
"""

import os
import re
import subprocess
import threading
import urllib.request
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .base import HOST, REPO_ROOT
from .processes import free_port
from .targets import Target


class Command(NamedTuple):
    """A relay process to start; the next one starts once listen_port (if any) listens."""

    role: str
    argv: List[str]
    listen_port: int


def socat_commands(entry: int, target: Target) -> List[Command]:
    commands = [
        Command(
            "socat-tcp",
            [
                "socat",
                "TCP4-LISTEN:%d,bind=%s,fork,reuseaddr,backlog=4096" % (entry, HOST),
                "TCP4:%s:%d" % (HOST, target.port),
            ],
            0,
        )
    ]
    if target.udp:
        # -T ends a forked UDP relay once its peer has been quiet for 10 s.
        commands.append(
            Command(
                "socat-udp",
                [
                    "socat",
                    "-T",
                    "10",
                    "UDP4-LISTEN:%d,bind=%s,fork,reuseaddr" % (entry, HOST),
                    "UDP4:%s:%d" % (HOST, target.port),
                ],
                0,
            )
        )
    return commands


def join_query(*parts: str) -> str:
    """URL query parts joined with &, empty ones left out; a later part's
    parameter replaces an earlier one's (nodepass refuses a parameter given
    twice, and --compare-client-query log=warn is meant to override log=)."""
    merged = {}  # name -> "name=value", in first-seen order
    for part in parts:
        for item in filter(None, part.split("&")):
            merged[item.partition("=")[0]] = item
    return "&".join(merged.values())


def nodepass_commands(
    python: str,
    tls: str,
    entry: int,
    target: Target,
    log_level: str,
    server_query: str,
    client_query: str = "",
    metrics_ports: Tuple[int, int] = (0, 0),
    target_port: int = 0,
) -> List[Command]:
    """The server first: a client that finds no server waits SERVICE_COOLDOWN before it retries.
    A metrics port (server's, client's) other than 0 is passed as --metrics 127.0.0.1:PORT."""
    tunnel = free_port()
    server_url = "server://%s:%d/%s:%d?%s" % (
        HOST,
        tunnel,
        HOST,
        entry,
        join_query("log=" + log_level, "tls=" + tls, server_query),
    )
    client_url = "client://%s:%d/%s:%d?%s" % (
        HOST,
        tunnel,
        HOST,
        target_port or target.port,
        join_query("log=" + log_level, client_query),
    )
    argvs = []
    for url, port in zip((server_url, client_url), metrics_ports):
        metrics = ["--metrics", "%s:%d" % (HOST, port)] if port else []
        argvs.append([python, "-m", "nodepass_gevent"] + metrics + [url])
    return [Command("server", argvs[0], tunnel), Command("client", argvs[1], 0)]


def nodepass_refusal(python: str, url: str) -> Optional[str]:
    """None if `nodepass --check URL` accepts url, else the line it refused it with."""
    try:
        done = subprocess.run(
            [python, "-m", "nodepass_gevent", "--check", url],
            env=nodepass_env({}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return "nodepass --check could not run: %s" % exc
    if done.returncode == 0:
        return None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "status %d" % done.returncode


def exit_reason(proc: subprocess.Popen, log_text: str) -> str:
    """Why a nodepass process exited at start-up, in a few words."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    if proc.returncode == 2 and any(line.lower().startswith("usage") for line in lines):
        return "nodepass exited with status 2, a usage error"
    return "nodepass exited with status %s: %s" % (
        proc.returncode,
        lines[-1] if lines else "no output",
    )


def writes_proxy_header(server_query: str) -> bool:
    """Whether a server query turns the PROXY protocol header on (proxy=1 or proxy=2)."""
    found = re.findall(r"(?:^|&)proxy=([^&]*)", server_query)
    return bool(found) and found[-1] not in ("", "0")


class Variant(NamedTuple):
    """A tunnel mode again with something added, measured beside it in the same run
    (--compare-query, --compare-client-query, --scrape-metrics)."""

    mode: str  # e.g. "tls0+q"
    base: str  # the tunnel mode it adds to
    server_query: str
    client_query: str
    metrics: bool  # --metrics on both processes, /metrics scraped every second while measured

    def title(self, base_title: str) -> str:
        extra = []
        if self.server_query:
            extra.append("server +%s" % self.server_query)
        if self.client_query:
            extra.append("client +%s" % self.client_query)
        if self.metrics:
            extra.append("/metrics scraped 1/s")
        return "%s, %s" % (base_title, ", ".join(extra))


class Scraper:
    """GETs every metrics URL of a route once a second (from a thread) while the block runs."""

    INTERVAL = 1.0

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.answered = 0
        self.failed = 0
        self.last_error = ""
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None
        # No proxy from the environment: the endpoint is on loopback.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def scrape_once(self) -> None:
        for url in self.urls:
            try:
                with self.opener.open(url, timeout=2) as reply:
                    reply.read()
                    if reply.status != 200:
                        raise OSError("HTTP %d" % reply.status)
                self.answered += 1
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self.failed += 1
                self.last_error = "%s: %s" % (url, exc)

    def loop(self) -> None:
        while not self.stopping.is_set():
            self.scrape_once()
            self.stopping.wait(self.INTERVAL)

    def __enter__(self) -> "Scraper":
        if self.urls:
            self.thread = threading.Thread(target=self.loop, name="scraper", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)


def nodepass_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
