"""The one JSON loader for data we did not just write: sample members, sidecars, COCO files.

Python's ``json`` has two failure modes that are not ``JSONDecodeError``: a document nested thousands
deep raises ``RecursionError`` (and, below that, one a few hundred deep still makes our own recursive
code and ``json.dumps`` recurse that deep), and an integer of more than 4300 digits raises a bare
``ValueError`` from ``int()`` (``sys.get_int_max_str_digits``). A reader that counts bad JSON and goes
on would die on either. ``loads`` bounds both: deeper than ``MAX_DEPTH`` or an integer longer than
``MAX_INT_DIGITS`` digits is a ``JSONLimitError``, a ``json.JSONDecodeError``, so every handler of bad
JSON handles it too. Everything else is ``json.loads`` (``NaN`` included: the sample records use it).

Our files are shallow (a sample record is 5 levels deep, a COCO file 5, a stats file 2) and hold small
integers (sizes, ids, counts), so the limits never refuse a file our writers or COCO tools write.
Stdlib only: ``shards.schema`` imports it and stays light.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # nesting levels of arrays and objects
MAX_INT_DIGITS = 64  # digits of one integer literal


class JSONLimitError(json.JSONDecodeError):
    """JSON that is valid but beyond what we read: nested too deep, or an integer too long."""

    def __init__(self, msg: str):
        # json.JSONDecodeError's own __init__ needs a str document to count lines; the limits have no
        # useful position, and the message is all a caller shows.
        ValueError.__init__(self, msg)
        self.msg, self.doc, self.pos, self.lineno, self.colno = msg, "", 0, 1, 1


class _LongInt(Exception):
    def __init__(self, digits: int):
        self.digits = digits


def _int_parser(max_digits: int):
    def parse(text: str) -> int:
        digits = len(text) - text.startswith("-")
        if digits > max_digits:
            raise _LongInt(digits)  # before int(): converting is quadratic in the digits
        return int(text)

    return parse


def _depth_above(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects more than ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH, max_int_digits: int = MAX_INT_DIGITS) -> Any:
    """``json.loads`` with nesting and integer length bounded (``JSONLimitError`` beyond them).

    Raises ``json.JSONDecodeError`` (the limit error is one) for bad JSON and ``UnicodeDecodeError``
    for bytes that are not UTF-8/16/32, as ``json.loads`` does.
    """
    try:
        value = json.loads(data, parse_int=_int_parser(max_int_digits))
    except _LongInt as e:
        raise JSONLimitError(f"an integer of {e.digits} digits (more than {max_int_digits})") from None
    except RecursionError:
        raise JSONLimitError(f"nested deeper than {max_depth} levels") from None
    # Counting brackets is cheap and bounds the depth from above: most documents skip the walk.
    opened = data.count("[" if isinstance(data, str) else b"[") + data.count("{" if isinstance(data, str) else b"{")
    if opened > max_depth and _depth_above(value, max_depth):
        raise JSONLimitError(f"nested deeper than {max_depth} levels")
    return value
