"""Token buckets, backoff, retry budget and AIMD on the virtual clock, with exact times."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from engine import RateLimitWaitError, UpstreamRateLimitedError, UpstreamServerError
from engine._adaptive import AdaptiveLimit, AdaptiveSettings
from engine._retry import RetryBudget, RetryPolicy, seeded
from engine._token_bucket import TokenBucket


async def test_bucket_refills_at_its_rate_and_waits_exactly(autojump_clock: Any) -> None:
    bucket = TokenBucket(60, burst=2)  # one a second
    start = trio.current_time()
    times = []
    for _ in range(5):
        await bucket.acquire()
        times.append(trio.current_time() - start)
    assert times == pytest.approx([0, 0, 1, 2, 3])
    assert bucket.waited == pytest.approx(3)


async def test_bucket_fails_at_once_when_the_wait_would_pass_the_deadline(autojump_clock: Any) -> None:
    bucket = TokenBucket(60, burst=1)
    await bucket.acquire()
    start = trio.current_time()
    with trio.fail_after(0.5), pytest.raises(RateLimitWaitError, match="would pass the deadline") as info:
        await bucket.acquire()
    assert info.value.retry_after == pytest.approx(1.0)
    assert trio.current_time() == start


async def test_a_request_larger_than_the_bucket_is_a_programming_error_not_a_deadline() -> None:
    bucket = TokenBucket(60, burst=1)
    with pytest.raises(ValueError, match="exceeds the bucket's capacity"):
        await bucket.acquire(5)


async def test_bucket_corrections_move_the_next_wait(autojump_clock: Any) -> None:
    bucket = TokenBucket(600, burst=100)  # 10 a second
    await bucket.acquire(100)  # an estimate
    bucket.adjust(-40)  # the real usage was 60
    assert bucket.level() == pytest.approx(40)
    bucket.adjust(+90)  # overdrawn
    assert bucket.level() == pytest.approx(-50)
    start = trio.current_time()
    await bucket.acquire(10)
    assert trio.current_time() - start == pytest.approx(6.0)


def test_backoff_is_full_jitter_capped_and_never_before_retry_after() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    jitter = seeded(7)
    error = UpstreamServerError("x")
    waits = [policy.backoff(n, error, jitter) for n in range(1, 6)]
    ceilings = [1, 2, 4, 5, 5]
    assert all(0 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert waits == pytest.approx(_draws(7, ceilings)), "the same seed gives the same schedule"
    limited = UpstreamRateLimitedError("429", retry_after=3.25)
    assert policy.backoff(1, limited, lambda a, b: 0.0) == 3.25
    assert policy.backoff(3, limited, lambda a, b: b) == 4.0


def _draws(seed: int, ceilings: list[int]) -> list[float]:
    uniform = seeded(seed)
    return [uniform(0.0, c) for c in ceilings]


async def test_retry_budget_limits_retries_to_a_share_of_recent_requests(autojump_clock: Any) -> None:
    budget = RetryBudget(RetryPolicy(budget_ratio=0.2, budget_floor=1, window=10))
    for _ in range(10):
        budget.record_request()
    granted = sum(budget.try_spend() for _ in range(10))
    assert granted == 3  # 1 + 0.2 * 10
    await trio.sleep(11)  # the window slides past all of it
    budget.record_request()
    assert budget.try_spend()
    assert not budget.try_spend()


async def test_aimd_grows_additively_and_halves_once_per_round(autojump_clock: Any) -> None:
    limit = AdaptiveLimit(AdaptiveSettings(initial=4, minimum=1, maximum=6, inflation=3.0))
    owners = [object() for _ in range(4)]
    calls = [await limit.acquire(owner) for owner in owners]
    for owner, call in zip(owners, calls, strict=True):
        limit.release(owner, call, latency=0.1, overloaded=False)
    expected = 4.0
    for _ in range(4):
        expected += 1 / expected
    assert limit.limit == pytest.approx(expected)
    grown = limit.limit
    # A round of three overloads halves the limit once, not three times.
    owners = [object() for _ in range(3)]
    calls = [await limit.acquire(owner) for owner in owners]
    for owner, call in zip(owners, calls, strict=True):
        limit.release(owner, call, latency=None, overloaded=True)
    assert limit.limit == pytest.approx(grown / 2)
    assert limit.decreases == 1
    # Latency inflation counts as overload too.
    owner = object()
    call = await limit.acquire(owner)
    limit.release(owner, call, latency=10.0, overloaded=False)
    assert limit.limit == pytest.approx(max(1, grown / 4))
    for _ in range(100):
        owner = object()
        call = await limit.acquire(owner)
        limit.release(owner, call, latency=0.1, overloaded=False)
    assert limit.limit == 6, "never above the maximum"
