"""Server-Sent Events responses that run an engine stream for exactly the life of the response.

Quart sends a streamed body by entering it (``async with body``), iterating it, and exiting it, all in the
request's task. :class:`StreamBody` enters the engine's stream in ``__aenter__`` and leaves it in
``__aexit__``, and hands out one encoded event per ``__anext__``. So the stream's producer nursery opens
and closes in that one task, and no async generator ever holds a nursery or cancel scope across a
``yield``. A client that disconnects cancels the request task, which leaves the engine stream, which
cancels the producer and closes the upstream connection.

The request's deadline and the keep-alive comments are cancel scopes inside ``__anext__``: when the
deadline passes, the stream ends with an error event (``deadline_exceeded``) instead of a cut connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import trio
from quart.wrappers.response import ResponseBody

from engine import DeadlineExceededError, Engine, EngineError, ErrorEvent, FinalEvent, StreamEvent

from .encoding import SSE_DONE, SSE_KEEPALIVE, dumps, error_json, event_json, sse

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


class StreamBody(ResponseBody):
    """The body of an SSE response: an engine stream, encoded event by event.

    Args:
        engine: The engine to stream from.
        program, inputs, request_id: What to run.
        deadline: When the stream must end (Trio clock); then it ends with a timeout error event.
        keepalive: Seconds of quiet after which a keep-alive comment is sent.
        encode: Turns an event into bytes (or None to send nothing for it).
    """

    def __init__(
        self,
        engine: Engine,
        program: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str,
        deadline: float,
        keepalive: float,
        encode: Encoder,
    ) -> None:
        self._engine = engine
        self._program = program
        self._inputs = inputs
        self._request_id = request_id
        self._deadline = deadline
        self._keepalive = keepalive
        self._encode = encode
        self._stack = AsyncExitStack()
        self._events: Any = None
        self._pending: list[bytes] = []
        self._done = False

    async def __aenter__(self) -> StreamBody:
        try:
            self._events = await self._stack.enter_async_context(
                self._engine.stream(self._program, self._inputs, request_id=self._request_id)
            )
        except EngineError as exc:
            # Raced past the handler's precheck (e.g. the queue filled meanwhile): still one error event.
            self._finish(ErrorEvent(exc))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> StreamBody:
        return self

    def _finish(self, terminal: StreamEvent) -> None:
        self._done = True
        if (encoded := self._encode(terminal)) is not None:
            self._pending.append(encoded)

    async def __anext__(self) -> bytes:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._done:
                raise StopAsyncIteration
            wake = min(self._deadline, trio.current_time() + self._keepalive)
            with trio.move_on_at(wake) as waited:
                event = await self._events.__anext__()
            if waited.cancelled_caught:
                if trio.current_time() < self._deadline:
                    return SSE_KEEPALIVE
                self._finish(ErrorEvent(DeadlineExceededError("the request ran past its timeout")))
                continue
            if isinstance(event, FinalEvent | ErrorEvent):
                self._finish(event)
                continue
            if (encoded := self._encode(event)) is not None:
                return encoded


__all__ = ["SSE_HEADERS", "StreamBody", "error_json", "general_encoder", "seed_encoder"]
