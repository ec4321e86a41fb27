"""One runner for a call's one outcome, whatever carries it (JSON, SSE, ``/ws``, ``/v1/ws``).

::

    await run(engine, call, until, program, inputs, stream=True, emit=send)   # an SSE body, a socket
    result = await predict(engine, call, until, program, inputs)              # a JSON answer
    await run_batch(engine, call, until, program, items, ..., emit=send)      # one outcome per item

:func:`run` hands a call's outcomes to ``emit``, in order: a stream's status and delta events, then
exactly one last outcome: the :class:`PredictionResult` of a prediction, a stream's ``FinalEvent``, or an
``ErrorEvent``. Every ending that is the call's own becomes that one ``ErrorEvent``: the engine's error
(also one raised on entry, e.g. a queue that filled after the handler's precheck), the call's deadline
(``deadline_exceeded``), a cancel by id or by the engine's drain. The call's deadline is a cancel scope
around the engine call *and* ``emit``, so the engine sees it as ``trio.current_effective_deadline()`` and
a consumer that blocks past it ends the call too; the deadline's error is emitted after the scope. When
the caller itself is cancelled (the client left) nothing is emitted: ``trio.Cancelled`` propagates.

Each transport only chooses an ``emit`` and an encoder (:mod:`dspy_trio.web.formats`), so the rule
"every accepted call ends with exactly one outcome" is written here once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from dspy_trio.engine import (
    BatchItem,
    Engine,
    EngineError,
    ErrorEvent,
    FinalEvent,
    PredictionResult,
    RequestCancelledError,
)

from .cache_control import cache_status_of
from .call import Call
from .deadline import RequestDeadline
from .formats import Outcome

Emit = Callable[[Outcome], Awaitable[None]]


async def run(
    engine: Engine,
    call: Call,
    until: RequestDeadline,
    program: str,
    inputs: Mapping[str, Any],
    *,
    stream: bool,
    emit: Emit,
    lm_params: Mapping[str, Any] | None = None,
) -> None:
    """Run the call (a prediction, or a stream when ``stream``) and emit its outcomes, the last one
    exactly once. Blocks for the whole call, ``emit`` included. The engine runs it under
    ``call.request_id`` for ``call.owner``, in ``call.tenant`` (with ``lm_params`` on every LM call); a
    prediction's timings go to ``call.notes``."""
    with until.scope() as timer:
        try:
            no_cache, no_store = call.no_cache, call.no_store
            if not stream:
                result = await engine.predict(
                    program,
                    inputs,
                    request_id=call.request_id,
                    owner=call.owner,
                    tenant=call.tenant,
                    no_cache=no_cache,
                    no_store=no_store,
                    lm_params=lm_params,
                )
                call.notes.timings = result.timings
                call.notes.cache_status = cache_status_of(engine, result.timings, no_cache=call.no_cache)
                call.notes.lms = result.lms
                await emit(result)
                return
            async with engine.stream(
                program,
                inputs,
                request_id=call.request_id,
                owner=call.owner,
                tenant=call.tenant,
                no_cache=no_cache,
                no_store=no_store,
                lm_params=lm_params,
            ) as events:
                async for event in events:
                    await emit(event)
                    if isinstance(event, FinalEvent | ErrorEvent):
                        return
        except EngineError as error:
            await emit(ErrorEvent(error))
            return
    if timer.cancelled_caught:
        await emit(ErrorEvent(until.error()))


async def predict(
    engine: Engine,
    call: Call,
    until: RequestDeadline,
    program: str,
    inputs: Mapping[str, Any],
    *,
    lm_params: Mapping[str, Any] | None = None,
) -> PredictionResult:
    """The call's one outcome as a value, for the JSON answers. Blocks for the prediction.

    Raises:
        EngineError: the outcome, when it is an error (the app turns it into its HTTP status).
    """
    last: list[Outcome] = []

    async def keep(outcome: Outcome) -> None:
        last.append(outcome)

    await run(engine, call, until, program, inputs, stream=False, emit=keep, lm_params=lm_params)
    [outcome] = last
    if isinstance(outcome, ErrorEvent):
        raise outcome.error
    assert isinstance(outcome, PredictionResult), outcome
    return outcome


def missing_outcomes(count: int, seen: set[int], reason: EngineError | None) -> list[BatchItem]:
    """The outcomes of the items that never got one: ``reason`` (the deadline, an error on entry), else
    ``cancelled`` (never started because ``fail_fast`` stopped the batch)."""
    error = reason or RequestCancelledError("not started: another item failed")
    return [BatchItem(index, error=error) for index in range(count) if index not in seen]


async def run_batch(
    engine: Engine,
    call: Call,
    until: RequestDeadline,
    program: str,
    items: Sequence[Mapping[str, Any]],
    *,
    concurrency: int,
    fail_fast: bool,
    emit: Callable[[BatchItem], Awaitable[None]],
) -> None:
    """Run a batch and emit exactly one outcome per item, as they complete; then those that never got
    one (the deadline passed, ``fail_fast`` stopped the rest). Blocks for the whole batch. The batch
    runs under ``call.request_id`` (its items ``{id}-{index}``), so a cancel by that id stops it."""
    seen: set[int] = set()
    reason: EngineError | None = None
    with until.scope() as timer:
        try:
            async with engine.batch_stream(
                program,
                items,
                concurrency=concurrency,
                fail_fast=fail_fast,
                request_id=call.request_id,
                owner=call.owner,
                no_cache=call.no_cache,
                no_store=call.no_store,
                tenant=call.tenant,
            ) as outcomes:
                async for item in outcomes:
                    seen.add(item.index)
                    await emit(item)
        except EngineError as error:
            reason = error
    if timer.cancelled_caught:
        reason = until.error()
    for item in missing_outcomes(len(items), seen, reason):
        await emit(item)


__all__ = ["Emit", "missing_outcomes", "predict", "run", "run_batch"]
