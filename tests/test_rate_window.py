"""The shape of the RPM/TPM limits (engine/_rate_window.py), as the upstream sees it through the guard,
on random schedules (hypothesis, ``MockClock(autojump_threshold=0)``, a fresh ``trio.run`` per example).

Clients arrive at random virtual times with random token estimates, real usages, call durations,
deadlines and cancels; some calls fail, some answer 429 with a ``Retry-After``. Whatever happens:

- in every 60-second window the upstream sees at most ``rpm`` requests and ``tpm`` tokens (a request
  counts from the instant it was sent, with the tokens it really used; 0 for a failed attempt; its
  estimate when it was cancelled mid-call);
- no call is sent during a cool-down that an earlier answer asked for;
- nothing leaks and nothing is charged twice: the window's totals at the end are exactly what the
  upstream saw in the last 60 seconds (grants not merged, so that every grant keeps its own time);
- a client that sends at exactly the quota's pace is never delayed.

The same shape through Redis is tested against the Lua script in tests/test_cluster_limits.py.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine import RateLimitWaitError, UpstreamRateLimitedError, UpstreamServerError, _rate_window
from dspy_trio.engine._rate_window import LocalQuota
from dspy_trio.engine._retry import RetryPolicy
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import Completion

WINDOW = 60.0


@attrs.frozen
class Client:
    arrival: float
    estimate: int
    used: int  # 1..estimate: the guard takes a usage of 0 as "unknown" (the estimate stands)
    duration: float
    deadline: float | None  # seconds after arrival
    cancel_after: float | None  # seconds after arrival
    answer: str  # "ok", "error" (500) or "429"
    retry_after: float


def clients(tpm: int | None) -> st.SearchStrategy[list[Client]]:
    most = tpm or 500

    @st.composite
    def one(draw: st.DrawFn) -> Client:
        estimate = draw(st.integers(1, most))
        return Client(
            arrival=draw(st.integers(0, 240).map(lambda n: n / 2)),
            estimate=estimate,
            used=draw(st.integers(1, estimate)),
            duration=draw(st.sampled_from([0.0, 0.5, 3.0, 30.0, 75.0])),
            deadline=draw(st.none() | st.integers(0, 200).map(lambda n: n / 2)),
            cancel_after=draw(st.none() | st.integers(0, 200).map(lambda n: n / 2)),
            answer=draw(st.sampled_from(["ok", "ok", "ok", "error", "429"])),
            retry_after=draw(st.sampled_from([0.5, 10.0, 45.0])),
        )

    return st.lists(one(), min_size=1, max_size=24)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int | None, int | None, list[Client]]:
    rpm = draw(st.none() | st.integers(1, 8))
    tpm = draw(st.integers(100, 2000)) if rpm is None else draw(st.none() | st.integers(100, 2000))
    return rpm, tpm, draw(clients(tpm))


@attrs.define
class Seen:
    """What the upstream saw: each request's send time and the tokens it used, and the cool-downs."""

    sends: list[list[float]] = attrs.Factory(list)
    cooldowns: list[tuple[float, float]] = attrs.Factory(list)


def run(rpm: int | None, tpm: int | None, schedule: list[Client]) -> tuple[Seen, UpstreamGuard, float]:
    seen = Seen()
    guard_box: list[UpstreamGuard] = []

    async def client(guard: UpstreamGuard, c: Client) -> None:
        await trio.sleep_until(c.arrival)

        async def attempt(sink: Any) -> Completion:
            record = [trio.current_time(), float(c.estimate)]  # sent; the estimate until it ends
            seen.sends.append(record)
            await trio.sleep(c.duration)
            if c.answer == "error":
                record[1] = 0.0
                raise UpstreamServerError("boom", status=500)
            if c.answer == "429":
                record[1] = 0.0
                seen.cooldowns.append((trio.current_time(), trio.current_time() + c.retry_after))
                raise UpstreamRateLimitedError("slow down", retry_after=c.retry_after)
            record[1] = float(c.used)
            return Completion(["ok"], {"total_tokens": c.used})

        deadline = c.arrival + c.deadline if c.deadline is not None else float("inf")
        with trio.CancelScope(deadline=deadline) as scope:
            async with trio.open_nursery() as nursery:
                if c.cancel_after is not None:

                    async def cancel_later() -> None:
                        await trio.sleep(c.cancel_after)  # type: ignore[arg-type]
                        scope.cancel()

                    nursery.start_soon(cancel_later)
                with contextlib.suppress(RateLimitWaitError, UpstreamServerError, UpstreamRateLimitedError):
                    await guard.call(attempt, None, estimate=c.estimate)
                nursery.cancel_scope.cancel()

    async def main() -> float:
        policy = UpstreamPolicy(rpm=rpm, tpm=tpm, retry=RetryPolicy(max_attempts=1))
        guard = UpstreamGuard("up", policy)
        guard_box.append(guard)
        async with trio.open_nursery() as nursery:
            for c in schedule:
                nursery.start_soon(client, guard, c)
        return trio.current_time()

    end = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return seen, guard_box[0], end


