"""Input limits shared by every transport: body / frame size, JSON nesting, input text, valid Unicode.

HTTP bodies and WebSocket frames go through the same :func:`parse_json` and :func:`check_inputs`, so
the limits cannot drift between transports. Nesting is measured on the raw text *before* parsing (a
linear scan, no recursion), so ``"[" * 100_000`` costs a scan and one 400, never a RecursionError; input
sizes are measured with an explicit stack for the same reason. The scan is mostly C: text inside strings
costs about 2 ms a MiB, brackets about 70 ms a MiB, and a deep body stops it at the limit.

JSON bodies and frames are UTF-8 (RFC 8259 section 8.1), and only UTF-8 is parsed: the scan reads the
bytes as ASCII-compatible text, which UTF-16 and UTF-32 are not (their escaped quote ``5c 00 22 00`` is
seen as a real one, so brackets after it would escape the count). ``json.loads`` on bytes would have
decoded those too, past the nesting limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import HTTPError

_OPENERS = frozenset(b"[{")
# Every byte but quotes and brackets: what json_depth drops, in C, before its loop.
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'"[]{}')


def json_depth(raw: bytes, limit: int | None = None) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped), without recursion.

    Escaped backslashes and quotes, every byte but quotes and brackets, and then the text inside strings
    are dropped at C speed first, so text costs almost nothing and the Python loop sees only the brackets
    outside strings. With ``limit``, it stops as soon as the nesting is deeper than that (and returns
    that depth, ``limit + 1``).
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.translate(None, _NOT_STRUCTURE).split(b'"')[::2])
    depth = deepest = 0
    for byte in outside_strings:
        if byte in _OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
                if limit is not None and deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def parse_json(raw: bytes | str, *, max_bytes: int, max_depth: int, what: str = "body") -> Any:
    """Parse a JSON body or frame within the limits.

    Args:
        raw: The body or frame.
        max_bytes, max_depth: The limits.
        what: How messages name it (``"body"``, ``"frame"``).

    Raises:
        HTTPError: 413 ``body_too_large`` over ``max_bytes``; 400 ``too_deeply_nested`` over
            ``max_depth``; 400 ``bad_request`` when it is empty, not UTF-8 or not JSON, the message
            saying where (line, column) and what is wrong.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise HTTPError(
            413,
            f"the {what} is larger than {max_bytes} bytes",
            type="invalid_request_error",
            code="body_too_large",
        )
    if json_depth(data, max_depth) > max_depth:
        raise HTTPError(
            400,
            f"the JSON is nested deeper than {max_depth} levels",
            type="invalid_request_error",
            code="too_deeply_nested",
        )
    try:
        # UTF-8 only (see the module's docstring); a UTF-8 BOM is ignored, as json.loads ignores it. Lone
        # surrogates pass here, as json.loads lets them, for check_inputs to refuse with a 422.
        return json.loads(data.decode("utf-8", "surrogatepass").removeprefix("\ufeff"))
    except (ValueError, RecursionError) as exc:
        raise HTTPError(
            400, _why_not_json(data, exc, what), type="invalid_request_error", code="bad_request"
        ) from exc


def _why_not_json(data: bytes, error: Exception, what: str) -> str:
    if not data.strip():
        return f"the {what} is empty: send a JSON object"
    if isinstance(error, UnicodeDecodeError):
        return f"the {what} is not UTF-8: byte {data[error.start]:#04x} at position {error.start}"
    if b"\0" in data:  # never in UTF-8 JSON (not even inside a string), always in UTF-16 and UTF-32
        return f"the {what} is not UTF-8 JSON: it holds NUL bytes (UTF-16 or UTF-32?)"
    if isinstance(error, json.JSONDecodeError):
        return f"the {what} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
    return f"the {what} cannot be read as JSON: {error}"  # e.g. an integer of more than 4,300 digits


def check_inputs(inputs: Mapping[str, Any] | list[Any], *, max_chars: int) -> None:
    """Check the text of program inputs: at most ``max_chars`` in total, and valid Unicode.

    Raises:
        HTTPError: 413 ``input_too_large``; 422 ``invalid_unicode`` for a lone surrogate (``"\\ud800"``),
            which no LM can take.
    """
    total = 0
    stack: list[Any] = [inputs]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
            _check_unicode(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                stack.append(key)
                stack.append(item)
        elif isinstance(value, list | tuple):
            stack.extend(value)
        if total > max_chars:
            raise HTTPError(
                413,
                f"inputs are longer than {max_chars} characters",
                type="invalid_request_error",
                code="input_too_large",
            )


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPError(
            422,
            f"inputs hold an invalid Unicode character (a lone surrogate at position {exc.start})",
            type="invalid_request_error",
            code="invalid_unicode",
        ) from exc


__all__ = ["check_inputs", "json_depth", "parse_json"]


def check_content_encoding(value: str | None) -> None:
    """Refuse a body sent with a ``Content-Encoding`` (gzip, deflate, ...): the service reads bodies as
    sent, and its size limits count what arrives, so it decodes none (a compressed body would be read as
    its compressed bytes, and a body declared compressed but sent plain accepted as it is).

    Raises:
        HTTPError: 415 ``unsupported_content_encoding`` naming the encoding.
    """
    if value is None:
        return
    encoding = value.strip().lower()
    if encoding and encoding != "identity":
        raise HTTPError(
            415,
            f"the body's Content-Encoding {value.strip()[:40]!r} is not supported: send it uncompressed",
            type="invalid_request_error",
            code="unsupported_content_encoding",
        )
