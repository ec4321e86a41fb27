"""Batches: many predictions of one program with a concurrency cap and bounded fan-out.

``concurrency`` worker tasks pull items from the (possibly lazy) input iterator one at a time, so a
100,000-item batch never has more than ``concurrency`` tasks or requests alive. Outcomes go through a
bounded channel to the consumer: when it stops taking them, the workers stop pulling new items, so no
more than ``concurrency`` finished outcomes ever wait in memory. Each item's request goes through
:meth:`Engine.predict`, so admission, deadlines and statistics apply per item.

One item's failure never loses the others. With ``fail_fast`` the first failure cancels the rest by
their request ids: items in flight end as :class:`RequestCancelledError` (outcome ``cancelled``), and no
further items are started.

The batch knows the engine only as the two functions it is given (``predict`` and ``cancel``).
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
) -> AsyncIterator[trio.MemoryReceiveChannel[BatchItem]]:
    """Run a batch; iterate the channel for outcomes as they complete. See :meth:`Engine.batch_stream`.

    ``predict`` runs one item; ``cancel(request_id, reason)`` ends an item in flight (fail-fast).
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

    async def worker(outcomes: trio.MemorySendChannel[BatchItem]) -> None:
        nonlocal stopped
        async with outcomes:
            for index, inputs in indexed:
                if stopped:
                    return
                outcome = await run_item(index, inputs)
                if fail_fast and not outcome.ok and not stopped:
                    stopped = True
                    for item_id in list(in_flight):
                        item = item_id.rsplit("-", 1)[1]
                        cancel(item_id, RequestCancelledError(f"item {item} cancelled: another item failed"))
                await outcomes.send(outcome)

    async with _groups.open_service_nursery() as nursery:
        async with send:
            for _ in range(concurrency):
                nursery.start_soon(worker, send.clone())
        yield receive
