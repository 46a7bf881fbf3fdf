"""The v1.14 handshake: one HTTP/1.1 exchange on the tunnel port, plaintext at every tls.

    client -> server (Go's http.Client; 173 bytes with Host "none"):
        GET / HTTP/1.1\\r\\n
        Host: <sni>\\r\\n                          "none" for an IP literal
        User-Agent: Go-http-client/1.1\\r\\n
        Authorization: Bearer <64 hex>\\r\\n        keys.bearer_token(key)
        Accept-Encoding: gzip\\r\\n
        \\r\\n

    server -> client, on success (Go's net/http; then it closes):
        HTTP/1.1 200 OK\\r\\n
        Connection: close\\r\\n
        Content-Type: application/json\\r\\n
        Date: Mon, 07 Dec 2026 09:19:01 GMT\\r\\n
        Content-Length: 42\\r\\n
        \\r\\n
        {"flow":"-","max":4,"tls":"0","type":"0"}\\n      sorted keys, "\\n" included

    server -> client, refused (checked in this order; the server keeps waiting):
        not GET      405 Method Not Allowed   body "Method Not Allowed\\n"
        path not /   404 Not Found            body "Not Found\\n"
        bad bearer   401 Unauthorized         body "Unauthorized\\n"
        with Connection: close, Content-Type: text/plain; charset=utf-8,
        X-Content-Type-Options: nosniff, Date, Content-Length (in that order)

    server -> client, unparsable request (Go's net/http itself, then it closes):
        HTTP/1.1 400 Bad Request\\r\\nContent-Type: text/plain; charset=utf-8\\r\\n
        Connection: close\\r\\n\\r\\n400 Bad Request          (431 ... for a head too big)

[contract (c), client.go:tunnelHandshake, server.go:tunnelHandshake, and Go's
net/http/server.go:conn.serve for 400/431]. Go accepts heads up to 1 MiB; we
bound them at MAX_HEAD, far above the ~200 bytes any real client sends.
"""

import email.utils
import json
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple
from urllib.parse import unquote

from nodepass_gevent.wire.v114 import gojson
from nodepass_gevent.wire.v114.keys import bearer_matches, bearer_token

MAX_HEAD = 8192       # bytes of request or reply head we read before refusing
MAX_REPLY_BODY = 4096  # the Go reply body is 42 bytes; room for our extensions
USER_AGENT = "Go-http-client/1.1"
NO_SERVER_NAME = "none"  # Host and SNI when the tunnel host is an IP literal or empty
FLOW_REVERSE, FLOW_FORWARD = "-", "+"  # the server accepts users / the client does
FLOWS = (FLOW_REVERSE, FLOW_FORWARD)
TLS_CODES = ("0", "1", "2")
POOL_TYPES = ("0", "1", "2", "3")  # TCP, QUIC, WebSocket, HTTP/2
POOL_TYPE_TCP = "0"
OK, BAD_REQUEST, UNAUTHORIZED, NOT_FOUND, METHOD_NOT_ALLOWED, TOO_LARGE = \
    200, 400, 401, 404, 405, 431
REASONS = {OK: "OK", BAD_REQUEST: "Bad Request", UNAUTHORIZED: "Unauthorized",
           NOT_FOUND: "Not Found", METHOD_NOT_ALLOWED: "Method Not Allowed",
           TOO_LARGE: "Request Header Fields Too Large"}
REFUSALS = (METHOD_NOT_ALLOWED, NOT_FOUND, UNAUTHORIZED)
CONFIG_FIELDS = ("flow", "max", "tls", "type")
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_GO_ERROR_HEADERS = b"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"


class HandshakeError(ValueError):
    """Bytes that are not the v1.14 handshake; the message says why, in one line."""


class BadRequest(HandshakeError):
    """A request head Go's net/http would answer with 400 (or 431: ``status``)."""

    def __init__(self, reason: str, status: int = BAD_REQUEST) -> None:
        super().__init__(reason)
        self.status = status


# -- helpers -------------------------------------------------------------------


def server_name(host: str, sni: str = "") -> str:
    """The Host header (and tls=2 SNI) a v1.14 client uses [common.go:getServerName]."""
    if sni:
        return sni
    if not host or _is_ip_literal(host):
        return NO_SERVER_NAME
    return host


