"""Streaming a program's output fields: LM chunks split per field, into a bounded buffer.

DSPy's ``Predict`` streams when ``dspy.settings.send_stream`` is set: the LM backend awaits
``send_stream.send(chunk)`` for each delta, in the chunk shape DSPy's ``StreamListener`` understands (the
stock ``dspy.LM`` does it from its worker thread through ``anyio.from_thread.run``). The engine sets
``send_stream`` to a :class:`DeltaRouter`, which splits the text of each predictor's output into per-field
deltas (see ``_chat_fields`` and ``_json_fields`` for why not with ``StreamListener`` itself) and puts
them into the stream's :class:`EventBuffer`. So the LM's own send is where backpressure applies: while
the buffer is full (policy ``block``), the LM does not read the next bytes from its socket.

``dspy.streamify`` is deliberately not used: under Trio, a consumer that stops early crashed the run
(``TrioInternalError``) in our measurements; a producer task, a bounded buffer and the listeners driven
by hand are correct by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

from ._chat_fields import ChatFieldScanner
from ._dspy import Module
from ._errors import RequestAbandonedError
from ._event_buffer import EventBuffer
from ._json_fields import JSONFieldScanner
from ._stream_events import ErrorEvent, FieldDelta, FinalEvent, StreamEvent


class FieldScanner(Protocol):
    def feed(self, text: str) -> list[tuple[str, str]]: ...

    def finish(self) -> list[tuple[str, str]]: ...


class DeltaRouter:
    """Stands in for ``dspy.settings.send_stream``: LM chunks in, field deltas out into ``buffer``.

    Each predictor of the program gets a scanner for the output format of the program's adapter
    (:class:`ChatFieldScanner` or :class:`JSONFieldScanner`); a chunk is routed by its ``predict_id``.

    Args:
        module: The program.
        buffer: Where the deltas go; :meth:`send` blocks while it is full (policy ``block``).
        json: Whether the program runs with ``JSONAdapter``.
        on_first_delta: Called with the field name at the first delta of each predictor's field.
    """

    def __init__(
        self,
        module: Module,
        buffer: EventBuffer,
        *,
        json: bool = False,
        on_first_delta: Callable[[str], None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._on_first_delta = on_first_delta
        self._seen: set[tuple[str, str]] = set()
        scanner = JSONFieldScanner if json else ChatFieldScanner
        self._scanners: dict[int, tuple[str, FieldScanner]] = {
            id(predictor): (name, scanner(list(predictor.signature.output_fields)))
            for name, predictor in module.named_predictors()
        }

    async def _put(self, predictor: str, deltas: list[tuple[str, str]]) -> None:
        for field, text in deltas:
            if self._on_first_delta is not None and (predictor, field) not in self._seen:
                self._seen.add((predictor, field))
                self._on_first_delta(field)
            await self._buffer.put(FieldDelta(predictor, field, text))

    async def send(self, chunk: Any) -> None:
        """Take one LM chunk. Blocks while the buffer is full (the backpressure point)."""
        route = self._scanners.get(getattr(chunk, "predict_id", None) or 0)
        if route is None:
            return
        try:
            text = chunk.choices[0].delta.content
        except (AttributeError, IndexError, TypeError):
            return
        if text:
            await self._put(route[0], route[1].feed(text))

    async def finish(self) -> None:
        """Flush what the scanners still hold (text of a field whose end marker never came)."""
        for name, scanner in self._scanners.values():
            await self._put(name, scanner.finish())


class EventStream:
    """The consumer's side of a stream: ``async for event in events``.

    Yields :class:`StatusEvent` and :class:`FieldDelta` events, then exactly one :class:`FinalEvent` or
    :class:`ErrorEvent`, then stops. Each step blocks until the next event is ready, and like a Trio
    channel each step is a checkpoint: a consumer whose scope is cancelled gets ``trio.Cancelled``, not
    the next event (the terminal one included).
    """

    def __init__(self, request_id: str, buffer: EventBuffer) -> None:
        self.request_id = request_id
        self.buffer = buffer
        self.terminal: FinalEvent | ErrorEvent | None = None
        self._done = False

    def __repr__(self) -> str:
        return f"<EventStream {self.request_id} {self.buffer!r}>"

    def __aiter__(self) -> EventStream:
        return self

    def end(self, terminal: FinalEvent | ErrorEvent) -> None:
        """End the stream with ``terminal`` after what is already queued (no producer ran)."""
        self.terminal = terminal
        self.buffer.close()

    async def __anext__(self) -> StreamEvent:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._done:
            raise StopAsyncIteration
        try:
            return await self.buffer.get()
        except trio.EndOfChannel:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._done = True
            if self.terminal is None:  # the producer never ran: its caller's scope ended it first
                return ErrorEvent(RequestAbandonedError("the stream ended before it started"))
            return self.terminal
