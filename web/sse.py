"""Server-Sent Events responses that run an engine stream for exactly the life of the response.

Quart sends a streamed body by entering it (``async with body``), iterating it, and exiting it, all in the
request's task. :class:`EventBody` enters the engine's stream in ``__aenter__`` and leaves it in
``__aexit__``, and hands out one encoded event per ``__anext__``. So the stream's producer nursery opens
and closes in that one task, and no async generator ever holds a nursery or cancel scope across a
``yield``. A client that disconnects cancels the request task, which leaves the engine stream, which
cancels the producer and closes the upstream connection.

The request's deadline and the keep-alive comments are cancel scopes inside ``__anext__``: when the
deadline passes, the stream ends with an error event (``deadline_exceeded``) instead of a cut connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import trio
from quart.wrappers.response import ResponseBody

from engine import DeadlineExceededError, Engine, EngineError, ErrorEvent, FinalEvent, StreamEvent

from .encoding import SSE_DONE, SSE_KEEPALIVE, batch_item_json, dumps, error_json, event_json, sse

Encoder = Callable[[StreamEvent], bytes | None]


def general_encoder(event: StreamEvent) -> bytes:
    """``event: status|delta|final|error`` with a JSON payload."""
    name, payload = event_json(event)
    return sse(dumps(payload), event=name)


def seed_encoder(event: StreamEvent) -> bytes | None:
    """The seed's format: ``data: <token>`` per delta, then ``data: [DONE]`` (after an ``error`` event
    when the stream failed)."""
    name, payload = event_json(event)
    if name == "delta":
        return sse(str(payload["text"]))
    if name == "final":
        return SSE_DONE
    if name == "error":
        return sse(dumps(payload), event="error") + SSE_DONE
    return None


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


class EventBody(ResponseBody):
    """A streamed response body fed by an async iterator that lives in an async context manager.

    Args:
        open_source: Opens the source (e.g. ``engine.stream(...)``); entered in ``__aenter__`` and left in
            ``__aexit__``, in the request's task.
        deadline: When the response must end (Trio clock); then ``timeout_event`` is sent last.
        keepalive: Seconds of quiet after which a keep-alive comment is sent.
        encode: Turns a source item into bytes, or None to send nothing for it.
        is_last: Whether an item ends the response (sent, then nothing more).
        error_event: The item to send last when opening the source raises an engine error.
        timeout_event: The item to send last when the deadline passes.
        end_event: The item to send after the source is exhausted, if any.
    """

    def __init__(
        self,
        open_source: Callable[[], AbstractAsyncContextManager[Any]],
        *,
        deadline: float,
        keepalive: float,
        encode: Callable[[Any], bytes | None],
        is_last: Callable[[Any], bool],
        error_event: Callable[[EngineError], Any],
        timeout_event: Callable[[], Any],
        end_event: Callable[[], Any] | None = None,
    ) -> None:
        self._open_source = open_source
        self._deadline = deadline
        self._keepalive = keepalive
        self._encode = encode
        self._is_last = is_last
        self._error_event = error_event
        self._timeout_event = timeout_event
        self._end_event = end_event
        self._stack = AsyncExitStack()
        self._source: Any = None
        self._pending: list[bytes] = []
        self._done = False

    async def __aenter__(self) -> EventBody:
        try:
            self._source = await self._stack.enter_async_context(self._open_source())
        except EngineError as exc:
            # Raced past the handler's precheck (e.g. the queue filled meanwhile): still one error event.
            self._finish(self._error_event(exc))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> EventBody:
        return self

    def _finish(self, last: Any) -> None:
        self._done = True
        if last is not None and (encoded := self._encode(last)) is not None:
            self._pending.append(encoded)

    async def __anext__(self) -> bytes:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._done:
                raise StopAsyncIteration
            wake = min(self._deadline, trio.current_time() + self._keepalive)
            with trio.move_on_at(wake) as waited:
                try:
                    item = await self._source.__anext__()
                except StopAsyncIteration:
                    self._finish(self._end_event() if self._end_event else None)
                    continue
            if waited.cancelled_caught:
                if trio.current_time() < self._deadline:
                    return SSE_KEEPALIVE
                self._finish(self._timeout_event())
                continue
            if self._is_last(item):
                self._finish(item)
                continue
            if (encoded := self._encode(item)) is not None:
                return encoded


def stream_body(
    engine: Engine,
    program: str,
    inputs: Mapping[str, Any],
    *,
    request_id: str,
    deadline: float,
    keepalive: float,
    encode: Encoder,
) -> EventBody:
    """The body of an SSE response that streams one program run."""
    return EventBody(
        lambda: engine.stream(program, inputs, request_id=request_id),
        deadline=deadline,
        keepalive=keepalive,
        encode=encode,
        is_last=lambda event: isinstance(event, FinalEvent | ErrorEvent),
        error_event=ErrorEvent,
        timeout_event=lambda: ErrorEvent(DeadlineExceededError("the request ran past its timeout")),
    )


def batch_body(
    open_batch: Callable[[], AbstractAsyncContextManager[Any]],
    *,
    deadline: float,
    keepalive: float,
    ndjson: bool,
) -> EventBody:
    """The body of an as-completed batch: ``event: item`` per outcome then ``event: done`` over SSE, or
    one JSON line per outcome then ``{"done": true}`` as NDJSON. Past the deadline, an error ends it."""

    def encode(value: Any) -> bytes:
        name, payload = value
        if ndjson:
            return (dumps(payload if name == "item" else {name: True, **payload}) + "\n").encode()
        return sse(dumps(payload), event=name)

    class Items:
        def __init__(self, outcomes: Any) -> None:
            self._outcomes = outcomes
            self.count = 0

        def __aiter__(self) -> Items:
            return self

        async def __anext__(self) -> tuple[str, dict[str, Any]]:
            try:
                item = await self._outcomes.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
            self.count += 1
            return "item", batch_item_json(item)

    items: list[Items] = []

    @asynccontextmanager
    async def source() -> AsyncIterator[Items]:
        async with open_batch() as outcomes:
            items.append(Items(outcomes))
            yield items[0]

    return EventBody(
        source,
        deadline=deadline,
        keepalive=keepalive,
        encode=encode,
        is_last=lambda value: False,
        error_event=lambda exc: ("error", error_json(exc)),
        timeout_event=lambda: ("error", error_json(DeadlineExceededError("the batch ran past its timeout"))),
        end_event=lambda: ("done", {"count": items[0].count if items else 0}),
    )


__all__ = [
    "SSE_HEADERS",
    "EventBody",
    "batch_body",
    "error_json",
    "general_encoder",
    "seed_encoder",
    "stream_body",
]
