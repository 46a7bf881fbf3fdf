"""`nodepass --man`: the --help text (cli.py's docstring) as a man page in roff.

Made at run time from the very text --help prints, so the two cannot drift
apart. Each "Heading:" line of the help starts a section; the Options become
tagged paragraphs, every other section keeps the help's own line breaks.
Install it with

    nodepass --man > /usr/local/share/man/man1/nodepass.1     (then: man nodepass)
    nodepass --man | man -l -                                   (or read it at once)
"""

import re
from typing import List, Tuple

_HEADING = re.compile(r"([A-Z][A-Za-z ]*):\s*\Z")
_OPTION = re.compile(r"  (-\S.*?)(?:\s{2,}(.*))?\Z")


def render(help_text: str, version: str) -> str:
    """The man page of ``help_text``: its first line is "name: what it is"."""
    summary, sections = _split(help_text)
    name, _, what = summary.partition(": ")
    lines = ['.TH %s 1 "" "nodepass-gevent %s" "User Commands"' % (name.upper(), _escape(version)),
             ".SH NAME", "%s \\- %s" % (_escape(name), _escape(what.rstrip(".")))]
    for heading, body in sections:
        lines.append(".SH " + _escape(heading.upper()))
        lines += _options(body) if heading == "Options" else _verbatim(body)
    return "\n".join(lines) + "\n"


def _split(help_text: str) -> Tuple[str, List[Tuple[str, List[str]]]]:
    lines = help_text.strip("\n").splitlines()
    sections = []  # type: List[Tuple[str, List[str]]]
    for line in lines[1:]:
        heading = _HEADING.match(line)
        if heading:
            sections.append((heading.group(1), []))
        elif sections:
            sections[-1][1].append(line)
    return lines[0], [(heading, _trim(body)) for heading, body in sections]


def _trim(body: List[str]) -> List[str]:
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    return body


def _verbatim(body: List[str]) -> List[str]:
    """The lines as the help shows them (no filling, no hyphenation)."""
    return [".nf"] + [_line(line[2:] if line.startswith("  ") else line) for line in body] + \
        [".fi"]


def _options(body: List[str]) -> List[str]:
    """"  --flag=<x>   Text ..." rows -> .TP paragraphs, continuation lines joined."""
    out = []  # type: List[str]
    for line in body:
        option = _OPTION.match(line) if not line.startswith("    ") else None
        if option:
            out += [".TP", "\\fB%s\\fR" % _escape(option.group(1))]
            if option.group(2):
                out.append(_line(option.group(2)))
        elif line.strip():
            out.append(_line(line.strip()))
    return out


def _line(text: str) -> str:
    text = _escape(text)
    # A line starting with . or ' would be a roff request; an empty one a break.
    return "\\&" + text if text[:1] in (".", "'") or not text else text


def _escape(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-")
