"""Batches: many predictions of one program with a concurrency cap and bounded fan-out.

``concurrency`` worker tasks pull items from the (possibly lazy) input iterator one at a time, so a
100,000-item batch never has more than ``concurrency`` tasks or requests alive. Outcomes go through a
bounded channel to the consumer: when it stops taking them, the workers stop pulling new items, so no
more than ``concurrency`` finished outcomes ever wait in memory. Each item's request goes through
:meth:`Engine.predict`, so admission, deadlines and statistics apply per item.

One item's failure never loses the others. With ``fail_fast`` the first failure cancels the rest by
their request ids: items in flight end as :class:`RequestCancelledError` (outcome ``cancelled``), and no
further items are started.

The batch knows the engine only as the two functions it is given (``predict`` and ``cancel``) and the
table of running batches it enters itself in, with its owner, so that a cancel by the batch's id (under
the ownership rule of :mod:`dspy_trio.engine._owners`) stops all of it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import attrs
import trio

from . import _groups
from ._errors import EngineError, InvalidInputError, RequestCancelledError
from ._result import PredictionResult

# A running batch as the engine's table holds it: who started it, and how to stop it.
RunningBatch = tuple[str | None, Callable[[EngineError], None]]


class Predict(Protocol):
    def __call__(
        self, program: str, inputs: Mapping[str, Any], *, request_id: str | None = None
    ) -> Awaitable[PredictionResult]: ...


@attrs.frozen
class BatchItem:
    """The outcome of one item of a batch: its ``result`` or its typed ``error``.

    Attributes:
        index: The item's position in the input.
        result: The prediction, when it succeeded.
        error: Why it did not, otherwise.
    """

    index: int
    result: PredictionResult | None = None
    error: EngineError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _check_concurrency(concurrency: int) -> None:
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise InvalidInputError(f"concurrency must be a positive integer, got {concurrency!r}")


@asynccontextmanager
async def open_batch(
    predict: Predict,
    cancel: Callable[[str, EngineError], object],
    program: str,
    items: Iterable[Mapping[str, Any]],
    *,
    concurrency: int = 16,
    fail_fast: bool = False,
    request_id: str | None = None,
    owner: str | None = None,
    running: dict[str, list[RunningBatch]] | None = None,
) -> AsyncIterator[trio.MemoryReceiveChannel[BatchItem]]:
    """Run a batch; iterate the channel for outcomes as they complete. See :meth:`Engine.batch_stream`.

    ``predict`` runs one item; ``cancel(request_id, reason)`` ends an item in flight (fail-fast). While
    the batch runs, ``running[batch id]`` holds ``(owner, stop)``: ``stop(reason)`` stops it (no item
    starts any more, the ones in flight end with the reason given).
    """
    _check_concurrency(concurrency)
    prefix = request_id or f"batch-{uuid.uuid4().hex}"
    indexed = iter(enumerate(items))
    send, receive = trio.open_memory_channel[BatchItem](concurrency)
    in_flight: set[str] = set()
    stopped = False

    async def run_item(index: int, inputs: Mapping[str, Any]) -> BatchItem:
        item_id = f"{prefix}-{index}"
        in_flight.add(item_id)
        try:
            return BatchItem(index, result=await predict(program, inputs, request_id=item_id))
        except EngineError as exc:
            return BatchItem(index, error=exc)
        finally:
            in_flight.discard(item_id)

    def stop(reason: EngineError) -> None:
        nonlocal stopped
        stopped = True
        for item_id in list(in_flight):
            cancel(item_id, reason)

    async def worker(outcomes: trio.MemorySendChannel[BatchItem]) -> None:
        async with outcomes:
            for index, inputs in indexed:
                if stopped:
                    return
                outcome = await run_item(index, inputs)
                if fail_fast and not outcome.ok and not stopped:
                    stop(RequestCancelledError(f"cancelled: item {index} of the batch failed"))
                await outcomes.send(outcome)

    entry: RunningBatch = (owner, stop)
    if running is not None:
        running.setdefault(prefix, []).append(entry)
    try:
        async with _groups.open_service_nursery() as nursery:
            async with send:
                for _ in range(concurrency):
                    nursery.start_soon(worker, send.clone())
            yield receive
    finally:
        if running is not None:
            entries = running.get(prefix, [])
            if entry in entries:
                entries.remove(entry)
            if not entries:
                running.pop(prefix, None)
