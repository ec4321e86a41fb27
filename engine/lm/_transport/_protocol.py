"""The two calls an HTTP backend makes, whichever transport serves them (lean, or httpx shards)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ..._errors import InvalidInputError
from .._redact import Redactor


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

    async def post_sse(
        self, model: str, path: str, body: dict[str, Any], on_event: Callable[[str, str], Awaitable[None]]
    ) -> None: ...

    async def reap_forever(
        self, interval: float | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Close kept-alive connections the server closed, every ``interval`` seconds, until cancelled."""
        ...

    async def aclose(self) -> None: ...
