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

import functools
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

    Each predictor of the program gets a scanner for the output format of the program's adapter
    (:class:`ChatFieldScanner` or :class:`JSONFieldScanner`). The engine's backends ask :meth:`sink` for
    a predictor's sink once per LM call and push plain text to it; anything else that writes DSPy
    chunks to ``send_stream`` goes through :meth:`send`, routed by the chunk's ``predict_id``.

    Args:
        module: The program.
        buffer: Where the deltas go; a sink's ``send`` blocks while it is full (policy ``block``).
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
        scanner = JSONFieldScanner if json else ChatFieldScanner
        self._sinks: dict[int, _PredictorSink] = {
            id(predictor): _PredictorSink(
                name,
                functools.partial(scanner, list(predictor.signature.output_fields)),
                buffer,
                on_first_delta,
            )
            for name, predictor in module.named_predictors()
        }

    def sink(self, predict_id: int | None) -> DeltaSink | None:
        """The sink of predictor ``predict_id`` for one new LM call (None for a predictor not in the
        program). A second call of the same predictor starts a fresh scan, its deltas numbered
        ``call=1``, ...; what the previous call's scanner still held goes out first."""
        sink = self._sinks.get(predict_id or 0)
        if sink is not None:
            sink.new_call()
        return sink

    async def send(self, chunk: Any) -> None:
        """Take one DSPy-shaped chunk. Blocks while the buffer is full (the backpressure point)."""
        sink = self._sinks.get(getattr(chunk, "predict_id", None) or 0)
        if sink is None:
            return
        try:
            text = chunk.choices[0].delta.content
        except (AttributeError, IndexError, TypeError):
            return
        if text:
            await sink.send(text)

    async def finish(self) -> None:
        """Flush what the scanners still hold (text of a field whose end marker never came)."""
        for sink in self._sinks.values():
            await sink.finish()


class _PredictorSink:
    """One predictor's text in, its field deltas out into the buffer."""

    __slots__ = (
        "_buffer",
        "_call",
        "_calls",
        "_held",
        "_make_scanner",
        "_name",
        "_on_first_delta",
        "_scanner",
        "_seen",
    )

    def __init__(
        self,
        name: str,
        make_scanner: Callable[[], FieldScanner],
        buffer: EventBuffer,
        on_first_delta: Callable[[str], None] | None,
    ) -> None:
        self._name = name
        self._make_scanner = make_scanner
        self._scanner = make_scanner()
        self._buffer = buffer
        self._on_first_delta = on_first_delta
        self._seen: set[str] = set()
        self._calls = 0  # LM calls started
        self._call = 0  # the call the scanner's text belongs to
        # Deltas of a finished call's scanner that are still to go out: (call, field, text).
        self._held: list[tuple[int, str, str]] = []

    def new_call(self) -> None:
        """An LM call of this predictor starts: from the second on, a fresh scanner (synchronous; what
        the old one held is sent before the new call's first delta)."""
        self._calls += 1
        if self._calls > 1:
            self._held += [(self._call, field, text) for field, text in self._scanner.finish()]
            self._scanner = self._make_scanner()
            self._call = self._calls - 1

    async def send(self, text: str) -> None:
        """Take one text delta of the predictor's output. Blocks while the buffer is full."""
        if self._held:
            await self._flush_held()
        if text:
            deltas = self._scanner.feed(text)
            if deltas:
                await self._put(self._call, deltas)

    async def finish(self) -> None:
        await self._flush_held()
        await self._put(self._call, self._scanner.finish())

    async def _flush_held(self) -> None:
        held, self._held = self._held, []
        for call, field, text in held:
            await self._put(call, [(field, text)])

    async def _put(self, call: int, deltas: list[tuple[str, str]]) -> None:
        for field, text in deltas:
            if self._on_first_delta is not None and field not in self._seen:
                self._seen.add(field)
                self._on_first_delta(field)
            await self._buffer.put(FieldDelta(self._name, field, text, call))


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
