"""The RPM/TPM window, backoff, retry budget and AIMD on the virtual clock, with exact times."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from dspy_trio.engine import RateLimitWaitError, UpstreamRateLimitedError, UpstreamServerError
from dspy_trio.engine._adaptive import AdaptiveLimit, AdaptiveSettings
from dspy_trio.engine._rate_window import LocalQuota
from dspy_trio.engine._retry import RetryBudget, RetryPolicy, seeded


async def test_the_quota_is_granted_at_once_then_as_the_window_slides(autojump_clock: Any) -> None:
    """2 a minute: two at once, then each as the one granted 60 s before it leaves the window."""
    quota = LocalQuota("up", rpm=2, tpm=None)
    times = []
    for _ in range(5):
        (await quota.acquire(0)).commit()
        times.append(trio.current_time())
    assert times == [0, 0, 60, 60, 120]
    assert quota.waited == 120


async def test_a_wait_that_would_pass_the_deadline_is_refused_at_once(autojump_clock: Any) -> None:
    quota = LocalQuota("up", rpm=1, tpm=None)
    await quota.acquire(0)
    await trio.sleep(20)
    with trio.fail_after(39.5), pytest.raises(RateLimitWaitError, match="would pass the deadline") as info:
        await quota.acquire(0)
    assert info.value.retry_after == 40
    assert trio.current_time() == 20
    with trio.fail_after(40.5):  # the wait ends before the deadline
        await quota.acquire(0)
    assert trio.current_time() == 60


async def test_a_wait_that_leaves_the_call_no_time_is_refused_at_once(autojump_clock: Any) -> None:
    """``then``: the call after the wait must fit before the deadline too; without a wait it is not
    the quota's business."""
    quota = LocalQuota("up", rpm=1, tpm=None)
    with trio.fail_after(1):
        await quota.acquire(0, then=5)  # no wait: granted
    with trio.fail_after(62), pytest.raises(RateLimitWaitError) as info:
        await quota.acquire(0, then=5)
    assert info.value.retry_after == 60
    with trio.fail_after(65.5):
        await quota.acquire(0, then=5)
    assert trio.current_time() == 60


async def test_token_corrections_move_the_next_wait(autojump_clock: Any) -> None:
    quota = LocalQuota("up", rpm=None, tpm=100)
    grant = await quota.acquire(100)  # an estimate
    grant.commit(60)  # the real usage
    assert quota.log.tokens == 60
    await quota.acquire(40)
    assert trio.current_time() == 0
    await trio.sleep(10)
    await quota.acquire(10)
    assert trio.current_time() == 60  # the first call's 60 leave the window


async def test_a_refund_gives_back_the_request_and_its_tokens_once(autojump_clock: Any) -> None:
    quota = LocalQuota("up", rpm=2, tpm=100)
    grant = await quota.acquire(50)
    grant.refund()
    grant.refund()
    grant.commit(10)
    assert (quota.log.requests, quota.log.tokens) == (0, 0)
    await quota.acquire(100)
    await quota.acquire(0)
    assert trio.current_time() == 0


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


async def test_a_wait_asked_for_in_a_cancelled_scope_is_a_cancel_not_a_refusal(autojump_clock: Any) -> None:
    """A cancelled scope's deadline is -inf: any wait "would pass it", but the caller was cancelled, not
    refused (a refusal is booked ``rejected`` and escapes the cancelled scope)."""
    quota = LocalQuota("up", rpm=1, tpm=None)
    await quota.acquire(0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await quota.acquire(0)
    assert scope.cancelled_caught
    assert quota.log.requests == 1
