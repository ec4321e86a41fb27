"""Incremental per-field text of a streamed JSON object (what ``JSONAdapter`` asks the LM to write).

DSPy 3.4.1's ``StreamListener`` handles ``JSONAdapter`` output by partial re-parsing and string cuts, and
leaks JSON punctuation into the field text (an answer delta of ``"memory flat", "topic": ``; shown in
tests/test_json_fields.py). This scanner is a small state machine over the characters as they arrive:
string values are decoded (escapes included, even when split across chunks) and emitted as clean text;
other values (numbers, booleans, lists, objects) are emitted as their raw JSON text. Anything before the
first ``{`` (a code fence, a preamble) is skipped; a ``{`` after the object ends starts a new one (the
same predictor called again).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class JSONFieldScanner:
    """Feed it chunks of a JSON object's text; get back ``(field, text)`` deltas.

    Args:
        fields: The output fields to report; other keys are parsed and ignored.
    """

    def __init__(self, fields: Collection[str]) -> None:
        self._fields = set(fields)
        self._state = "before"
        self._key: list[str] = []
        self._field: str | None = None
        self._escape: str | None = None  # pending escape text after a backslash
        self._high_surrogate: int | None = None
        self._depth = 0  # nesting inside a non-string value
        self._raw_in_string = False
        self._raw_escape = False
        self._hold: list[str] = []

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Consume ``text``; return the field deltas it completes, in order."""
        out: list[tuple[str, str]] = []
        pending: list[str] = []

        def flush() -> None:
            if pending and self._field in self._fields:
                assert self._field is not None
                if out and out[-1][0] == self._field:
                    out[-1] = (self._field, out[-1][1] + "".join(pending))
                else:
                    out.append((self._field, "".join(pending)))
            pending.clear()

        for char in text:
            state = self._state
            if state in ("before", "done"):
                if char == "{":
                    self._state = "key_wait"
            elif state == "key_wait":
                if char == '"':
                    self._state, self._key = "key", []
                elif char == "}":
                    self._state = "done"
            elif state == "key":
                decoded = self._decode(char)
                if decoded is None:
                    continue
                if decoded == "" and char == '"':
                    self._field, self._state = "".join(self._key), "colon_wait"
                else:
                    self._key.append(decoded)
            elif state == "colon_wait":
                if char == ":":
                    self._state = "value_wait"
            elif state == "value_wait":
                if char == '"':
                    self._state = "string"
                elif not char.isspace():
                    self._state, self._depth, self._raw_in_string = "raw", 0, False
                    self._raw(char, pending, flush)
            elif state == "string":
                decoded = self._decode(char)
                if decoded is None:
                    continue
                if decoded == "" and char == '"':
                    flush()
                    self._state = "key_wait"
                else:
                    pending.append(decoded)
            elif state == "raw":
                self._raw(char, pending, flush)
        flush()
        return out

    def finish(self) -> list[tuple[str, str]]:
        """The stream ended. Everything certain was already emitted by :meth:`feed`."""
        return []

    def _decode(self, char: str) -> str | None:
        """Decode one character of a JSON string. Returns the text it stands for, ``""`` for the closing
        quote, or None while an escape is incomplete."""
        if self._escape is None:
            if char == "\\":
                self._escape = ""
                return None
            return "" if char == '"' else char
        self._escape += char
        if self._escape[0] != "u":
            escape, self._escape = self._escape, None
            return _ESCAPES.get(escape, escape)
        if len(self._escape) < 5:
            return None
        code, self._escape = int(self._escape[1:], 16), None
        if 0xD800 <= code < 0xDC00:
            self._high_surrogate = code
            return None
        if 0xDC00 <= code < 0xE000 and self._high_surrogate is not None:
            code = 0x10000 + ((self._high_surrogate - 0xD800) << 10) + (code - 0xDC00)
        self._high_surrogate = None
        return chr(code)

    def _raw(self, char: str, pending: list[str], flush: Callable[[], None]) -> None:
        """One character of a non-string value: track nesting until the value's end. Whitespace is held
        back until more of the value follows, so a value never ends in whitespace."""
        if self._raw_in_string:
            if self._raw_escape:
                self._raw_escape = False
            elif char == "\\":
                self._raw_escape = True
            elif char == '"':
                self._raw_in_string = False
            pending.append(char)
            return
        if char.isspace():
            self._hold.append(char)
            return
        if char in ",}" and self._depth == 0:
            self._hold.clear()
            flush()
            self._state = "done" if char == "}" else "key_wait"
            return
        pending.extend(self._hold)
        self._hold.clear()
        if char == '"':
            self._raw_in_string = True
        elif char in "[{":
            self._depth += 1
        elif char in "]}":
            self._depth -= 1
        pending.append(char)
