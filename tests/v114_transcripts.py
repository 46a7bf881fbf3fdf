"""Read the v1.14 captures in the shared folder (wire-v114/transcripts/) into bytes.

A relay dump (tls0.txt, fwd-tls0.txt) is one line per event, then hex rows:

       0.853 #1 C>S len=173                   time, connection, direction, length
        0000  474554202f20...  GET / HTTP/1.1  offset, up to 32 bytes in hex, ASCII
       0.854 #1 S>C EOF                       also OPEN client=..., CLOSED

A curl file (badkey.curl.txt) is "== <case>" lines, each followed by the raw
reply bytes, CRLFs kept. The captures stay in the shared folder, not in the
repository: tests that need them skip when it is absent.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSCRIPTS = os.environ.get(
    "NODEPASS_V114_TRANSCRIPTS",
    os.path.join(os.path.dirname(ROOT), "shared", "wire-v114", "transcripts"))
CLIENT_TO_SERVER, SERVER_TO_CLIENT = "C>S", "S>C"

_EVENT = re.compile(r"^\s*(\d+\.\d+) #(\d+) (C>S|S>C) (?:len=(\d+)|EOF)\s*$")
_OPEN = re.compile(r"^\s*(\d+\.\d+) #(\d+) (OPEN|CLOSED)\b")
_HEX_ROW = re.compile(r"^\s{4}([0-9a-f]{4})  ([0-9a-f]+)(?:  |$)")
_RELAY = re.compile(r"^\s*\d+\.\d+ relay ")


@dataclass
class Segment:
    """One read the relay passed on: ``data`` as it crossed, in one piece."""

    time: float
    conn: int
    direction: str
    data: bytes


@dataclass
class Connection:
    number: int
    segments: List[Segment] = field(default_factory=list)
    eof: Dict[str, bool] = field(default_factory=dict)

    def stream(self, direction: str) -> bytes:
        return b"".join(s.data for s in self.segments if s.direction == direction)


@dataclass
class Transcript:
    name: str
    segments: List[Segment]
    connections: Dict[int, Connection]

    def control(self) -> Optional[Connection]:
        """The connection whose first server bytes are the id 00000000."""
        for conn in self.connections.values():
            if conn.stream(SERVER_TO_CLIENT)[:4] == b"\x00\x00\x00\x00":
                return conn
        return None


def path(name: str) -> str:
    return os.path.join(TRANSCRIPTS, name)


def available(name: str) -> bool:
    return os.path.isfile(path(name))


def read_relay_dump(name: str) -> Transcript:
    """Parse a relay dump; ValueError if a row is out of place or a length is off."""
    segments: List[Segment] = []
    connections: Dict[int, Connection] = {}
    current: Optional[Segment] = None
    expected = 0
    with open(path(name), encoding="utf-8") as dump:
        for number, line in enumerate(dump, 1):
            line = line.rstrip("\n")
            row = _HEX_ROW.match(line)
            if row:
                if current is None or int(row.group(1), 16) != len(current.data):
                    raise ValueError("{}:{}: hex row out of place".format(name, number))
                current.data += bytes.fromhex(row.group(2))
                continue
            _finish(current, expected, name)
            current = None
            event, opened = _EVENT.match(line), _OPEN.match(line)
            if event:
                conn = connections.setdefault(int(event.group(2)), Connection(int(event.group(2))))
                if event.group(4) is None:
                    conn.eof[event.group(3)] = True
                    continue
                current = Segment(float(event.group(1)), conn.number, event.group(3), b"")
                expected = int(event.group(4))
                conn.segments.append(current)
                segments.append(current)
            elif opened:
                connections.setdefault(int(opened.group(2)), Connection(int(opened.group(2))))
            elif line.strip() and not _RELAY.match(line):
                raise ValueError("{}:{}: not a relay dump line: {!r}".format(name, number, line))
    _finish(current, expected, name)
    return Transcript(name, segments, connections)


def _finish(segment: Optional[Segment], expected: int, name: str) -> None:
    if segment is not None and len(segment.data) != expected:
        raise ValueError("{}: segment at {} holds {} bytes, not {}"
                         .format(name, segment.time, len(segment.data), expected))


def read_curl_replies(name: str) -> Dict[str, bytes]:
    """{case: raw reply bytes} from a file of "== case" sections."""
    with open(path(name), "rb") as replies:
        text = replies.read()
    cases: Dict[str, bytes] = {}
    for section in re.split(rb"(?m)^== ", text)[1:]:
        title, _, body = section.partition(b"\n")
        cases[title.decode("utf-8").strip()] = body
    return cases


def read_decoded(name: str) -> List[tuple]:
    """[(time, conn, direction, base64 line, JSON)] from a *.decoded.txt file."""
    rows = []
    with open(path(name), encoding="utf-8") as decoded:
        for line in decoded:
            match = re.match(r"^(\d+\.\d+) #(\d+) (C>S|S>C) (\S+) -> (.*)$", line.rstrip("\n"))
            if match:
                rows.append((float(match.group(1)), int(match.group(2)), match.group(3),
                             match.group(4), match.group(5)))
    return rows
