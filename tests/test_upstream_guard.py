"""The policies around each LM call, on the virtual clock with a seeded jitter source."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from dspy_trio.engine import (
    RateLimitWaitError,
    UpstreamConnectionError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from dspy_trio.engine._adaptive import AdaptiveSettings
from dspy_trio.engine._retry import RetryPolicy, seeded
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import Completion, GuardedLM
from dspy_trio.engine.testing import http_response

from .scripted_upstream import Scripted, guarded, openai_lm

OK = Completion(["done"], {"total_tokens": 30})


class Script:
    """An attempt function that fails with the scripted errors, in order, then succeeds."""

    def __init__(self, *errors: Exception, delay: float = 0.0, tokens: int = 0) -> None:
        self.errors = list(errors)
        self.delay = delay
        self.tokens = tokens
        self.started: list[float] = []

    async def __call__(self, sink: Any) -> Completion:
        self.started.append(trio.current_time())
        for _ in range(self.tokens):
            await sink.send("tok ")
        await trio.sleep(self.delay)
        if self.errors:
            raise self.errors.pop(0)
        return OK


def guard(**policy: Any) -> UpstreamGuard:
    retry = policy.pop("retry", RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=8.0))
    return UpstreamGuard("up", UpstreamPolicy(retry=retry, **policy), jitter=seeded(3))


def expected_waits(*ceilings: float) -> list[float]:
    uniform: Callable[[float, float], float] = seeded(3)
    return [uniform(0.0, c) for c in ceilings]


async def test_retryable_failures_are_retried_on_the_jittered_schedule(autojump_clock: Any) -> None:
    script = Script(UpstreamServerError("503"), UpstreamConnectionError("reset"))
    g = guard()
    assert await g.call(script, None, estimate=10) is OK
    w1, w2 = expected_waits(1.0, 2.0)
    assert script.started == pytest.approx([0, w1, w1 + w2])
    assert g.statistics().retries_by_cause == {"server_error": 1, "connection": 1}


async def test_non_retryable_failures_are_not_retried(autojump_clock: Any) -> None:
    script = Script(UpstreamResponseError("400"))
    with pytest.raises(UpstreamResponseError):
        await guard().call(script, None, estimate=10)
    assert len(script.started) == 1


async def test_retry_after_is_respected_to_the_millisecond(autojump_clock: Any) -> None:
    script = Script(UpstreamRateLimitedError("429", retry_after=1.234))
    g = guard(retry=RetryPolicy(max_attempts=2, base_delay=0.001))
    await g.call(script, None, estimate=10)
    assert script.started[1] - script.started[0] == pytest.approx(1.234, abs=1e-9)


async def test_a_wait_that_would_pass_the_deadline_fails_at_once(autojump_clock: Any) -> None:
    script = Script(UpstreamRateLimitedError("429", retry_after=30))
    start = trio.current_time()
    with trio.move_on_after(10), pytest.raises(UpstreamRateLimitedError):
        await guard().call(script, None, estimate=10)
    assert trio.current_time() == start, "gave up without sleeping"


async def test_one_429_holds_off_every_call_to_that_upstream(autojump_clock: Any) -> None:
    g = guard(retry=RetryPolicy(max_attempts=1))
    first = Script(UpstreamRateLimitedError("429", retry_after=2.5))
    with pytest.raises(UpstreamRateLimitedError):
        await g.call(first, None, estimate=10)
    assert g.statistics().cooldown_remaining == 2.5
    others = [Script() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for script in others:
            nursery.start_soon(functools.partial(g.call, script, None, estimate=10))
    assert [s.started for s in others] == [[2.5]] * 3
    assert g.statistics().rate_limit_wait_seconds == pytest.approx(7.5)


async def test_never_retry_after_tokens_reached_the_caller(autojump_clock: Any) -> None:
    class Sink:
        async def send(self, text: str) -> None:
            pass

    script = Script(UpstreamConnectionError("reset mid-stream"), tokens=3)
    with pytest.raises(UpstreamConnectionError):
        await guard().call(script, Sink(), estimate=10)
    assert len(script.started) == 1


async def test_a_call_streamed_upstream_that_nobody_reads_is_retried_after_tokens(
    autojump_clock: Any,
) -> None:
    """A call sent upstream as a stream without a consumer (``streamed``) is watched like a stream, but
    the tokens it heard reached nobody: a failure after them is retried."""
    script = Script(UpstreamConnectionError("reset mid-stream"), tokens=3)
    assert await guard().call(script, None, estimate=10, streamed=True) is OK
    assert len(script.started) == 2


async def test_attempt_timeout_cuts_an_attempt_and_retries(autojump_clock: Any) -> None:
    script = Script(delay=100.0)
    g = guard(attempt_timeout=5.0, retry=RetryPolicy(max_attempts=2, base_delay=0.0))
    with pytest.raises(UpstreamTimeoutError, match="no complete answer within 5s"):
        await g.call(script, None, estimate=10)
    assert script.started == [0, 5]
    assert trio.current_time() == 10


async def test_first_token_and_stall_timeouts_do_not_count_the_consumers_time(autojump_clock: Any) -> None:
    class SlowConsumer:
        async def send(self, text: str) -> None:
            await trio.sleep(50)  # far longer than the stall timeout: backpressure, not a stall

    class Stream:
        def __init__(self, gaps: list[float]) -> None:
            self.gaps = gaps

        async def __call__(self, sink: Any) -> Completion:
            for gap in self.gaps:
                await trio.sleep(gap)
                await sink.send("tok")
            return OK

    g = guard(first_token_timeout=2.0, stall_timeout=1.0, retry=RetryPolicy(max_attempts=1))
    assert await g.call(Stream([1.5, 0.5, 0.9]), SlowConsumer(), estimate=1) is OK
    with pytest.raises(UpstreamTimeoutError, match="no first token within 2s"):
        await g.call(Stream([3.0]), SlowConsumer(), estimate=1)
    with pytest.raises(UpstreamTimeoutError, match="stalled for 1s"):
        await g.call(Stream([0.1, 1.5]), SlowConsumer(), estimate=1)


async def test_the_retry_budget_stops_hammering_a_failing_upstream(autojump_clock: Any) -> None:
    g = guard(retry=RetryPolicy(max_attempts=5, base_delay=0.0, budget_ratio=0.1, budget_floor=2, window=60))
    attempts = 0
    for _ in range(20):
        script = Script(*[UpstreamServerError("503")] * 5)
        with pytest.raises(UpstreamServerError):
            await g.call(script, None, estimate=1)
        attempts += len(script.started)
    assert attempts == 20 + 2 + 2  # every request once, plus the floor, plus 10% of 20


async def test_rpm_counts_a_minute_and_tpm_is_corrected_with_real_usage(autojump_clock: Any) -> None:
    """60 a minute: 60 at once, the next as the first ones leave the 60-second window (a bucket's
    refill would have sent them at 1 s and 2 s: 62 within a minute)."""
    g = guard(rpm=60)
    scripts = [Script() for _ in range(62)]
    for script in scripts:
        await g.call(script, None, estimate=1)
    assert scripts[59].started == [0]
    assert [s.started[0] for s in scripts[60:]] == [60.0, 60.0]

    g = guard(tpm=600)
    await g.call(Script(), None, estimate=600)  # estimated the whole minute; used 30
    start = trio.current_time()
    await g.call(Script(), None, estimate=570)
    assert trio.current_time() == start, "the correction gave back the unused estimate"


async def test_rate_limit_waits_past_the_deadline_fail_fast(autojump_clock: Any) -> None:
    g = guard(rpm=1)
    await g.call(Script(), None, estimate=1)
    with trio.move_on_after(30), pytest.raises(RateLimitWaitError) as info:
        await g.call(Script(), None, estimate=1)
    assert info.value.retry_after == pytest.approx(60)
    assert trio.current_time() == 0


async def test_a_cool_down_past_the_deadline_raises_the_same_error_as_a_bucket(autojump_clock: Any) -> None:
    g = guard(retry=RetryPolicy(max_attempts=1))
    with pytest.raises(UpstreamRateLimitedError):
        await g.call(Script(UpstreamRateLimitedError("429", retry_after=30)), None, estimate=1)
    with trio.move_on_after(10), pytest.raises(RateLimitWaitError, match="would pass the deadline") as info:
        await g.call(Script(), None, estimate=1)
    assert info.value.retry_after == 30
    assert info.value.outcome == "rejected"
    assert trio.current_time() == 0


async def test_retry_after_of_a_503_is_honoured_like_a_429s(autojump_clock: Any) -> None:
    script = Script(UpstreamServerError("503", status=503, retry_after=1.0))
    g = guard(retry=RetryPolicy(max_attempts=2, base_delay=0.25))
    await g.call(script, None, estimate=10)
    assert script.started == [0.0, 1.0]


async def test_adaptive_limit_shrinks_on_429_and_is_visible(autojump_clock: Any) -> None:
    g = guard(adaptive=AdaptiveSettings(initial=8, minimum=2, maximum=16), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(UpstreamRateLimitedError):
        await g.call(Script(UpstreamRateLimitedError("429")), None, estimate=1)
    assert g.statistics().concurrency_limit == 4
    for _ in range(10):
        await g.call(Script(delay=0.1), None, estimate=1)
    assert 4 < (g.statistics().concurrency_limit or 0) < 8


async def test_a_cool_down_that_begins_while_calls_wait_for_quota_holds_them_too(
    autojump_clock: Any,
) -> None:
    """2 a minute, both taken at 0; a third call waits for quota. At 20 s one of the first answers 429
    with ``Retry-After: 50``: the waiting call must not go before 70 s, though its quota came sooner."""
    g = guard(rpm=2, retry=RetryPolicy(max_attempts=1))
    limited = Script(UpstreamRateLimitedError("429", retry_after=50.0), delay=20.0)
    waiting = Script()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_error, g, limited)
        nursery.start_soon(functools.partial(g.call, Script(), None, estimate=1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(functools.partial(g.call, waiting, None, estimate=1))
    assert limited.started == [0.0]
    assert waiting.started == [70.0]
    assert g.statistics().cooldown_remaining == 0


async def _expect_error(g: UpstreamGuard, script: Script) -> None:
    with pytest.raises(UpstreamRateLimitedError):
        await g.call(script, None, estimate=1)


async def test_a_quota_wait_that_leaves_the_call_no_time_is_refused_at_once(autojump_clock: Any) -> None:
    """1 a minute; calls take 2 s. A call at 2 s with its deadline at 60.5 s would get its quota at 60 s
    and then be cut by the deadline mid-call (a 504 after a wasted request): it is refused at once."""
    g = guard(rpm=1)
    await g.call(Script(delay=2.0), None, estimate=1)
    assert trio.current_time() == 2.0
    with trio.fail_after(58.5), pytest.raises(RateLimitWaitError) as info:
        await g.call(Script(delay=2.0), None, estimate=1)
    assert trio.current_time() == 2.0
    assert info.value.retry_after == 58.0
    with trio.fail_after(60.5):  # time for the call after the wait: it goes
        await g.call(Script(delay=2.0), None, estimate=1)
    assert trio.current_time() == 62.0


async def test_a_call_in_a_cancelled_scope_during_a_cool_down_is_cancelled_not_refused(
    autojump_clock: Any,
) -> None:
    g = guard(rpm=1, retry=RetryPolicy(max_attempts=1))
    await _expect_error(g, Script(UpstreamRateLimitedError("429", retry_after=5.0)))
    with trio.CancelScope() as scope:
        scope.cancel()
        await g.call(Script(), None, estimate=1)
    assert scope.cancelled_caught


@pytest.mark.parametrize(
    "failure",
    [UpstreamConnectionError("reset mid-stream"), UpstreamResponseError("the answer passed the cap")],
    ids=["cut", "refused"],
)
async def test_tokens_a_stream_delivered_before_it_failed_still_count(
    autojump_clock: Any, failure: Exception
) -> None:
    """600 tokens a minute. A stream is cut (or refused at the size cap) after it delivered tokens: the
    upstream produced them, so the window must keep at least the estimate (the engine cannot know more).
    Refunding them let the next 600-token call go at once: 1,200 tokens in the same minute."""

    class Sink:
        async def send(self, text: str) -> None:
            pass

    g = guard(tpm=600, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(type(failure)):
        await g.call(Script(failure, tokens=50), Sink(), estimate=600)
    with trio.move_on_after(30):  # the caller's deadline: the next call needs the minute to pass
        with pytest.raises(RateLimitWaitError):
            await g.call(Script(), None, estimate=600)
    assert trio.current_time() == 0


MESSAGES = [{"role": "user", "content": "What is Trio?"}]


async def test_an_infinite_retry_after_does_not_hang_a_call_without_deadline(autojump_clock: Any) -> None:
    """A 503 with ``Retry-After: inf`` to a call with no deadline: the call is retried (the wait is
    capped), not put to sleep forever (a backoff of max(jitter, inf) = inf, which no "past the deadline"
    check catches since inf > inf is False)."""
    script = Scripted(http_response(503, headers={"Retry-After": "inf"}, json={}))
    lm = guarded(openai_lm(script))
    answers: list[Any] = []

    async def call() -> None:
        answers.append(await lm.acall(messages=MESSAGES))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert answers == [["ok"]], f"still waiting after an hour; requests at {script.times}"


async def test_an_infinite_retry_after_does_not_block_the_upstream_forever(autojump_clock: Any) -> None:
    """The same header must not set the shared cool-down to +inf: a day later a call with a deadline is
    sent and answered, not refused with RateLimitWaitError with nothing ever sent to the upstream again."""
    script = Scripted(http_response(503, headers={"Retry-After": "inf"}, json={}))
    lm = guarded(openai_lm(script), attempts=1)
    with trio.move_on_after(10), pytest.raises(UpstreamServerError):
        await lm.acall(messages=MESSAGES)
    await trio.sleep(86400)
    with trio.fail_after(10):
        assert await lm.acall(messages=MESSAGES) == ["ok"]


async def test_an_overloaded_529_pushes_the_adaptive_limit_down(autojump_clock: Any) -> None:
    """Anthropic's 529 is "overloaded_error", as a 503 is: it pushes the adaptive limit down (16 -> 8)
    like a 429 or a timeout, instead of being an UpstreamServerError the limit never hears of."""
    script = Scripted(http_response(529, json={"error": {"message": "Overloaded"}}))
    lm = guarded(openai_lm(script), attempts=1, adaptive=AdaptiveSettings(initial=16))
    with pytest.raises(UpstreamServerError):
        await lm.acall(messages=MESSAGES)
    assert isinstance(lm, GuardedLM)
    assert isinstance(lm.guard, UpstreamGuard)
    assert lm.guard.statistics().concurrency_limit == 8


async def test_a_longer_retry_after_arriving_during_a_cool_down_is_honoured(autojump_clock: Any) -> None:
    """Calls A and B are sent at t=0. A's 429 says Retry-After 5; caller C arrives at t=0.5 and waits
    for the cool-down. At t=1, B's 429 says Retry-After 30. C is sent no earlier than t=31, not at
    t=5: a waiter looks again at a cool-down that grew while it slept (no storm at t=5 against an
    upstream that asked for 30 s)."""
    script = Scripted(
        http_response(429, headers={"Retry-After": "5"}, json={}),
        [1.0, http_response(429, headers={"Retry-After": "30"}, json={})],  # B's answer comes at t=1
    )
    sent = script.times
    lm = guarded(openai_lm(script), attempts=1)

    async def call_failing() -> None:
        with pytest.raises(Exception, match="429"):
            await lm.acall(messages=MESSAGES)

    async def late_call() -> None:
        await trio.sleep(0.5)
        assert await lm.acall(messages=MESSAGES) == ["ok"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call_failing)
        nursery.start_soon(call_failing)
        nursery.start_soon(late_call)
    assert sent[:2] == [0.0, 0.0]
    assert sent[2] >= 31.0, f"C was sent at t={sent[2]}"
