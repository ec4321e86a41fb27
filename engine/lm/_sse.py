"""A Server-Sent Events parser fed line by line (sync, so no async generator is left half-consumed)."""

from __future__ import annotations

import json
from typing import Any

from .._errors import UpstreamResponseError


def json_object(model: str, data: str) -> dict[str, Any]:
    """The JSON object an event's data holds.

    Raises:
        UpstreamResponseError: when the data is not JSON, or not an object.
    """
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise UpstreamResponseError(f"{model}: malformed stream event: {data[:200]!r}", model=model) from exc
    if not isinstance(payload, dict):
        raise UpstreamResponseError(f"{model}: stream event is not an object", model=model)
    return payload


class SSEParser:
    """Turns SSE lines into ``(event, data)`` pairs; ``event`` is ``"message"`` unless the stream named it.

    Comments (``:`` lines) and ``id:``/``retry:`` fields are ignored; multi-line data is joined with ``\\n``.
    """

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """Consume one line (without its newline); return an event when a blank line completes one."""
        if not line:
            if not self._data:
                self._event = "message"
                return None
            event, data = self._event, "\n".join(self._data)
            self._event, self._data = "message", []
            return event, data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None
