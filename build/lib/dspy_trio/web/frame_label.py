"""The ``id`` of a ``/v1/ws`` frame refused before it was parsed (too large, too deep, not JSON).

Such a frame still deserves an error frame carrying its ``id``, so the client knows which of its requests
failed; but a refused frame is never parsed whole, or a hostile one (4 MiB, nested 100,000 deep) would
cost what the limits are there to refuse. :func:`frame_label` therefore reads at most the first
:data:`SCAN_BYTES` bytes, once, left to right, with no recursion and no backtracking, and takes the value
of the first ``"id"`` key *of the top-level object*: keys of nested objects and text inside strings
(``"\\"id\\": \\"x\\""``) do not count, escapes are decoded as JSON decodes them (``"\\u0069d"`` is
``id``). An id that starts or ends past the window, or that is not a string of 1 to 128 characters, is
not found (the error frame then has ``"id": null``): clients should send ``id`` first.
"""

from __future__ import annotations

import json

SCAN_BYTES = 4096
MAX_LABEL = 128

_QUOTE, _BACKSLASH = 0x22, 0x5C
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_SPACE = frozenset(b" \t\r\n")


def _string_end(data: bytes, start: int) -> int:
    """The index just past the string whose opening quote is at ``start``, or -1 if it does not end."""
    index = start + 1
    while True:
        index = data.find(b'"', index)
        if index < 0:
            return -1
        backslashes = 0
        while data[index - 1 - backslashes] == _BACKSLASH:
            backslashes += 1
        if backslashes % 2 == 0:
            return index + 1
        index += 1


def _decode(token: bytes) -> str | None:
    try:
        text = json.loads(token)
    except ValueError:
        return None
    return text if isinstance(text, str) else None


def frame_label(raw: bytes | str | None) -> str | None:
    """The top-level ``"id"`` of a JSON object frame, from its first :data:`SCAN_BYTES` bytes only."""
    if not raw:
        return None
    head = raw[:SCAN_BYTES]
    data = head.encode("utf-8", "surrogatepass")[:SCAN_BYTES] if isinstance(head, str) else bytes(head)
    index, end = 0, len(data)
    while index < end and data[index] in _SPACE:
        index += 1
    if index == end or data[index] != ord("{"):
        return None
    depth = 0
    expect_key = False  # at depth 1: the next string is a key
    key: str | None = None  # at depth 1: the key whose value comes next
    while index < end:
        byte = data[index]
        if byte == _QUOTE:
            stop = _string_end(data, index)
            if stop < 0:
                return None  # the string runs past the window
            if depth == 1 and expect_key:
                key, expect_key = _decode(data[index:stop]), False
            elif depth == 1 and key == "id":
                label = _decode(data[index:stop])
                return label if label is not None and 0 < len(label) <= MAX_LABEL else None
            index = stop
            continue
        if byte in _OPEN:
            if depth == 1 and key == "id":
                return None  # the id is not a string
            depth += 1
            expect_key = depth == 1 and byte == ord("{")
        elif byte in _CLOSE:
            depth -= 1
            if depth <= 0:
                return None  # the top-level object ended without an id
        elif depth == 1 and byte == ord(","):
            expect_key, key = True, None
        elif depth == 1 and key == "id" and byte not in _SPACE and byte != ord(":"):
            return None  # a number, true, false or null: not a label
        index += 1
    return None


__all__ = ["SCAN_BYTES", "frame_label"]
