"""The one rule for what the engine takes from an upstream's answer, on every path.

An answer — one JSON body (predict) or the events of a stream — is taken only if it is UTF-8 JSON of
the provider's shape, within the size caps (``HTTPSettings.max_response_bytes`` for the whole answer,
``max_event_bytes`` for one event; ``_transport._body`` and ``_sse`` enforce them while reading). Anything
else fails the call with :class:`~dspy_trio.engine.UpstreamResponseError` (``upstream_bad_response``, not
retried: the same request would bring the same answer): invalid UTF-8 (never replaced by U+FFFD), JSON that
is malformed, nested past the parser's depth or made of too many containers (:data:`MAX_CONTAINERS`),
text with a lone surrogate (``"\ud800"`` is valid JSON but no client can be sent it), HTML or any other
content type where JSON or an event stream belongs, a text field that is not a string, a choice index out
of range. Token counts that are not whole numbers (or that no float holds exactly, past 2**53) are dropped
from the usage. The client reads our words; an excerpt of the answer goes to the log, redacted
(``_http_errors.failure``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .._errors import UpstreamResponseError
from ._http_errors import failure
from ._redact import Redactor

# Parsing costs time and memory per container (a list or an object), not per byte, and json.loads holds
# the event loop (and the GIL: a thread would not help) until it is done: 4 MiB of arrays nested 100
# deep are 2 million lists, ~250 MB and over a second of the loop. So an answer may hold at most
# MAX_CONTAINERS of them, or one per CONTAINER_BYTES of its size if more: logprobs, the most
# container-dense answer providers send, take ~30 bytes each. Brackets are counted anywhere, in strings
# too (a fast count, an upper bound): a text refused for it would hold over 65,536 brackets, one in every
# 16 characters, which no model writes.
MAX_CONTAINERS = 65_536
CONTAINER_BYTES = 16


def parse_json(model: str, data: bytes | str, redact: Redactor, *, what: str = "answer") -> Any:
    """``data`` parsed as UTF-8 JSON.

    Raises:
        UpstreamResponseError: not UTF-8, not JSON, nested too deeply to parse, or made of more
            containers than its size allows (see :data:`MAX_CONTAINERS`).
    """
    if isinstance(data, bytes):
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            detail = data[:2000].decode(errors="replace")
            raise bad(model, f"the upstream's {what} is not UTF-8", detail, redact) from exc
    else:
        text = data
    if len(text) > MAX_CONTAINERS and text.count("[") + text.count("{") > max(
        MAX_CONTAINERS, len(text) // CONTAINER_BYTES
    ):
        raise bad(model, f"the upstream's {what} is made of too many JSON containers", text, redact)
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise bad(model, f"the upstream's {what} is JSON nested too deeply", text, redact) from exc
    except ValueError as exc:
        raise bad(model, f"the upstream's {what} is not valid JSON", text, redact) from exc


def json_object(model: str, data: str, redact: Redactor) -> dict[str, Any]:
    """The JSON object a stream event's data holds.

    Raises:
        UpstreamResponseError: the data is not JSON (see :func:`parse_json`), or not an object.
    """
    payload = parse_json(model, data, redact, what="stream event")
    if not isinstance(payload, dict):
        raise bad(model, "an event of the upstream's stream is not a JSON object", data, redact)
    return payload


def text_or_none(model: str, value: Any, redact: Redactor) -> str | None:
    """A text field of an answer (content, a delta): a string of valid Unicode, or absent.

    Raises:
        UpstreamResponseError: anything else: a number, a list, an object, or a string with a lone
            surrogate (JSON's ``"\ud800"`` parses to one; it cannot be encoded for any client).
    """
    if value is None or (isinstance(value, str) and (value.isascii() or _unicode(value))):
        return value
    if isinstance(value, str):  # a lone surrogate from a JSON escape ("\ud800"): no encoder takes it
        raise bad(model, "the upstream's answer has text that is not valid Unicode", repr(value), redact)
    raise bad(model, "the upstream's answer has a text field that is not a string", repr(value), redact)


def _unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# The largest count taken: every whole number up to it is exactly a float, and the rate limiter and the
# usage tracker compute in floats (JSON's ``1`` followed by 400 zeros is a whole number no float holds).
MAX_COUNT = 2**53


def clean_usage(usage: Any) -> dict[str, Any]:
    """The token counts of a provider's ``usage``: whole numbers from 0 to :data:`MAX_COUNT`, and
    objects of them one level deep (``prompt_tokens_details``); anything else is dropped (the rate
    limiter and the usage tracker add these up, so a string, a negative or a huge count must not reach
    them)."""
    if not isinstance(usage, Mapping):
        return {}
    clean: dict[str, Any] = {}
    for key, value in usage.items():
        if type(value) is int:  # the common case first: an exact int (not a bool)
            if 0 <= value <= MAX_COUNT:
                clean[key] = value
        elif (count := _count(value)) is not None:
            clean[key] = count
        elif isinstance(value, Mapping):
            clean[key] = {k: n for k, v in value.items() if (n := _count(v)) is not None}
    return clean


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_COUNT:
        return None
    return int(value)


def bad(model: str, public: str, detail: str, redact: Redactor) -> UpstreamResponseError:
    """The error of an answer that cannot be taken: ``public`` for clients, ``detail`` logged redacted."""
    error = failure(UpstreamResponseError, model, public, detail, redact)
    assert isinstance(error, UpstreamResponseError)
    return error
