"""v1.14 control lines: one JSON signal, XOR-ed with the key, base64, one "\\n".

    JSON  {"action":"tcp","remote":"127.0.0.1:55990","id":"b1155762"}
            |            |                         |             ("fp":"sha256:..." for verify)
            fields in this order, compact; an empty field is left out
    XOR   byte i ^= key[i % len(key)], from 0 again for every line
    line  base64 standard alphabet, padded  +  "\\n"

    e.g. key e68be2b4, {"action":"ping"}  ->  "HhRZARFbDVpHDBoSDFwFFhg=\\n"

| action   | fields      | sent by                                               |
| -------- | ----------- | ----------------------------------------------------- |
| ping     | -           | both sides, at once and then every 5 s                |
| pong     | -           | the answer to a ping                                  |
| tcp      | remote, id  | the side that accepted a TCP user                     |
| udp      | remote, id  | the side that saw a datagram from a new user address  |
| verify   | id, fp      | both sides at tls 1/2: the fingerprint seen on conn id|
| flush    | -           | a side whose pool errors exceed half its idle conns   |

[contract (e), common.go:Signal, encode, decode, xor, commonQueue]. Go's
reader has no bound on a line and skips (after 50 ms) one it cannot decode or
parse; it ignores unknown actions. Here a line is bounded and every refusal is
a SignalError with a one-line reason, so that the role can log it and go on.
"""

import base64
import binascii
import json
from dataclasses import dataclass
from typing import List, Tuple

from nodepass_gevent.wire.v114 import gojson
from nodepass_gevent.wire.v114.ids import is_id_name
from nodepass_gevent.wire.v114.keys import is_fingerprint

PING, PONG, TCP, UDP, VERIFY, FLUSH = "ping", "pong", "tcp", "udp", "verify", "flush"
ACTIONS = (PING, PONG, TCP, UDP, VERIFY, FLUSH)
FIELDS = ("action", "remote", "id", "fp")  # Go's struct order [common.go:Signal]
NEEDS_ID = (TCP, UDP, VERIFY)
NEEDS_REMOTE = (TCP, UDP)
# The longest line v1.14 writes is a verify (about 190 bytes) or a tcp/udp
# signal naming an IPv6 user with a zone; this leaves room for extensions and
# still bounds what one peer can make us buffer.
MAX_LINE = 4096
MAX_REMOTE = 300
LINE_END = b"\n"


class SignalError(ValueError):
    """A control line that is not a v1.14 signal; the message says why, in one line."""


class UnknownAction(SignalError):
    """A well-formed signal whose action v1.14 does not define (v1.14 ignores these)."""

    def __init__(self, signal: "Signal") -> None:
        super().__init__("unknown action {!r}".format(signal.action))
        self.signal = signal


@dataclass(frozen=True)
class Signal:
    action: str
    remote: str = ""
    id: str = ""
    fp: str = ""


def xor(data: bytes, key: bytes) -> bytes:
    """XOR with the key repeated from its first byte (the same function both ways)."""
    if not key:
        raise ValueError("the tunnel key is empty")
    pad = (key * (len(data) // len(key) + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")


def signal_json(signal: Signal) -> bytes:
    """The JSON v1.14 marshals for a signal: its fields in order, empty ones left out."""
    return gojson.marshal_fields((name, getattr(signal, name)) for name in FIELDS
                                 if name == "action" or getattr(signal, name))


def encode_signal(signal: Signal, key: bytes) -> bytes:
    """The control line for a signal, "\\n" included."""
    return base64.b64encode(xor(signal_json(signal), key)) + LINE_END


def ping() -> Signal:
    return Signal(PING)


def pong() -> Signal:
    return Signal(PONG)


def flush() -> Signal:
    return Signal(FLUSH)


def tcp(remote: str, conn_id: str) -> Signal:
    return Signal(TCP, remote=remote, id=conn_id)


def udp(remote: str, conn_id: str) -> Signal:
    return Signal(UDP, remote=remote, id=conn_id)


def verify(conn_id: str, fingerprint: str) -> Signal:
    return Signal(VERIFY, id=conn_id, fp=fingerprint)


def decode_signal(line: bytes, key: bytes) -> Signal:
    """The signal on one control line (its "\\n" optional).

    SignalError for a line too long, bad base64, bad JSON (a wrong key gives
    that too), a field of the wrong type or shape, or a tcp/udp/verify signal
    without the id it needs; UnknownAction for a valid signal of another action.
    """
    if len(line) > MAX_LINE:
        raise SignalError("control line of {} bytes (at most {})".format(len(line), MAX_LINE))
    if line.endswith(LINE_END):
        line = line[:-1]
    # Go's base64 decoder skips '\r' and '\n'; a '\n' cannot be left here.
    line = line.replace(b"\r", b"")
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SignalError("control line is not base64: {!r}".format(line[:40]))
    if not raw:
        raise SignalError("empty control line")
    try:
        document = json.loads(xor(raw, key).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SignalError("control line is not JSON under our key (a wrong key?)")
    return _signal_from(document)


def _signal_from(document) -> Signal:
    if not isinstance(document, dict):
        raise SignalError("control signal is not a JSON object")
    fields = {}
    # Go's json.Unmarshal matches field names without regard to case, takes
    # the last of duplicates and ignores unknown fields.
    for name, value in document.items():
        folded = _ascii_lower(name)
        if folded in FIELDS and value is not None:
            if not isinstance(value, str):
                raise SignalError("control signal field {!r} is not a string".format(name))
            fields[folded] = value
    signal = Signal(fields.get("action", ""), fields.get("remote", ""), fields.get("id", ""),
                    fields.get("fp", ""))
    _check_shape(signal)
    if signal.action not in ACTIONS:
        raise UnknownAction(signal)
    return signal


def _ascii_lower(name: str) -> str:
    """str.isascii is 3.7+: lower ASCII names only (the field names are ASCII)."""
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        return name
    return name.lower()


def _check_shape(signal: Signal) -> None:
    if signal.id and not is_id_name(signal.id):
        raise SignalError("control signal id {!r} is not 8 lowercase hex".format(signal.id[:40]))
    if signal.fp and not is_fingerprint(signal.fp):
        raise SignalError("control signal fp {!r} is not a sha256 fingerprint"
                          .format(signal.fp[:40]))
    if len(signal.remote) > MAX_REMOTE or not signal.remote.isprintable():
        raise SignalError("control signal remote {!r} is not an address"
                          .format(signal.remote[:40]))
    if signal.action in NEEDS_ID and not signal.id:
        raise SignalError("{} signal without an id".format(signal.action))
    if signal.action in NEEDS_REMOTE and not signal.remote:
        raise SignalError("{} signal without a remote address".format(signal.action))


def split_lines(buffer: bytes) -> Tuple[List[bytes], bytes]:
    """The complete lines in what was read so far, and the rest to keep.

    A read may hold several lines or part of one (fwd-tls0.txt has a ping and
    a pong in one segment). SignalError if the rest is already too long to be
    a line: a peer that never sends "\\n" must not fill our memory.
    """
    lines = buffer.split(LINE_END)
    rest = lines.pop()
    if len(rest) >= MAX_LINE:
        raise SignalError("control line longer than {} bytes".format(MAX_LINE))
    return [line + LINE_END for line in lines], rest
