"""The two calls an HTTP backend makes, whichever transport serves them (lean, or httpx shards)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ..._errors import InvalidInputError
from .._redact import Redactor

# An SSE consumer (``on_event``) returns True for the event that ends the stream by the provider's own
# protocol (``[DONE]``, ``message_stop``): the answer is complete. The rest of the body, normally only
# its framing's end, is then read (and dropped) for at most this many seconds, so that the connection
# can carry another request; an upstream that keeps the body open longer loses the connection, never
# the answer (nor does a failure of the connection after that event fail the call).
STREAM_END_GRACE = 0.5

EventHandler = Callable[[str, str], Awaitable[bool | None]]


def encode_body(model: str, body: dict[str, Any]) -> bytes:
    """``body`` as compact JSON, as every transport sends it.

    Raises:
        InvalidInputError: a request parameter JSON cannot carry (NaN, an infinity, an object that is
            not JSON): nothing was sent, and no retry could help.
    """
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{model}: a request parameter cannot be sent as JSON: {exc}") from exc


class JSONResponse(Protocol):
    """What ``post_json`` returns: a complete, successful response (its body decoded, within the cap);
    the backends parse ``content`` with ``_answers.parse_json``."""

    @property
    def status_code(self) -> int: ...

    @property
    def content(self) -> bytes: ...


class HTTPClient(Protocol):
    """POSTs to one API root; implemented by :class:`~._client.LeanClient` and by
    :class:`~._httpx.ClientShards` (httpx). ``redact`` removes the credentials they send from text bound
    for the log."""

    redact: Redactor

    async def post_json(self, model: str, path: str, body: dict[str, Any]) -> JSONResponse: ...

    async def post_sse(self, model: str, path: str, body: dict[str, Any], on_event: EventHandler) -> None:
        """Hand each event to ``on_event`` until the body ends, or until ``on_event`` returns True (the
        stream's own end; see :data:`STREAM_END_GRACE`)."""
        ...

    async def reap_forever(
        self, interval: float | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Close kept-alive connections the server closed, every ``interval`` seconds, until cancelled."""
        ...

    async def aclose(self) -> None: ...
