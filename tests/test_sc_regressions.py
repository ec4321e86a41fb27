"""Regressions found by the structured-concurrency harness (issue #16), one test per defect.

Each test was written before its fix and failed on the code before it. Timing runs on
``MockClock(autojump_threshold=0)`` with exact virtual times; where the defect is a race between two
tasks woken in the same scheduler batch, the test runs under several fixed seeds of Trio's scheduler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import trio
import trio._core._run as trio_run
import trio.lowlevel

from dspy_trio.engine import (
    CallTimeouts,
    DeadlineExceededError,
    DSPySettings,
    EngineClosedError,
    EngineConfig,
    EngineError,
    ErrorEvent,
    FinalEvent,
    LMConfig,
    ProgramSpec,
    RateLimitWaitError,
    RequestCancelledError,
    StatusEvent,
    StreamOptions,
    UpstreamRateLimitedError,
    open_engine,
)
from dspy_trio.engine._retry import RetryPolicy, seeded
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import ChunkSink, Completion
from dspy_trio.engine.lm._base import Message
from dspy_trio.engine.testing import Behavior, FakeUpstream

from .helpers import CountingLM, tasks_living


def config(**changes: Any) -> EngineConfig:
    return EngineConfig(lms={"default": LMConfig()}, **changes)


class ClosingLM(CountingLM):
    """The counting LM, remembering whether the engine closed it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.closed_at: float | None = None

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: ChunkSink | None
    ) -> Completion:
        return await super().complete(messages, params, sink)

    async def aclose(self) -> None:
        self.closed_at = trio.current_time()


# 1. engine.cancel(request_id) between a stream's admission and its producer's first step.


