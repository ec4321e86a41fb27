"""Engine-level scheduling: cancel by id, attempts, per-upstream statistics, and fault injection
against the fake upstream (every request ends with one outcome, none past its deadline, retries never
earlier than the upstream asked)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from dspy_trio.engine import (
    CallTimeouts,
    EngineConfig,
    ErrorEvent,
    LMConfig,
    OpenAISettings,
    RateLimitWaitError,
    RequestCancelledError,
    RetryPolicy,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitedError,
    open_engine,
)
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault

from .helpers import CountingLM


def config(**changes: Any) -> EngineConfig:
    return EngineConfig(lms={"default": LMConfig()}, **changes)


@pytest.mark.parametrize("stage", ["queued", "running", "streaming"])
async def test_cancel_by_id_ends_the_request_wherever_it_is(autojump_clock: Any, stage: str) -> None:
    lm = CountingLM(first_token_delay=10.0)
    outcome: list[Any] = []
    async with (
        open_engine(config(max_in_flight=1), lms={"default": lm}) as engine,
        trio.open_nursery() as nursery,
    ):
        if stage == "queued":
            nursery.start_soon(engine.predict, "default", {"question": "holds the slot"})
            await trio.sleep(1)

        async def target() -> None:
            if stage == "streaming":
                async with engine.stream("default", {"question": "q"}, request_id="victim") as events:
                    outcome.extend([event async for event in events])
                return
            try:
                await engine.predict("default", {"question": "q"}, request_id="victim")
            except RequestCancelledError as exc:
                outcome.append(exc)

        nursery.start_soon(target)
        await trio.sleep(2)
        assert engine.cancel("victim") is True
        assert engine.cancel("nobody") is False
        await trio.sleep(0.001)
        assert trio.current_time() == pytest.approx(3.001 if stage == "queued" else 2.001)
        last = outcome[-1]
        error = last.error if isinstance(last, ErrorEvent) else last
        assert isinstance(error, RequestCancelledError)
        assert engine.statistics().cancelled == 1
        nursery.cancel_scope.cancel()


async def test_results_report_attempts_and_statistics_count_retries(fake_upstream: FakeUpstream) -> None:
    fake_upstream.add_faults(Fault("unavailable"), Fault("server_error"))
    lm = LMConfig(
        model="fake", retry=RetryPolicy(base_delay=0.01), settings=OpenAISettings(api_base=fake_upstream.url)
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        result = await engine.predict("default", {"question": "q"})
        assert result.attempts == 3
        upstream = engine.statistics().upstreams["default"]
        assert upstream.retries_by_cause == {"server_error": 2}


async def test_429_bursts_every_request_one_outcome_and_retries_never_early(
    fake_upstream: FakeUpstream,
) -> None:
    """A burst of 429s with Retry-After: the shared cool-down holds every request off until then."""
    fake_upstream.add_faults(*[Fault("rate_limit", retry_after_ms=300)] * 5)
    lm = LMConfig(
        model="fake", retry=RetryPolicy(max_attempts=5), settings=OpenAISettings(api_base=fake_upstream.url)
    )
    outcomes: list[Any] = []
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:

        async def one(i: int) -> None:
            with trio.move_on_after(5) as scope:
                try:
                    outcomes.append(await engine.predict("default", {"question": f"q{i}"}))
                except UpstreamError as exc:
                    outcomes.append(exc)
            if scope.cancelled_caught:
                outcomes.append("timed out")

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
    assert len(outcomes) == 5
    assert all(not isinstance(o, str) for o in outcomes), "none ran past its deadline"
    rejected_at = max(r.received_at for r in fake_upstream.records if r.status == 429)
    later = [r.received_at for r in fake_upstream.records if r.status == 200]
    assert later, "requests succeeded after the cool-down"
    first_429 = min(r.received_at for r in fake_upstream.records if r.status == 429)
    assert min(later) - first_429 >= 0.3 - 0.002, "nobody came back before Retry-After"
    assert rejected_at - first_429 < 0.3, "the 429s were one burst"


async def test_hangs_and_mid_stream_disconnects_each_end_in_one_outcome(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(first_token_delay=0.0, token_delay=0.01)
    fake_upstream.add_faults(Fault("hang"))
    lm = LMConfig(
        model="fake",
        timeouts=CallTimeouts(attempt=0.5),
        retry=RetryPolicy(base_delay=0.01),
        settings=OpenAISettings(api_base=fake_upstream.url),
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        recovered = await engine.predict("default", {"question": "first hangs"})
        assert recovered.attempts == 2  # the hang was cut at 0.5 s and retried
        fake_upstream.add_faults(Fault("disconnect", after_tokens=5))
        async with engine.stream("default", {"question": "cut mid-stream"}) as events:
            streamed = [event async for event in events]
    assert isinstance(streamed[-1], ErrorEvent)
    assert isinstance(streamed[-1].error, UpstreamConnectionError), "no retry once tokens were delivered"
    assert [r.fault for r in fake_upstream.records] == ["hang", None, "disconnect"]


async def test_a_rate_limit_that_outlasts_the_deadline_fails_fast(fake_upstream: FakeUpstream) -> None:
    fake_upstream.add_faults(Fault("rate_limit", retry_after=60))
    lm = LMConfig(model="fake", settings=OpenAISettings(api_base=fake_upstream.url))
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(UpstreamRateLimitedError):
            await engine.predict("default", {"question": "q"})
        assert trio.current_time() - started < 1
        with trio.fail_after(5), pytest.raises(RateLimitWaitError, match="would pass the deadline"):
            await engine.predict("default", {"question": "the cool-down applies to the next request"})
    assert len(fake_upstream.records) == 1
