"""A streamed request from entry to its one terminal event.

The consumer's task enters the stream: acceptance, then admission (so an overload is raised on entry).
The program then runs in a producer task in a nursery scoped to the consumer's ``async with`` block,
filling the stream's bounded buffer; leaving the block cancels it. Whatever ends the request, the
producer sets exactly one terminal event before it closes the buffer:

- the program's result or error: :class:`FinalEvent` / :class:`ErrorEvent`;
- the engine's cancel (by id, or shutdown), in the queue or while running: an :class:`ErrorEvent` with
  :class:`RequestCancelledError` / :class:`EngineClosedError` (a stream cancelled while queued is still
  entered: it holds that one event);
- the consumer's own scope: :class:`DeadlineExceededError` or :class:`RequestAbandonedError`, which only
  a consumer still reading (in a shielded scope) can see.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from . import _groups
from ._admission import Admission
from ._errors import EngineError
from ._event_buffer import EventBuffer
from ._ledger import Ledger
from ._request import Request
from ._runner import ProgramRunner
from ._stream_events import ErrorEvent, FinalEvent, StatusEvent
from ._stream_options import StreamOptions
from ._streaming import DeltaRouter, EventStream


@asynccontextmanager
async def open_stream(
    request: Request,
    options: StreamOptions,
    *,
    ledger: Ledger,
    admission: Admission,
    runner: ProgramRunner,
    on_first_delta: Callable[[str], None] | None = None,
) -> AsyncIterator[EventStream]:
    """Admit ``request`` and stream its program's events. See :meth:`Engine.stream`."""
    buffer = EventBuffer(
        options.buffer_size,
        options.backpressure,
        consumer_timeout=options.consumer_timeout if options.backpressure == "timeout" else math.inf,
        coalesce_chars=options.coalesce_chars,
        coalesce_ms=options.coalesce_ms,
    )
    events = EventStream(request.request_id, buffer)
    try:
        with ledger.track(request):
            with request.scoped() as queued:
                await admission.acquire(request)
                request.admitted = trio.current_time()
            request.consumer_owned = True
            if queued.cancelled_caught:  # the engine ended it while it queued: nothing ran
                error = request.interruption()
                request.settle_error(error)
                events.end(ErrorEvent(error))
                ledger.end(request)
                yield events
                return
            async with _groups.open_service_nursery() as nursery:
                nursery.start_soon(_produce, request, events, ledger, admission, runner, on_first_delta)
                yield events
    finally:
        ledger.stream_drops["dropped"] += buffer.dropped
        ledger.stream_drops["coalesced"] += buffer.coalesced


async def _produce(
    request: Request,
    events: EventStream,
    ledger: Ledger,
    admission: Admission,
    runner: ProgramRunner,
    on_first_delta: Callable[[str], None] | None,
) -> None:
    """The producer task: runs the program, fills the buffer, sets the one terminal event. When it
    ends, so does the request (its outcome is booked): what is left is the consumer reading the buffer."""
    buffer = events.buffer
    try:
        with request.scoped() as running:
            try:
                await buffer.put(StatusEvent("running", queued=request.admitted - request.started))
                json = runner.adapter_of(request.program) == "json"
                router = DeltaRouter(request.program.module, buffer, json=json, on_first_delta=on_first_delta)
                outputs, usage = await runner.run(request, send_stream=router)
                await router.finish()
            except EngineError as exc:
                events.terminal = ErrorEvent(exc)
                request.settle_error(exc)
            else:
                result = runner.result(request, outputs, usage)
                events.terminal = FinalEvent(result, dropped=buffer.dropped, coalesced=buffer.coalesced)
                request.settle("succeeded")
        if running.cancelled_caught and events.terminal is None:  # the engine's cancel
            error = request.interruption()
            events.terminal = ErrorEvent(error)
            request.settle_error(error)
    except trio.Cancelled as exc:  # the consumer's scope, or the consumer left the block
        if events.terminal is None:
            events.terminal = ErrorEvent(request.caller_interruption(exc))
        request.settle_interrupted(exc)
        raise
    finally:
        admission.release(request, service_time=trio.current_time() - request.admitted)
        buffer.close()
        ledger.end(request)
