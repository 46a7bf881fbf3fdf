"""JSON exactly as Go's encoding/json writes it, so that our bytes match v1.14's.

    Go json.Marshal(struct)     fields in declaration order, compact, no spaces
    Go json.Encoder(map)        keys sorted, compact, then one "\\n"
    strings                     UTF-8 as is; '<' '>' '&' U+2028 U+2029 as \\u003c
                                \\u003e \\u0026 \\u2028 \\u2029 (Go's HTML-safe
                                default); control characters as \\n \\r \\t \\b \\f
                                or \\u00XX with lowercase hex

Python's json.dumps with compact separators and ensure_ascii=False agrees with
Go on everything but the five HTML-safe escapes, which are added here. The
characters to escape only occur inside strings, so replacing them in the
output is safe.
"""

import json
from typing import Any, Iterable, Tuple

_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
               ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def _go_text(value: Any, sort_keys: bool) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys,
                      allow_nan=False)
    for char, escape in _GO_ESCAPES:
        if char in text:
            text = text.replace(char, escape)
    return text


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a JSON string that is not valid Unicode")


def marshal_fields(fields: Iterable[Tuple[str, Any]]) -> bytes:
    """json.Marshal of a struct: the (name, value) pairs in the order given."""
    parts = ["{}:{}".format(_go_text(name, False), _go_text(value, False))
             for name, value in fields]
    return _utf8("{" + ",".join(parts) + "}")


def encode_map(mapping: dict) -> bytes:
    """json.NewEncoder(w).Encode(map): keys sorted, then a newline."""
    return _utf8(_go_text(mapping, True) + "\n")
