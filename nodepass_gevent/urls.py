"""Splitting URLs and query strings the same way on every Python from 3.6 on.

urllib.parse changed under security fixes between 3.6 and 3.13: newer
releases drop tabs and newlines anywhere, strip leading spaces, reject IPv4
and other non-IPv6 hosts in brackets, and split queries on '&' only (older
ones on ';' too). The tunnel URL and the wire signals must read the same on
every interpreter, so the splitting is done here, by the rules urlsplit and
parse_qsl have in common, and all checking is left to the callers.
"""

from typing import List, NamedTuple, Tuple
from urllib.parse import unquote


class UrlParts(NamedTuple):
    """``scheme://netloc/path?query#fragment``; path keeps its leading '/'."""

    scheme: str
    netloc: str
    path: str
    query: str
    fragment: str


def split_url(text: str) -> UrlParts:
    """Split like urlsplit: netloc ends at the first '/', '?' or '#'.

    ValueError for an unbalanced bracket in the netloc, as every urlsplit.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme = ""
        rest = text[2:] if text.startswith("//") else None
    if rest is None:
        netloc, rest = "", text
    else:
        end = min([rest.index(mark) for mark in "/?#" if mark in rest] or [len(rest)])
        netloc, rest = rest[:end], rest[end:]
        if ("[" in netloc) != ("]" in netloc):
            raise ValueError("Invalid IPv6 URL")
    rest, _, fragment = rest.partition("#")
    path, _, query = rest.partition("?")
    return UrlParts(scheme, netloc, path, query, fragment)


def query_pairs(query: str, keep_blank_values: bool = False) -> List[Tuple[str, str]]:
    """Like parse_qsl (lenient, '&' only, '+' is a space, %XX decoded)."""
    pairs = []
    for piece in query.split("&"):
        if not piece:
            continue
        name, equals, value = piece.partition("=")
        if not value and not keep_blank_values:
            continue
        pairs.append((_unquote_plus(name), _unquote_plus(value)))
    return pairs


def hostname(netloc: str) -> str:
    """The host part of a netloc, lowercased, without user, port or brackets."""
    host = netloc.rpartition("@")[2]
    if "[" in host:
        host = host.partition("[")[2].partition("]")[0]
    else:
        host = host.partition(":")[0]
    return host.lower()


def _unquote_plus(text: str) -> str:
    return unquote(text.replace("+", " "))
