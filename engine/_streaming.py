"""Streaming a program's output fields: DSPy's stream listeners fed from the LM, into a bounded buffer.

DSPy's ``Predict`` streams when ``dspy.settings.send_stream`` is set: the LM backend awaits
``send_stream.send(chunk)`` for each delta (the stock ``dspy.LM`` does it from its worker thread through
``anyio.from_thread.run``). The engine sets ``send_stream`` to a :class:`ListenerBridge`, which runs the
chunk through a ``dspy.streaming.StreamListener`` per output field of the predictor that produced it and
puts the resulting :class:`FieldDelta` events into the stream's :class:`EventBuffer`. So the LM's own send
is where backpressure applies: while the buffer is full (policy ``block``), the LM does not read the
next bytes from its socket.

``dspy.streamify`` is deliberately not used: under Trio, a consumer that stops early crashed the run
(``TrioInternalError``) in our measurements; a producer task, a bounded buffer and the listeners driven
by hand are correct by construction.
"""

from __future__ import annotations

from typing import Any

import dspy
import trio
from dspy.streaming import StreamListener

from ._errors import EngineError
from ._event_buffer import EventBuffer
from ._json_fields import JSONFieldScanner
from ._stream_events import ErrorEvent, FieldDelta, FinalEvent, StreamEvent


class ListenerBridge:
    """Stands in for ``dspy.settings.send_stream``: LM chunks in, field deltas out into ``buffer``.

    Args:
        module: The program; every predictor in it gets a listener per output field.
        buffer: Where the deltas go; :meth:`send` blocks while it is full (policy ``block``).
        json: Whether the program runs with ``JSONAdapter``; its output is split by
            :class:`JSONFieldScanner` instead of DSPy's listener (see ``_json_fields``).
    """

    def __init__(self, module: dspy.Module, buffer: EventBuffer, *, json: bool = False) -> None:
        self._buffer = buffer
        self._listeners: dict[int, list[StreamListener]] = {}
        self._scanners: dict[int, tuple[str, JSONFieldScanner]] = {}
        for name, predictor in module.named_predictors():
            fields = list(predictor.signature.output_fields)
            if json:
                self._scanners[id(predictor)] = (name, JSONFieldScanner(fields))
            else:
                self._listeners[id(predictor)] = [
                    StreamListener(field, predict=predictor, predict_name=name, allow_reuse=True)
                    for field in fields
                ]

    async def _put(self, response: Any) -> None:
        if response is not None and response.chunk:
            await self._buffer.put(
                FieldDelta(response.predict_name, response.signature_field_name, response.chunk)
            )

    async def send(self, chunk: Any) -> None:
        """Take one LM chunk. Blocks while the buffer is full (the backpressure point)."""
        predict_id = getattr(chunk, "predict_id", None) or 0
        if predict_id in self._scanners:
            name, scanner = self._scanners[predict_id]
            try:
                text = chunk.choices[0].delta.content or ""
            except (AttributeError, IndexError, TypeError):
                return
            for field, delta in scanner.feed(text):
                await self._buffer.put(FieldDelta(name, field, delta))
            return
        for listener in self._listeners.get(predict_id, ()):
            await self._put(listener.receive(chunk))

    async def finish(self) -> None:
        """Flush what the listeners still hold (text of a field whose end marker never came)."""
        for listeners in self._listeners.values():
            for listener in listeners:
                await self._put(listener.finalize())


class EventStream:
    """The consumer's side of a stream: ``async for event in events``.

    Yields :class:`StatusEvent` and :class:`FieldDelta` events, then exactly one :class:`FinalEvent` or
    :class:`ErrorEvent`, then stops. Each step blocks until the next event is ready.
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

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self.buffer.get()
        except trio.EndOfChannel:
            self._done = True
            if self.terminal is None:
                # The producer was cancelled from outside (the caller's own scope): say so once.
                return ErrorEvent(EngineError("the stream was cancelled before it finished"))
            return self.terminal