def _is_ip_literal(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    return True


def http_date(when: Optional[float] = None) -> str:
    """Go's http.TimeFormat: "Mon, 07 Dec 2026 09:19:01 GMT"."""
    return email.utils.formatdate(time.time() if when is None else when, usegmt=True)


def head_end(buffer: bytes, limit: int = MAX_HEAD) -> Optional[int]:
    """Where the head (through its empty line) ends in ``buffer``; None if not yet.

    BadRequest with status 431 once ``limit`` bytes hold no end: a peer that
    sends endless headers is cut off there.
    """
    # "\r\n\r\n" ends in "\n\r\n"; Go also takes bare "\n" line ends.
    ends = [at + len(mark) for mark in (b"\n\r\n", b"\n\n")
            for at in (buffer.find(mark, 0, limit + len(mark)),) if at >= 0]
    if ends:
        return min(ends)
    if len(buffer) > limit:
        raise BadRequest("head longer than {} bytes".format(limit), TOO_LARGE)
    return None


def _head_lines(head: bytes):
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return lines


def _parse_headers(lines) -> Tuple[Tuple[str, str], ...]:
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise BadRequest("malformed header line {!r}".format(line[:60]))
        headers.append((name.decode("ascii").title(), value.strip(b" \t").decode("latin-1")))
    return tuple(headers)


def _first(headers: Tuple[Tuple[str, str], ...], name: str) -> Optional[str]:
    for key, value in headers:
        if key == name:
            return value
    return None


# -- the request (client -> server) ----------------------------------------------


def encode_request(key: bytes, host: str, extra_headers: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """The GET a v1.14 client writes, byte for byte.

    ``host`` is server_name()'s value. Go writes Host, then User-Agent, then
    the request's own headers sorted by name (Authorization and any
    ``extra_headers``: a Go server reads none but Authorization), then the
    transport's Accept-Encoding.
    """
    headers = sorted((("Authorization", "Bearer " + bearer_token(key)),) + tuple(extra_headers))
    lines = ["GET / HTTP/1.1", "Host: " + host, "User-Agent: " + USER_AGENT]
    lines += ["{}: {}".format(name, value) for name, value in headers]
    lines += ["Accept-Encoding: gzip", "", ""]
    return "\r\n".join(lines).encode("latin-1")


@dataclass(frozen=True)
class HandshakeRequest:
    method: str
    target: str
    path: str       # the target's path, percent-decoded, as Go's r.URL.Path
    version: str
    headers: Tuple[Tuple[str, str], ...]  # (Canonical-Name, value), in order

    def header(self, name: str) -> Optional[str]:
        """The first value of a header, as Go's Header.Get."""
        return _first(self.headers, name.title())


def parse_request(head: bytes) -> HandshakeRequest:
    """The request in a head that head_end() found complete.

    BadRequest where Go's net/http answers 400 itself: a malformed request
    line, version or header line, or HTTP/1.1 without Host.
    """
    if len(head) > MAX_HEAD:
        raise BadRequest("head longer than {} bytes".format(MAX_HEAD), TOO_LARGE)
    lines = _head_lines(head)
    if not lines:
        raise BadRequest("empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise BadRequest("malformed request line {!r}".format(lines[0][:60]))
    method, target, version = parts
    if not _VERSION.match(version):
        raise BadRequest("malformed HTTP version {!r}".format(version[:20]))
    headers = _parse_headers(lines[1:])
    if version == b"HTTP/1.1" and _first(headers, "Host") is None:
        raise BadRequest("missing required Host header")
    target_text = target.decode("latin-1")
    return HandshakeRequest(method.decode("ascii"), target_text, _target_path(target_text),
                            version.decode("ascii"), headers)


def _target_path(target: str) -> str:
    """r.URL.Path: an absolute-form target loses scheme and host; the query goes."""
    if "://" in target:
        rest = target.partition("://")[2]
        target = "/" + rest.partition("/")[2] if "/" in rest else ""
    return unquote(target.partition("?")[0].partition("#")[0])


def judge_request(request: HandshakeRequest, key: bytes) -> int:
    """The status v1.14 answers: 405, 404, 401 in that order, else 200."""
    if request.method != "GET":
        return METHOD_NOT_ALLOWED
    if request.path != "/":
        return NOT_FOUND
    auth = request.header("Authorization") or ""
    if not auth.startswith("Bearer ") or not bearer_matches(key, auth[len("Bearer "):]):
        return UNAUTHORIZED
    return OK


# -- the reply (server -> client) --------------------------------------------------


@dataclass(frozen=True)
class TunnelConfig:
    """What the server's 200 tells the client; ``extensions`` the other fields, sorted."""

    flow: str
    max: int
    tls: str
    type: str = POOL_TYPE_TCP
    extensions: Tuple[Tuple[str, object], ...] = ()

    def body(self) -> bytes:
        """The JSON body v1.14 writes: one sorted map, newline-terminated.

        Extension fields join the same map, so they are sorted in with the
        four; the Go client decodes only its four and ignores the rest.
        """
        mapping = dict(self.extensions)
        mapping.update(flow=self.flow, max=self.max, tls=self.tls, type=self.type)
        return gojson.encode_map(mapping)


def _response(status: int, headers, body: bytes, date: str) -> bytes:
    lines = ["HTTP/1.1 {} {}".format(status, REASONS[status])]
    lines += ["{}: {}".format(name, value) for name, value in headers]
    lines += ["Date: " + date, "Content-Length: {}".format(len(body)), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def encode_reply(config: TunnelConfig, date: Optional[str] = None) -> bytes:
    """The 200 a v1.14 server writes, byte for byte (``date`` defaults to now)."""
    return _response(OK, (("Connection", "close"), ("Content-Type", "application/json")),
                     config.body(), date or http_date())


def encode_refusal(status: int, date: Optional[str] = None) -> bytes:
    """The 405, 404 or 401 a v1.14 server writes (http.Error), byte for byte."""
    if status not in REFUSALS:
        raise ValueError("v1.14 refuses a handshake with 405, 404 or 401, not {}".format(status))
    headers = (("Connection", "close"), ("Content-Type", "text/plain; charset=utf-8"),
               ("X-Content-Type-Options", "nosniff"))
    return _response(status, headers, (REASONS[status] + "\n").encode("ascii"),
                     date or http_date())


def encode_bad_request(error: BadRequest) -> bytes:
    """What Go's net/http writes for a head it cannot parse (400) or that is too big (431)."""
    public = "{} {}".format(error.status, REASONS[error.status])
    if error.status == BAD_REQUEST and str(error) == "missing required Host header":
        public += ": " + str(error)  # the one badRequestError Go spells out
    return b"HTTP/1.1 " + public.encode("ascii") + _GO_ERROR_HEADERS + public.encode("ascii")


@dataclass(frozen=True)
class HandshakeReply:
    status: int
    reason: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    size: int  # bytes of the buffer this reply took

    def header(self, name: str) -> Optional[str]:
        return _first(self.headers, name.title())


def parse_reply(buffer: bytes, eof: bool = False) -> Optional[HandshakeReply]:
    """The server's reply once ``buffer`` holds all of it, else None.

    A Go server sends Content-Length; without one the body ends at EOF.
    HandshakeError for anything that is not an HTTP/1.x response, or for a
    head or body beyond the bounds.
    """
    try:
        end = head_end(buffer)
    except BadRequest as error:
        raise HandshakeError("reply " + str(error))
    if end is None:
        if eof:
            raise HandshakeError("connection closed before the reply's head ended ({} bytes)"
                                 .format(len(buffer)))
        return None
    lines = _head_lines(buffer[:end])
    status_line = lines[0] if lines else b""
    match = re.match(rb"^HTTP/1\.[01] (\d{3})(?: (.*))?$", status_line)
    if not match:
        raise HandshakeError("not an HTTP reply: {!r}".format(status_line[:60]))
    try:
        headers = _parse_headers(lines[1:])
    except BadRequest as error:
        raise HandshakeError("reply has a " + str(error))
    length_text = _first(headers, "Content-Length")
    if length_text is None:
        if len(buffer) - end > MAX_REPLY_BODY:
            raise HandshakeError("reply body over {} bytes".format(MAX_REPLY_BODY))
        if not eof:
            return None
        length = len(buffer) - end
    else:
        if not length_text.isdigit() or int(length_text) > MAX_REPLY_BODY:
            raise HandshakeError("reply Content-Length {!r} is not 0 to {}"
                                 .format(length_text[:20], MAX_REPLY_BODY))
        length = int(length_text)
        if len(buffer) - end < length:
            if eof:
                raise HandshakeError("connection closed {} bytes into a {}-byte reply body"
                                     .format(len(buffer) - end, length))
            return None
    return HandshakeReply(int(match.group(1)), (match.group(2) or b"").decode("latin-1"),
                          headers, buffer[end:end + length], end + length)


def parse_config(body: bytes) -> TunnelConfig:
    """The tunnel config in a 200's body, checked as our roles need it.

    The Go client would take any strings and zero values for missing fields;
    we refuse what cannot be served: a flow other than "-"/"+", a tls other
    than 0/1/2, an unknown type, a max that is not a positive integer.
    Whether type "0" is the only one served is the caller's call.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HandshakeError("handshake reply body is not JSON: {!r}".format(body[:60]))
    if not isinstance(document, dict):
        raise HandshakeError("handshake reply body is not a JSON object")
    folded: Dict[str, object] = {}
    for name, value in document.items():
        folded[name.lower() if name.lower() in CONFIG_FIELDS else name] = value
    flow, max_, tls, type_ = (folded.get(name) for name in CONFIG_FIELDS)
    if flow not in FLOWS:
        raise HandshakeError("handshake reply flow {!r} is not '-' or '+'".format(flow))
    if tls not in TLS_CODES:
        raise HandshakeError("handshake reply tls {!r} is not '0', '1' or '2'".format(tls))
    if type_ not in POOL_TYPES:
        raise HandshakeError("handshake reply type {!r} is not '0' to '3'".format(type_))
    if isinstance(max_, bool) or not isinstance(max_, int) or max_ < 1:
        raise HandshakeError("handshake reply max {!r} is not a positive integer".format(max_))
    extensions = tuple(sorted((name, value) for name, value in folded.items()
                              if name not in CONFIG_FIELDS))
    return TunnelConfig(flow, max_, tls, type_, extensions)


def starts_like_request(prefix: bytes) -> Optional[bool]:
    """Whether the first bytes a peer sent can begin a v1.14 GET; None if too few to say.

    For telling a v1.14 client (which writes "GET / HTTP/1.1" at once) from a
    v1.0 one (which writes nothing first) on the same port.
    """
    probe = b"GET "
    if len(prefix) < len(probe):
        return None if probe.startswith(prefix) else False
    return prefix.startswith(probe)
