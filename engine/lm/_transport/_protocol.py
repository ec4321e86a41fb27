"""The two calls an HTTP backend makes, whichever transport serves them (lean, or httpx shards)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio


class JSONResponse(Protocol):
    """What ``post_json`` returns: a complete response with a JSON body."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class HTTPClient(Protocol):
    """POSTs to one API root; implemented by :class:`~engine.lm._transport.LeanClient` and by
    :class:`~engine.lm._http_pool.ClientShards` (httpx)."""

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
