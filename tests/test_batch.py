"""Batches on the virtual clock: order, per-item outcomes, fail-fast, bounded fan-out and memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from dspy_trio.engine import (
    EngineConfig,
    InvalidInputError,
    LMConfig,
    RequestCancelledError,
    RetryPolicy,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine.lm import ChunkSink, Completion

from .helpers import CountingLM, tasks_living


class SometimesFailing(CountingLM):
    """Fails after 1 s for questions containing "fail"; answers others after ``first_token_delay``."""

    async def complete(self, messages: Any, params: Any, sink: ChunkSink | None) -> Completion:
        if "fail" in str(messages[-1]["content"]):
            await trio.sleep(1.0)
            raise UpstreamServerError("boom", status=500)
        return await super().complete(messages, params, sink)


def config(**changes: Any) -> EngineConfig:
    return EngineConfig(lms={"default": LMConfig(retry=RetryPolicy(max_attempts=1))}, **changes)


async def test_ordered_results_with_per_item_outcomes(autojump_clock: Any) -> None:
    lm = SometimesFailing(first_token_delay=1.0)
    items = [{"question": "a"}, {"question": "please fail"}, {"nope": "x"}, {"question": "d"}]
    async with open_engine(config(), lms={"default": lm}) as engine:
        outcomes = await engine.batch("default", items, concurrency=4)
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert outcomes[0].ok
    assert outcomes[3].ok
    assert isinstance(outcomes[1].error, UpstreamServerError)
    assert isinstance(outcomes[2].error, InvalidInputError)
    assert trio.current_time() == 1.0, "all four ran at once"


async def test_concurrency_cap_runs_items_in_waves(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        start = trio.current_time()
        outcomes = await engine.batch("default", [{"question": str(i)} for i in range(10)], concurrency=3)
        assert trio.current_time() - start == 4.0  # ceil(10 / 3) waves of 1 s
    assert all(o.ok for o in outcomes)


async def test_fail_fast_cancels_the_rest(autojump_clock: Any) -> None:
    lm = SometimesFailing(first_token_delay=5.0)
    items = [{"question": "fail now"}] + [{"question": f"slow {i}"} for i in range(9)]
    async with open_engine(config(), lms={"default": lm}) as engine:
        outcomes = await engine.batch("default", items, concurrency=3, fail_fast=True)
        assert trio.current_time() == 1.0
        assert engine.statistics().in_flight == 0
    assert isinstance(outcomes[0].error, UpstreamServerError)
    assert all(isinstance(o.error, RequestCancelledError) for o in outcomes[1:])


async def test_as_completed_yields_in_completion_order(autojump_clock: Any) -> None:
    class ByLength(CountingLM):
        async def complete(self, messages: Any, params: Any, sink: ChunkSink | None) -> Completion:
            await trio.sleep(len(str(messages[-1]["content"])) / 100)
            return await super().complete(messages, params, sink)

    lm = ByLength(first_token_delay=0.0)
    items = [{"question": "x" * n} for n in (300, 100, 200)]
    async with (
        open_engine(config(), lms={"default": lm}) as engine,
        engine.batch_stream("default", items, concurrency=3) as outcomes,
    ):
        order = [item.index async for item in outcomes]
    assert order == [1, 2, 0]


async def test_a_huge_lazy_batch_keeps_tasks_and_pending_outcomes_bounded(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.01)
    pulled = 0

    def items() -> Iterator[dict[str, str]]:
        nonlocal pulled
        for i in range(100_000):
            pulled += 1
            yield {"question": str(i)}

    async with open_engine(config(), lms={"default": lm}) as engine:
        baseline = tasks_living()
        async with engine.batch_stream("default", items(), concurrency=8) as outcomes:
            taken = 0
            async for _item in outcomes:
                taken += 1
                # A worker per item in flight, and the task of each item's shared LM call.
                assert tasks_living() - baseline <= 2 * 8 + 1
                if taken == 50:
                    await trio.sleep(10)  # a consumer that stops taking outcomes
                    assert pulled <= taken + 8 + 8, "workers stopped pulling items"
                    assert engine.statistics().in_flight == 0
                if taken == 100:
                    break
        assert tasks_living() == baseline
        stats = engine.statistics()
        assert (stats.in_flight, stats.queued) == (0, 0)
    assert pulled < 200


async def test_bad_concurrency_is_refused() -> None:
    async with open_engine(config()) as engine:
        with pytest.raises(InvalidInputError, match="concurrency"):
            await engine.batch("default", [{"question": "q"}], concurrency=0)


async def test_a_batch_is_cancelled_by_its_id_for_its_owner_only(autojump_clock: Any) -> None:
    """``cancel_anywhere(batch id, owner=...)`` stops the whole batch for its owner (the id the caller
    knows is the batch's, not its items'), and finds nothing for anyone else."""
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(), lms={"default": lm}) as engine, trio.open_nursery() as nursery:
        outcomes: list[Any] = []

        async def run() -> None:
            outcomes.extend(
                await engine.batch(
                    "default", [{"question": "a"}, {"question": "b"}], request_id="job", owner="alice"
                )
            )

        nursery.start_soon(run)
        await trio.sleep(1)
        assert await engine.cancel_anywhere("job", owner="mallory") is False
        assert engine.cancel("job", owner="mallory") is False
        assert await engine.cancel_anywhere("job", owner="alice") is True
    assert trio.current_time() == 1
    assert [type(o.error) for o in outcomes] == [RequestCancelledError, RequestCancelledError]
    assert lm.finished == 0
