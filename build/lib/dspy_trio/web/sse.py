"""Server-Sent Events responses that run an engine stream for exactly the life of the response.

Quart sends a streamed body by entering it (``async with body``), iterating it, and exiting it, all in the
request's task. :class:`EventBody` opens a nursery in ``__aenter__`` (closed in ``__aexit__``, in that
same task) with one pump task that enters the engine's stream *inside the request's deadline scope* and
forwards its events through an unbuffered channel; ``__anext__`` hands out one encoded event at a time.
No async generator ever holds a nursery or cancel scope across a ``yield``.

So the engine can tell the endings apart: the request's deadline is the pump's cancel scope (the engine
sees it as ``trio.current_effective_deadline()``; when it passes, the response ends with an error event,
``deadline_exceeded``, not a cut connection); a client that disconnects cancels the request task, and so
the pump, before the deadline; a cancel by id comes from the engine itself. Keep-alive comments are sent
after ``keepalive`` seconds of quiet.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import trio
from quart.wrappers.response import ResponseBody

from dspy_trio.engine import (
    BatchItem,
    EngineError,
    ErrorEvent,
    FinalEvent,
    RequestCancelledError,
    StreamEvent,
)

from .deadline import RequestDeadline
from .encoding import SSE_DONE, SSE_KEEPALIVE, batch_item_json, dumps, event_json, sse

Encoder = Callable[[StreamEvent], bytes | None]


def general_encoder(event: StreamEvent) -> bytes:
    """``event: status|delta|final|error`` with a JSON payload."""
    name, payload = event_json(event)
    return sse(dumps(payload), event=name)


def seed_encoder() -> Encoder:
    """The seed's format: ``data: <token>`` per delta, then ``data: [DONE]`` (after an ``error`` event
    when the stream failed). When the answer came without any delta (a backend that does not stream),
    the final answer is sent as one ``data:`` event before ``[DONE]``, so it is never lost."""
    sent_delta = False

    def encode(event: StreamEvent) -> bytes | None:
        nonlocal sent_delta
        name, payload = event_json(event)
        if name == "delta":
            sent_delta = True
            return sse(str(payload["text"]))
        if name == "final":
            answer = seed_answer(payload["outputs"])
            return SSE_DONE if sent_delta or answer is None else sse(str(answer)) + SSE_DONE
        if name == "error":
            return sse(dumps(payload), event="error") + SSE_DONE
        return None

    return encode


def seed_answer(outputs: Mapping[str, Any]) -> Any:
    """The seed's answer among a program's outputs: ``answer``, else the first output."""
    return outputs["answer"] if "answer" in outputs else next(iter(outputs.values()), None)


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


class EventBody(ResponseBody):
    """A streamed response body fed by a source that lives in an async context manager.

    ``__aenter__`` opens a nursery (in the request's task) and starts one pump task that enters the
    source *inside the request's deadline scope* and forwards its items through an unbuffered channel;
    ``__anext__`` takes them one at a time, sending a keep-alive comment after ``keepalive`` seconds of
    quiet; ``__aexit__`` closes the nursery. So:

    - the engine sees the request's deadline as ``trio.current_effective_deadline()``: a deadline that
      fires is the request's deadline (the pump then sends ``timeout_event`` as the last item);
    - a client that disconnects cancels the request task, which cancels the pump before the deadline:
      the engine tells that apart as the caller leaving;
    - no async generator holds a nursery or cancel scope across a ``yield``.

    Args:
        open_source: Opens the source (e.g. ``engine.stream(...)``), an async iterable of items.
        deadline: The request's deadline.
        keepalive: Seconds of quiet after which a keep-alive comment is sent.
        encode: Turns an item into bytes, or None to send nothing for it.
        is_last: Whether an item ends the response (sent, then nothing more).
        finish: The items to send last: given None when the source was exhausted, the deadline's
            error when it passed, or the engine error raised when opening the source.
    """

    def __init__(
        self,
        open_source: Callable[[], AbstractAsyncContextManager[Any]],
        *,
        deadline: RequestDeadline,
        keepalive: float,
        encode: Callable[[Any], bytes | None],
        is_last: Callable[[Any], bool],
        finish: Callable[[EngineError | None], Sequence[Any]],
    ) -> None:
        self._open_source = open_source
        self._deadline = deadline
        self._keepalive = keepalive
        self._encode = encode
        self._is_last = is_last
        self._finish = finish
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
                reason: EngineError | None = None
                with self._deadline.scope() as scope:
                    try:
                        async with self._open_source() as source:
                            async for item in source:
                                await send.send(item)
                                if self._is_last(item):
                                    return
                    except EngineError as exc:
                        reason = exc  # raced past the handler's precheck (e.g. the queue filled)
                if scope.cancelled_caught:
                    reason = self._deadline.error()
                for item in self._finish(reason):
                    await send.send(item)

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
                return SSE_KEEPALIVE
            if (encoded := self._encode(item)) is not None:
                return encoded


def stream_body(
    open_stream: Callable[[], AbstractAsyncContextManager[Any]],
    *,
    deadline: RequestDeadline,
    keepalive: float,
    encode: Encoder,
) -> EventBody:
    """The body of an SSE response that streams one program run (``open_stream`` enters
    ``engine.stream``); it ends with the final event or one error event."""
    return EventBody(
        open_stream,
        deadline=deadline,
        keepalive=keepalive,
        encode=encode,
        is_last=lambda event: isinstance(event, FinalEvent | ErrorEvent),
        finish=lambda reason: [ErrorEvent(reason)] if reason is not None else [],
    )


class _BatchItems:
    """A batch's outcomes as ``("item", json)`` pairs, remembering which indexes got one."""

    def __init__(self, outcomes: trio.MemoryReceiveChannel[BatchItem]) -> None:
        self._outcomes = outcomes
        self.seen: set[int] = set()

    def __aiter__(self) -> _BatchItems:
        return self

    async def __anext__(self) -> tuple[str, dict[str, Any]]:
        try:
            item = await self._outcomes.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self.seen.add(item.index)
        return "item", batch_item_json(item)


def missing_outcomes(count: int, seen: set[int], reason: EngineError | None) -> list[BatchItem]:
    """The outcomes of the items that never got one: ``reason`` (the deadline), else ``cancelled``
    (never started because ``fail_fast`` stopped the batch)."""
    error = reason or RequestCancelledError("not started: another item failed")
    return [BatchItem(index, error=error) for index in range(count) if index not in seen]


def batch_body(
    open_batch: Callable[[], AbstractAsyncContextManager[trio.MemoryReceiveChannel[BatchItem]]],
    *,
    count: int,
    deadline: RequestDeadline,
    keepalive: float,
    ndjson: bool,
) -> EventBody:
    """The body of an as-completed batch: ``event: item`` per outcome then ``event: done`` over SSE, or
    one JSON line per outcome then ``{"done": true}`` as NDJSON. Every one of the ``count`` items gets
    exactly one outcome, also those never started (fail-fast, deadline)."""

    def encode(value: tuple[str, dict[str, Any]]) -> bytes:
        name, payload = value
        if ndjson:
            return (dumps(payload if name == "item" else {name: True, **payload}) + "\n").encode()
        return sse(dumps(payload), event=name)

    sources: list[_BatchItems] = []

    @asynccontextmanager
    async def source() -> AsyncIterator[_BatchItems]:
        async with open_batch() as outcomes:
            sources.append(_BatchItems(outcomes))
            yield sources[0]

    def finish(reason: EngineError | None) -> list[tuple[str, dict[str, Any]]]:
        seen = sources[0].seen if sources else set()
        rest = [("item", batch_item_json(item)) for item in missing_outcomes(count, seen, reason)]
        return [*rest, ("done", {"count": count})]

    return EventBody(
        source, deadline=deadline, keepalive=keepalive, encode=encode, is_last=lambda _: False, finish=finish
    )


__all__ = [
    "SSE_HEADERS",
    "EventBody",
    "batch_body",
    "general_encoder",
    "missing_outcomes",
    "seed_answer",
    "seed_encoder",
    "stream_body",
]