async def test_cancel_by_id_right_after_entering_a_stream_ends_it(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        async with engine.stream("default", {"question": "q"}, request_id="victim") as events:
            assert engine.cancel("victim") is True
            received = [event async for event in events]
        assert trio.current_time() == 0
        assert [type(e) for e in received] == [ErrorEvent]
        assert isinstance(received[-1].error, RequestCancelledError)
        stats = engine.statistics()
        assert (stats.cancelled, stats.succeeded, stats.in_flight) == (1, 0, 0)
    assert lm.started == 0


# 2. Drain loses the same window: a stream admitted as drain's timeout fires.


@pytest.mark.parametrize("seed", range(12))
async def test_drain_cancels_a_stream_admitted_as_it_gives_up_waiting(autojump_clock: Any, seed: int) -> None:
    trio_run._r.seed(seed)
    lm = CountingLM(first_token_delay=1.0)
    slow = CountingLM(first_token_delay=100.0)
    received: list[Any] = []
    cfg = EngineConfig(
        lms={"default": LMConfig(), "slow": LMConfig()},
        programs={
            "default": ProgramSpec("question -> answer"),
            "slow": ProgramSpec("question -> answer", lm="slow"),
        },
        max_in_flight=1,
        drain_timeout=1,
    )
    async with trio.open_nursery() as nursery, open_engine(cfg, lms={"default": lm, "slow": slow}) as engine:

        async def holder() -> None:
            with contextlib.suppress(EngineError):
                await engine.predict("default", {"question": "holds the slot until t=1"})

        async def consumer() -> None:
            async with engine.stream("slow", {"question": "admitted at t=1"}) as events:
                received.extend([event async for event in events])

        nursery.start_soon(holder)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(consumer)
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert engine.statistics().queued == 1
        drained = trio.Event()

        async def drain() -> None:
            await engine.drain()
            drained.set()

        nursery.start_soon(drain)
        with trio.fail_after(2):
            await drained.wait()
        # Drain returned within its timeout: nothing holds a slot any more.
        assert trio.current_time() == 1
        assert engine.statistics().in_flight == 0
    assert isinstance(received[-1], ErrorEvent)
    assert isinstance(received[-1].error, EngineClosedError)
    assert slow.finished == 0


# 3. Leaving open_engine by cancellation must still cancel in-flight requests and close the LMs.


async def test_leaving_open_engine_by_cancellation_still_shuts_down(autojump_clock: Any) -> None:
    lm = ClosingLM(first_token_delay=100.0)
    ended: list[Any] = []
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as engine_scope:
            async with open_engine(config(drain_timeout=3), lms={"default": lm}) as engine:

                async def call() -> None:
                    try:
                        await engine.predict("default", {"question": "q"})
                    except EngineError as exc:
                        ended.append((exc, trio.current_time()))

                outer.start_soon(call)
                await trio.sleep(1)
                engine_scope.cancel()
                await trio.sleep_forever()
    [(error, at)] = ended
    assert isinstance(error, EngineClosedError)
    assert at == 1  # cancelled at once: the owner of the engine is gone, there is no graceful wait
    assert lm.closed_at == 1
    assert lm.finished == 0
    stats = engine.statistics()
    assert (stats.in_flight, stats.succeeded, stats.shut_down) == (0, 0, 1)


# 4. A longer Retry-After that arrives while a call waits out a cool-down.


class Script:
    def __init__(self, error: Exception | None = None, delay: float = 0.0) -> None:
        self.error, self.delay = error, delay
        self.started: list[float] = []

    async def __call__(self, sink: Any) -> Completion:
        self.started.append(trio.current_time())
        await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return Completion(["ok"], {"total_tokens": 1})


async def test_a_longer_cooldown_set_during_a_cooldown_wait_is_honoured(autojump_clock: Any) -> None:
    guard = UpstreamGuard("up", UpstreamPolicy(retry=RetryPolicy(max_attempts=1)), jitter=seeded(1))
    long_429 = Script(UpstreamRateLimitedError("429", retry_after=5.0), delay=1.0)
    short_429 = Script(UpstreamRateLimitedError("429", retry_after=2.0))
    waiting = Script()

    async def expect_429(script: Script) -> None:
        with pytest.raises(UpstreamRateLimitedError):
            await guard.call(script, None, estimate=1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(expect_429, long_429)  # sent at t=0, answers 429 (5 s) at t=1
        await trio.lowlevel.checkpoint()
        nursery.start_soon(expect_429, short_429)  # sent at t=0, answers 429 (2 s) at once
        await trio.sleep(0.5)
        await guard.call(waiting, None, estimate=1)  # waits for t=2, then for the cool-down to t=6
    assert waiting.started == [6.0]
    assert guard.statistics().rate_limit_wait_seconds == 5.5


async def test_a_cooldown_extended_past_the_deadline_fails_at_once(autojump_clock: Any) -> None:
    guard = UpstreamGuard("up", UpstreamPolicy(retry=RetryPolicy(max_attempts=1)), jitter=seeded(1))
    long_429 = Script(UpstreamRateLimitedError("429", retry_after=50.0), delay=1.0)
    short_429 = Script(UpstreamRateLimitedError("429", retry_after=2.0))
    waiting = Script()

    async def expect_429(script: Script) -> None:
        with pytest.raises(UpstreamRateLimitedError):
            await guard.call(script, None, estimate=1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(expect_429, long_429)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(expect_429, short_429)
        await trio.sleep(0.5)
        with trio.move_on_after(10), pytest.raises(RateLimitWaitError, match="would pass the deadline"):
            await guard.call(waiting, None, estimate=1)
        assert trio.current_time() == 1  # failed when the longer cool-down became known, not at 2 or 10.5
    assert waiting.started == []


# 5. The terminal event must checkpoint like a Trio channel.


@pytest.mark.parametrize("fails", [False, True], ids=["final", "error"])
async def test_a_cancelled_consumer_is_cancelled_at_the_terminal_event(
    autojump_clock: Any, fails: bool
) -> None:
    if fails:
        from .helpers import FailingLM

        lm: Any = FailingLM(EngineError("boom"))
    else:
        lm = CountingLM(first_token_delay=0.0)
    options = StreamOptions(buffer_size=10_000)
    async with open_engine(config(), lms={"default": lm}) as engine:
        async with engine.stream("default", {"question": "q"}, options=options) as events:
            await trio.sleep(1)  # the producer has finished: the buffer holds everything
            while len(events.buffer):
                await events.__anext__()
            received = []
            with trio.CancelScope() as scope:
                scope.cancel()
                received.extend([event async for event in events])
            assert scope.cancelled_caught
            assert received == []
            terminal = [event async for event in events]
        assert [type(e) for e in terminal] == [ErrorEvent if fails else FinalEvent]


# 6. Cancelling a queued stream by id: entering raises nothing, the stream is one ErrorEvent.


@pytest.mark.parametrize("reason", ["cancel", "drain"])
async def test_a_queued_stream_ended_by_the_engine_is_one_error_event(
    autojump_clock: Any, reason: str
) -> None:
    lm = CountingLM(first_token_delay=10.0)
    received: list[Any] = []
    cfg = config(max_in_flight=1, drain_timeout=0)
    async with open_engine(cfg, lms={"default": lm}) as engine, trio.open_nursery() as nursery:

        async def holder() -> None:
            with contextlib.suppress(EngineClosedError):
                await engine.predict("default", {"question": "holds the slot"})

        nursery.start_soon(holder)
        await trio.lowlevel.checkpoint()

        async def consumer() -> None:
            async with engine.stream("default", {"question": "q"}, request_id="queued") as events:
                received.extend([event async for event in events])

        nursery.start_soon(consumer)
        await trio.sleep(1)
        assert engine.statistics().queued == 1
        if reason == "cancel":
            assert engine.cancel("queued")
            await trio.sleep(0.001)
            assert [type(e) for e in received] == [ErrorEvent]
            assert isinstance(received[0].error, RequestCancelledError)
            assert engine.statistics().cancelled == 1
            nursery.cancel_scope.cancel()
        else:
            await engine.drain()  # returns once the engine's part ended; the consumer reads on
            assert trio.current_time() == 1
            await trio.sleep(0.001)
            assert [type(e) for e in received] == [ErrorEvent]
            assert isinstance(received[0].error, EngineClosedError)
            assert engine.statistics().shut_down == 2


# 7. Extras from the issue.


async def test_the_thread_path_streams_through_the_guard(fake_upstream: FakeUpstream) -> None:
    """The first-token watchdog must see the thread path's chunks: a stream that delivers its first
    token at once and then a token every 20 ms for ~1.5 s is not a first-token timeout of 0.5 s."""
    fake_upstream.behavior = Behavior(first_token_delay=0.0, token_delay=0.02, words_per_field=35)
    lm = LMConfig(
        model="openai/fake-model",
        timeouts=CallTimeouts(first_token=0.5),
        retry=RetryPolicy(max_attempts=1),
        settings=DSPySettings(api_base=fake_upstream.url, api_key="k"),
    )
    async with (
        open_engine(EngineConfig(lms={"default": lm})) as engine,
        engine.stream("default", {"question": "q"}) as events,
    ):
        received = [event async for event in events]
    assert isinstance(received[-1], FinalEvent), received[-1]


async def test_an_engine_error_raised_by_the_consumer_is_not_the_streams_outcome(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(), lms={"default": lm}) as engine:

        async def consume() -> None:
            async with engine.stream("default", {"question": "q"}) as events:
                async for event in events:
                    if isinstance(event, StatusEvent):
                        raise RequestCancelledError("the consumer's own error")

        with pytest.raises(RequestCancelledError, match="the consumer's own"):
            await consume()
        stats = engine.statistics()
        assert (stats.cancelled, stats.abandoned) == (0, 1)
        assert stats.errors_by_code == {}


async def test_a_producer_cancelled_from_outside_ends_with_a_specific_error(autojump_clock: Any) -> None:
    """A consumer that reads in a shielded scope while the stream's own scope is cancelled sees a
    specific error (a timeout here), never a bare EngineError."""
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        received: list[Any] = []
        with trio.move_on_after(2):
            async with engine.stream("default", {"question": "q"}) as events:
                with trio.CancelScope(shield=True):
                    received.extend([event async for event in events])
        assert type(received[-1].error) is not EngineError
        assert isinstance(received[-1].error, DeadlineExceededError)
        assert engine.statistics().timed_out == 1


async def test_batch_request_ids_are_unique_across_batches(autojump_clock: Any) -> None:
    seen: list[str] = []
    async with open_engine(config(), lms={"default": CountingLM(first_token_delay=0)}) as engine:
        for _ in range(20):
            items = [{"question": "q"}]  # a fresh list each time, often at the same address
            [item] = await engine.batch("default", items)
            assert item.result is not None
            seen.append(item.result.request_id)
            del items
    assert len(set(seen)) == len(seen)


async def test_no_engine_task_outlives_a_cancelled_stream(autojump_clock: Any) -> None:
    async with open_engine(config(), lms={"default": CountingLM(first_token_delay=5)}) as engine:
        baseline = tasks_living()
        async with engine.stream("default", {"question": "q"}, request_id="x") as events:
            engine.cancel("x")
            _ = [event async for event in events]
        assert tasks_living() == baseline


# 8. One outcome classification for every kind of call.


@pytest.mark.parametrize("kind", ["predict", "stream", "batch", "batch_stream"])
@pytest.mark.parametrize(
    ("how", "outcome"),
    [
        ("deadline", "timed_out"),
        ("scope", "abandoned"),
        ("engine_cancel", "cancelled"),
        ("drain", "shut_down"),
    ],
)
async def test_the_same_cancel_books_the_same_outcome_for_every_kind(
    autojump_clock: Any, kind: str, how: str, outcome: str
) -> None:
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(drain_timeout=0), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                if how == "deadline":
                    scope.deadline = 2.0

                async def cut() -> None:
                    await trio.sleep(2)
                    if how == "scope":
                        scope.cancel()
                    elif how == "engine_cancel":
                        assert engine.cancel("r") or engine.cancel("r-0")
                    elif how == "drain":
                        await engine.drain()

                nursery.start_soon(cut)
                inputs = {"question": "q"}
                with contextlib.suppress(EngineError):
                    if kind == "predict":
                        await engine.predict("default", inputs, request_id="r")
                    elif kind == "stream":
                        async with engine.stream("default", inputs, request_id="r") as events:
                            _ = [event async for event in events]
                    elif kind == "batch":
                        await engine.batch("default", [inputs], request_id="r")
                    else:
                        async with engine.batch_stream("default", [inputs], request_id="r") as items:
                            _ = [item async for item in items]
            assert trio.current_time() == 2
        stats = engine.statistics()
        booked = {name: getattr(stats, name) for name in ("timed_out", "abandoned", "cancelled", "shut_down")}
        assert booked == {name: int(name == outcome) for name in booked}
        assert (stats.in_flight, stats.succeeded) == (0, 0)
