"""Streaming a program's output fields: LM chunks split per field, into a bounded buffer.

DSPy's ``Predict`` streams when ``dspy.settings.send_stream`` is set. The engine sets it to a
:class:`DeltaRouter`, which splits the text of each predictor's output into per-field deltas (see
``_chat_fields`` and ``_json_fields`` for why not with ``StreamListener`` itself) and puts them into the
stream's :class:`EventBuffer`. The engine's backends see that the router is a ``TextRouter`` and push
each delta's text straight to the calling predictor's sink: no DSPy chunk is built per token (only a
foreign ``send_stream``, e.g. a user's ``dspy.streamify``, gets those; the stock ``dspy.LM`` in its worker
thread sends DSPy chunks, which ``ThreadedLM`` unwraps into the same sink). So the LM's own send is where
backpressure applies: while the buffer is full (policy ``block``), the LM does not read the next bytes
from its socket.

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
from .lm._base import DeltaSink, TextRouter


class FieldScanner(Protocol):
    def feed(self, text: str) -> list[tuple[str, str]]: ...

    def finish(self) -> list[tuple[str, str]]: ...


class DeltaRouter(TextRouter):
    """Stands in for ``dspy.settings.send_stream``: LM text in, field deltas out into ``buffer``.

    The engine's backends ask :meth:`sink` for a sink once per LM call and push plain text to it; each
    call gets its own scanner for the output format (:class:`ChatFieldScanner` or
    :class:`JSONFieldScanner`) and its own number (``FieldDelta.call``: 0, 1, ... per predictor), so a
    predictor called twice, one after the other or at the same time, streams two answers that never
    mix. Anything else that writes DSPy chunks to ``send_stream`` goes through :meth:`send`, routed by
    the chunk's ``predict_id`` (one scan per predictor: DSPy's chunks do not say where a call starts).

    Args:
        module: The program.
        buffer: Where the deltas go; a sink's ``send`` blocks while it is full (policy ``block``).
        json: Whether the program runs with ``JSONAdapter``. A ``ChatAdapter`` program's call whose text
            starts with ``{`` (DSPy's fallback to ``JSONAdapter`` after an unparsable reply) is scanned
            as JSON.
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
        self._json = json
        self._on_first_delta = on_first_delta
        self._predictors: dict[int, _Predictor] = {
            id(predictor): _Predictor(name, list(predictor.signature.output_fields))
            for name, predictor in module.named_predictors()
        }
        self._calls: list[_CallSink] = []  # every call's sink, in the order the calls started
        self._chunk_sinks: dict[int, _CallSink] = {}  # the foreign chunk path: one per predictor

    def _new_call(self, predictor: _Predictor) -> _CallSink:
        sink = _CallSink(predictor, predictor.calls, self._buffer, self._json, self._on_first_delta)
        predictor.calls += 1
        self._calls.append(sink)
        return sink

    def sink(self, predict_id: int | None) -> DeltaSink | None:
        """A sink for one new LM call of predictor ``predict_id`` (None for a predictor not in the
        program). Synchronous."""
        predictor = self._predictors.get(predict_id or 0)
        return None if predictor is None else self._new_call(predictor)

    async def send(self, chunk: Any) -> None:
        """Take one DSPy-shaped chunk. Blocks while the buffer is full (the backpressure point)."""
        key = getattr(chunk, "predict_id", None) or 0
        predictor = self._predictors.get(key)
        if predictor is None:
            return
        try:
            text = chunk.choices[0].delta.content
        except (AttributeError, IndexError, TypeError):
            return
        if text:
            sink = self._chunk_sinks.get(key)
            if sink is None:
                sink = self._chunk_sinks[key] = self._new_call(predictor)
            await sink.send(text)

    async def finish(self) -> None:
        """Flush what the scanners still hold (text of a field whose end marker never came), call by
        call in the order they started."""
        for sink in self._calls:
            await sink.finish()


class _Predictor:
    """One predictor of the program: its name, its output fields, how many LM calls it started."""

    __slots__ = ("calls", "fields", "name", "seen")

    def __init__(self, name: str, fields: list[str]) -> None:
        self.name = name
        self.fields = fields
        self.calls = 0
        self.seen: set[str] = set()  # fields that had a delta (on_first_delta fires once per field)


class _CallSink:
    """One LM call's text in, its field deltas out into the buffer."""

    __slots__ = ("_buffer", "_call", "_json", "_lead", "_on_first_delta", "_predictor", "_scanner")

    def __init__(
        self,
        predictor: _Predictor,
        call: int,
        buffer: EventBuffer,
        json: bool,
        on_first_delta: Callable[[str], None] | None,
    ) -> None:
        self._predictor = predictor
        self._call = call
        self._buffer = buffer
        self._json = json
        self._on_first_delta = on_first_delta
        self._scanner: FieldScanner | None = JSONFieldScanner(predictor.fields) if json else None
        self._lead = ""  # leading whitespace, held until the text shows which format it is

    def _scanner_for(self, text: str) -> FieldScanner | None:
        if self._scanner is None:
            self._lead += text
            start = self._lead.lstrip()
            if not start:
                return None
            kind = JSONFieldScanner if start.startswith("{") else ChatFieldScanner
            self._scanner = kind(self._predictor.fields)
        return self._scanner

    async def send(self, text: str) -> None:
        """Take one text delta of the call's output. Blocks while the buffer is full."""
        if not text:
            return
        lead = self._scanner is None
        scanner = self._scanner_for(text)
        if scanner is None:
            return
        if lead:
            text, self._lead = self._lead, ""
        deltas = scanner.feed(text)
        if deltas:
            await self._put(deltas)

    async def finish(self) -> None:
        if self._scanner is not None:
            await self._put(self._scanner.finish())

    async def _put(self, deltas: list[tuple[str, str]]) -> None:
        name, seen = self._predictor.name, self._predictor.seen
        for field, text in deltas:
            if self._on_first_delta is not None and field not in seen:
                seen.add(field)
                self._on_first_delta(field)
            await self._buffer.put(FieldDelta(name, field, text, self._call))


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
