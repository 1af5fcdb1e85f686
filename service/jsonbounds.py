"""JSON request bodies parsed within bounds: bytes, nesting depth and value count are checked on the
raw bytes, in C-speed passes, before ``json.loads`` builds a single Python object.

Python's parser recurses once per nesting level (a body of 5000 ``[`` raised RecursionError, an
HTTP 500) and materialises every value before a caller can look at the count (a 2,000,000-element
list took seconds of event-loop time before the 413). Here:
- depth: the brackets outside strings are counted by numpy over the body (escapes removed first,
  then quote parity says what is inside a string); a body with few brackets skips even that;
- values: every JSON value after the first in a container follows a comma, so commas + 1 bounds the
  values of any one container and of the whole document (commas inside strings only over-count);
- a number too long for ``int`` (Python refuses over 4300 digits) and every other decoding error
  is a 400, never a 500.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.errors import Refused

MAX_DEPTH = 16  # an OIP request nests 3 levels plus the tensor's rank; a repository request 3
_OPEN_LIST, _OPEN_OBJ, _CLOSE_LIST, _CLOSE_OBJ, _QUOTE = b"[{]}\""


def loads(body: bytes | memoryview, what: str, max_values: int, max_depth: int = MAX_DEPTH) -> Any:
    """``body`` as JSON, or a Refused: 413 over ``max_values`` values, 400 nested deeper than
    ``max_depth`` or not JSON. ``what`` names the document in messages ("the inference request")."""
    body = bytes(body)
    values = body.count(b",") + 1
    if values > max_values:
        raise too_many_values(what, max_values, values)
    depth = nesting(body, max_depth)
    if depth > max_depth:
        raise Refused(f"{what} nests JSON arrays and objects {depth} levels deep; at most {max_depth}", 400,
                      "too_deep")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise Refused(f"{what} is not valid JSON: {_first_line(e)}", 400, "bad_json") from None


def too_many_values(what: str, most: int, seen: int) -> Refused:
    return Refused(f"{what} holds more than {most} JSON values (about {seen}); send fewer images per request, "
                   "or the images as binary data", 413, "too_many_values")


def nesting(body: bytes, enough: int) -> int:
    """How deep the arrays and objects of ``body`` nest (brackets inside strings do not count);
    any answer over ``enough`` is as good as the exact one, and cheaper."""
    brackets = sum(body.count(c) for c in (b"[", b"{"))
    if brackets <= enough:
        return brackets
    text = np.frombuffer(body.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    opens = (text == _OPEN_LIST) | (text == _OPEN_OBJ)
    closes = (text == _CLOSE_LIST) | (text == _CLOSE_OBJ)
    quotes = text == _QUOTE
    where = np.flatnonzero(opens | closes | quotes)
    in_string = np.cumsum(quotes[where], dtype=np.int64) % 2 == 1  # a quote itself counts as inside; it is no bracket
    step = opens[where].astype(np.int8) - closes[where]
    step[in_string] = 0
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
