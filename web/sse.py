"""Streamed response bodies (SSE, NDJSON) that run a call for exactly the life of the response.

Quart sends a streamed body by entering it (``async with body``), iterating it, and exiting it, all in the
request's task. :class:`EventBody` opens a nursery in ``__aenter__`` (closed in ``__aexit__``, in that
same task) with one pump task that runs the call (``produce``: :func:`dspy_trio.web.runner.run` or
``run_batch``) and forwards what it emits through an unbuffered channel; ``__anext__`` hands out one
encoded item at a time. No async generator ever holds a nursery or cancel scope across a ``yield``.

So the engine can tell the endings apart: the request's deadline is the runner's cancel scope (when it
passes, the response ends with an error event, ``deadline_exceeded``, not a cut connection); a client that
disconnects cancels the request task, and so the pump, before the deadline; a cancel by id comes from the
engine itself. After ``keepalive`` seconds of quiet a keep-alive goes out (an SSE comment; a blank line in
NDJSON).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import trio
from quart.wrappers.response import ResponseBody

from .encoding import SSE_KEEPALIVE

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}

Produce = Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]


class EventBody(ResponseBody):
    """A streamed response body fed by a producer running in a task of the body's own nursery.

    ``__aenter__`` opens a nursery (in the request's task) and starts one pump task that runs
    ``produce(emit)``, whose ``emit`` sends each item through an unbuffered channel; ``__anext__`` takes
    them one at a time, sending a keep-alive comment after ``keepalive`` seconds of quiet; ``__aexit__``
    closes the nursery, cancelling the producer if the consumer left early.

    Args:
        produce: Runs the call, emitting its items (it owns the deadline: :mod:`dspy_trio.web.runner`).
        keepalive: Seconds of quiet after which ``idle`` is sent.
        encode: Turns an item into bytes, or None to send nothing for it.
        idle: What keeps a quiet response open: an SSE comment, or a blank line (NDJSON, whose every
            other line is JSON).
    """

    def __init__(
        self,
        produce: Produce,
        *,
        keepalive: float,
        encode: Callable[[Any], bytes | None],
        idle: bytes = SSE_KEEPALIVE,
    ) -> None:
        self._produce = produce
        self._keepalive = keepalive
        self._encode = encode
        self._idle = idle
        self._stack = AsyncExitStack()
        self._items: trio.MemoryReceiveChannel[Any] | None = None

    async def __aenter__(self) -> EventBody:
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        send, self._items = trio.open_memory_channel[Any](0)
        nursery.start_soon(self._pump, send)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._items is not None:
            self._items.close()  # a consumer that left early: the pump's next send ends it
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _pump(self, send: trio.MemorySendChannel[Any]) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with send:
                await self._produce(send.send)

    def __aiter__(self) -> EventBody:
        return self

    async def __anext__(self) -> bytes:
        assert self._items is not None, "enter the body first"
        while True:
            with trio.move_on_after(self._keepalive) as quiet:
                try:
                    item = await self._items.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise StopAsyncIteration from None
            if quiet.cancelled_caught:
                return self._idle
            if (encoded := self._encode(item)) is not None:
                return encoded


__all__ = ["SSE_HEADERS", "EventBody", "Produce"]