def assert_within_limits(sends: list[list[float]], rpm: int | None, tpm: int | None) -> None:
    times = sorted(sends)
    for i, (start, _) in enumerate(times):
        window = [tokens for at, tokens in times[i:] if at < start + WINDOW]
        if rpm is not None:
            assert len(window) <= rpm, f"{len(window)} requests from {start} s: {times}"
        if tpm is not None:
            assert sum(window) <= tpm, f"{sum(window)} tokens from {start} s: {times}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules())
def test_the_upstream_never_sees_more_than_the_quota_in_any_minute(
    schedule: tuple[int | None, int | None, list[Client]],
) -> None:
    rpm, tpm, clients_ = schedule
    seen, _, _ = run(rpm, tpm, clients_)
    assert_within_limits(seen.sends, rpm, tpm)
    for start, end in seen.cooldowns:
        assert not [at for at, _ in seen.sends if start < at < end], (
            f"sent during the cool-down {start}-{end}"
        )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules())
def test_no_grant_leaks_and_none_is_charged_twice(
    schedule: tuple[int | None, int | None, list[Client]],
) -> None:
    """Every grant settled once: refunded when never sent, else charged what the upstream saw."""
    rpm, tpm, clients_ = schedule
    with mock.patch.object(_rate_window, "merge_gap", return_value=0.0):
        seen, guard, end = run(rpm, tpm, clients_)
    quota = guard._quota
    assert isinstance(quota, LocalQuota)
    quota.log.expire(end)
    recent = [tokens for at, tokens in seen.sends if at + WINDOW > end]
    assert quota.log.requests == len(recent)
    assert abs(quota.log.tokens - sum(recent)) < 1e-6


@settings(max_examples=40, deadline=None)
@given(
    rpm=st.integers(1, 1000),
    phase=st.integers(0, 100).map(lambda n: n / 10),
    tokens_each=st.none() | st.integers(1, 50),
    duration_share=st.sampled_from([0.0, 0.5, 0.99]),
)
def test_a_client_at_exactly_the_quota_pace_is_never_delayed(
    rpm: int, phase: float, tokens_each: int | None, duration_share: float
) -> None:
    """``rpm`` requests a minute, one every 60/rpm seconds, each using ``tokens_each`` of a TPM quota of
    exactly rpm * tokens_each: three minutes of it, and not one request waits."""
    tpm = rpm * tokens_each if tokens_each is not None else None
    interval = WINDOW / rpm
    count = min(3 * rpm, 600)
    delays: list[float] = []

    async def main() -> None:
        guard = UpstreamGuard("up", UpstreamPolicy(rpm=rpm, tpm=tpm))

        async def one(k: int) -> None:
            arrival = phase + k * interval
            await trio.sleep_until(arrival)

            async def attempt(sink: Any) -> Completion:
                delays.append(trio.current_time() - arrival)
                await trio.sleep(interval * duration_share)
                return Completion(["ok"], {"total_tokens": tokens_each or 1})

            await guard.call(attempt, None, estimate=tokens_each or 1)

        async with trio.open_nursery() as nursery:
            for k in range(count):
                nursery.start_soon(one, k)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(delays) == count
    assert max(delays) <= 1e-9  # float rounding of k * 60 / rpm only
