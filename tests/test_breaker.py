"""The circuit breaker of one LM, alone and inside its upstream guard, on Trio's virtual clock: exact
transition times, half-open races, what counts as a failure, cancels at every stage."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine import (
    CircuitOpenError,
    ConfigError,
    UpstreamConnectionError,
    UpstreamContextWindowError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from dspy_trio.engine._breaker import BreakerSettings, CircuitBreaker, counts_against
from dspy_trio.engine._retry import RetryPolicy, seeded
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import Completion

OK = Completion(["done"], {"total_tokens": 3})
SETTINGS = BreakerSettings(failure_ratio=0.5, min_calls=4, window=10.0, open_for=5.0, half_open_calls=1)


def failure() -> UpstreamServerError:
    return UpstreamServerError("503", status=503)


async def call(breaker: CircuitBreaker, error: Exception | None = None) -> None:
    """One attempt through ``breaker`` that succeeds or fails with ``error`` at once."""
    ticket = await breaker.admit()
    if error is None:
        breaker.succeeded(ticket)
    else:
        assert isinstance(error, UpstreamServerError | UpstreamResponseError | UpstreamRateLimitedError)
        breaker.failed(ticket, error, error.retry_after)


async def at(when: float) -> None:
    await trio.sleep_until(when)


# --- transitions at exact times ----------------------------------------------------------------------


async def test_opens_at_the_failure_that_brings_the_ratio_to_the_threshold_with_min_calls(
    autojump_clock: Any,
) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    await call(breaker)  # t=0
    await at(1)
    await call(breaker, failure())
    await at(2)
    await call(breaker, failure())
    assert breaker.state == "closed"  # 2 of 3 calls failed, but fewer than min_calls
    await at(3)
    await call(breaker)
    await at(4)
    assert breaker.state == "closed"
    await call(breaker, failure())  # 3 of 5 failed: 0.6 >= 0.5
    assert breaker.state == "open"
    assert breaker.statistics().open_remaining == 5.0


async def test_failures_older_than_the_window_no_longer_count(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    for _ in range(3):
        await call(breaker, failure())  # t=0: 3 failures
    await at(10.0)  # (0, 10]: the failures of t=0 are out
    await call(breaker)
    await call(breaker)
    await call(breaker)
    await call(breaker, failure())  # 1 of 4
    assert breaker.state == "closed"
    assert breaker.statistics().calls == 4
    assert breaker.statistics().failures == 1


async def test_open_half_open_closed_at_exact_times(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    await at(3)
    for _ in range(4):
        await call(breaker, failure())
    assert breaker.state == "open"
    await at(7.999)
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.admit()
    assert refused.value.retry_after == pytest.approx(0.001)
    await at(8.0)  # opened at 3 for 5 s
    assert breaker.state == "half_open"
    probe = await breaker.admit()
    assert probe.probe
    with pytest.raises(CircuitOpenError):
        await breaker.admit()  # the one probe is out
    await at(8.5)
    breaker.succeeded(probe)
    assert breaker.state == "closed"
    assert (await breaker.admit()).probe is False


async def test_a_failed_probe_opens_it_again_for_open_for(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    for _ in range(4):
        await call(breaker, failure())
    await at(5.0)
    probe = await breaker.admit()
    await at(6.25)
    breaker.failed(probe, UpstreamConnectionError("refused"))
    assert breaker.state == "open"
    await at(11.249)
    assert breaker.state == "open"
    await at(11.25)
    assert breaker.state == "half_open"
    assert breaker.statistics().opened == 2


async def test_every_probe_must_succeed_to_close_it(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, half_open_calls=3))
    for _ in range(4):
        await call(breaker, failure())
    await at(5.0)
    probes = [await breaker.admit() for _ in range(3)]
    with pytest.raises(CircuitOpenError):
        await breaker.admit()
    breaker.succeeded(probes[0])
    breaker.succeeded(probes[1])
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpenError):
        await breaker.admit()  # two answered, one still out: no fourth probe
    breaker.failed(probes[2], failure())
    assert breaker.state == "open"


async def test_a_probe_that_never_answers_gives_its_place_to_another_after_open_for(
    autojump_clock: Any,
) -> None:
    """A probe whose call hangs (no attempt timeout, a caller without a deadline) must not hold the
    breaker half-open for ever: after ``open_for`` its place goes to a new probe."""
    breaker = CircuitBreaker("up", SETTINGS)
    for _ in range(4):
        await call(breaker, failure())
    await at(5.0)
    hung = await breaker.admit()
    await at(9.999)
    with pytest.raises(CircuitOpenError):
        await breaker.admit()
    await at(10.0)
    probe = await breaker.admit()
    assert probe.probe
    with pytest.raises(CircuitOpenError):
        await breaker.admit()
    breaker.succeeded(probe)
    assert breaker.state == "closed"
    breaker.release(hung)  # it ends at last (cancelled): nothing changes
    assert breaker.state == "closed"
    assert breaker._probes_out == 0


async def test_a_retry_after_opens_it_for_at_least_that_long(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)  # open_for 5
    ticket = await breaker.admit()
    breaker.failed(ticket, UpstreamRateLimitedError("429", retry_after=7.5), 7.5)
    assert breaker.state == "open"  # one call, yet open: the upstream said so
    await at(7.499)
    assert breaker.state == "open"
    await at(7.5)
    assert breaker.state == "half_open"


async def test_a_retry_after_longer_than_the_longest_allowed_counts_as_that(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS, longest_open=30.0)
    ticket = await breaker.admit()
    breaker.failed(ticket, UpstreamServerError("503", status=503, retry_after=1e9), 1e9)
    assert breaker.statistics().open_remaining == 30.0


async def test_a_retry_after_extends_an_open_breaker_but_never_shortens_it(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    old = await breaker.admit()
    for _ in range(4):
        await call(breaker, failure())
    assert breaker.statistics().open_remaining == 5.0
    breaker.failed(old, UpstreamRateLimitedError("429", retry_after=1.0), 1.0)  # a late answer
    assert breaker.statistics().open_remaining == 5.0
    breaker.failed(old, UpstreamRateLimitedError("429", retry_after=9.0), 9.0)
    assert breaker.statistics().open_remaining == 9.0
    assert breaker.statistics().opened == 1


# --- what counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (UpstreamServerError("500", status=500), True),
        (UpstreamServerError("529", status=529), True),
        (UpstreamRateLimitedError("429"), True),
        (UpstreamConnectionError("reset"), True),
        (UpstreamTimeoutError("slow"), True),
        (UpstreamResponseError("malformed JSON"), True),
        (UpstreamResponseError("400", status=400), False),
        (UpstreamResponseError("401", status=401), False),
        (UpstreamResponseError("403", status=403), False),
        (UpstreamResponseError("404", status=404), False),
        (UpstreamContextWindowError("too long", status=400), False),
    ],
)
def test_the_callers_own_errors_do_not_count(error: Any, counts: bool) -> None:
    assert counts_against(error) is counts


async def test_caller_errors_and_cancels_never_open_it(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, min_calls=1, failure_ratio=0.01))
    for _ in range(50):
        await call(breaker, UpstreamResponseError("400", status=400))
        breaker.release(await breaker.admit())  # cancelled
    assert breaker.state == "closed"
    assert breaker.statistics().calls == 0


async def test_a_cancelled_or_refused_probe_gives_its_place_back(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    for _ in range(4):
        await call(breaker, failure())
    await at(5.0)
    breaker.release(await breaker.admit())  # cancelled
    probe = await breaker.admit()
    breaker.failed(probe, UpstreamResponseError("401", status=401))  # the caller's problem
    probe = await breaker.admit()
    breaker.succeeded(probe)
    assert breaker.state == "closed"


async def test_a_late_answer_of_an_earlier_generation_changes_nothing(autojump_clock: Any) -> None:
    """An attempt let through while closed that fails after the breaker opened and half-opened is not
    a probe failure; one that succeeds then does not close it."""
    breaker = CircuitBreaker("up", SETTINGS)
    slow_fail, slow_ok = await breaker.admit(), await breaker.admit()
    for _ in range(4):
        await call(breaker, failure())
    await at(5.0)
    probe = await breaker.admit()
    breaker.failed(slow_fail, failure())
    breaker.succeeded(slow_ok)
    assert breaker.state == "half_open"
    breaker.succeeded(probe)
    assert breaker.state == "closed"


async def test_one_log_line_per_transition_none_per_call(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_trio.engine.breaker")
    breaker = CircuitBreaker("up", SETTINGS)
    for _ in range(4):
        await call(breaker, failure())  # the 4th opens it
    for _ in range(100):
        with pytest.raises(CircuitOpenError):
            await breaker.admit()
    await at(5.0)
    probe = await breaker.admit()
    for _ in range(100):
        with pytest.raises(CircuitOpenError):
            await breaker.admit()
    breaker.succeeded(probe)
    for _ in range(100):
        await call(breaker)
    lines = [r.getMessage() for r in caplog.records if r.name == "dspy_trio.engine.breaker"]
    assert len(lines) == 3, lines
    assert "open for 5s: 4 of 4 calls failed" in lines[0]
    assert "half-open" in lines[1]
    assert "closed" in lines[2]


# --- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("failure_ratio", 0, "must be positive"),
        ("failure_ratio", 1.5, "at most 1"),
        ("failure_ratio", math.nan, "finite"),
        ("min_calls", 0, "must be positive"),
        ("min_calls", 2.5, "integer"),
        ("window", -1.0, "must be positive"),
        ("window", math.inf, "finite"),
        ("open_for", 0.0, "must be positive"),
        ("half_open_calls", 0, "must be positive"),
        ("half_open_calls", True, "integer"),
        ("enabled", "yes", "enabled"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(field: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=field) as refused:
        BreakerSettings(**{field: value})
    assert words in refused.value.message


# --- inside the upstream guard -------------------------------------------------------------------------


class Upstream:
    """An attempt function: answers ``OK`` after ``delay``, or raises what ``errors`` holds next."""

    def __init__(self, *errors: Exception | None, delay: float = 0.0) -> None:
        self.errors = list(errors)
        self.delay = delay
        self.started: list[float] = []

    async def __call__(self, sink: Any) -> Completion:
        self.started.append(trio.current_time())
        await trio.sleep(self.delay)
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return OK


def guarded(breaker: CircuitBreaker, attempts: int = 3, **policy: Any) -> UpstreamGuard:
    retry = RetryPolicy(max_attempts=attempts, base_delay=1.0, max_delay=8.0)
    return UpstreamGuard("up", UpstreamPolicy(retry=retry, **policy), jitter=seeded(3), breaker=breaker)


async def test_an_open_breaker_fails_the_call_before_any_wait_and_sends_nothing(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, min_calls=1, failure_ratio=1.0))
    guard = guarded(breaker, attempts=1, rpm=1)  # the one request of the minute is used below
    upstream = Upstream(failure())
    with pytest.raises(UpstreamServerError):
        await guard.call(upstream, None, estimate=1)
    with pytest.raises(CircuitOpenError):
        await guard.call(upstream, None, estimate=1)  # no wait for the quota's next minute
    assert trio.current_time() == 0.0
    assert len(upstream.started) == 1


async def test_once_the_breaker_opens_a_failed_attempt_is_not_retried(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, min_calls=2, failure_ratio=1.0))
    guard = guarded(breaker, attempts=5)
    upstream = Upstream(failure(), failure(), failure(), failure())
    with pytest.raises(UpstreamServerError):
        await guard.call(upstream, None, estimate=1)
    assert len(upstream.started) == 2  # the second failure opened it: no third attempt
    assert breaker.state == "open"


async def test_a_probe_is_one_attempt_never_retried(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, min_calls=1, failure_ratio=1.0))
    guard = guarded(breaker, attempts=5)
    upstream = Upstream(failure(), failure(), failure())
    with pytest.raises(UpstreamServerError):
        await guard.call(upstream, None, estimate=1)
    await at(5.0)
    with pytest.raises(UpstreamServerError):
        await guard.call(upstream, None, estimate=1)
    assert upstream.started == [0.0, 5.0]
    assert breaker.state == "open"


async def test_a_429_with_retry_after_opens_the_breaker_instead_of_waiting(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", SETTINGS)
    guard = guarded(breaker, attempts=3)
    upstream = Upstream(UpstreamRateLimitedError("429", retry_after=2.0))
    with pytest.raises(UpstreamRateLimitedError):
        await guard.call(upstream, None, estimate=1)
    assert trio.current_time() == 0.0  # not retried after 2 s: failed now, so the call can fall back
    assert breaker.statistics().open_remaining == 2.0
    await at(2.0)
    assert await guard.call(upstream, None, estimate=1) is OK
    assert breaker.state == "closed"


async def test_half_open_race_only_half_open_calls_reach_the_upstream(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, min_calls=1, failure_ratio=1.0, half_open_calls=3))
    guard = guarded(breaker, attempts=1)
    with pytest.raises(UpstreamServerError):
        await guard.call(Upstream(failure()), None, estimate=1)
    upstream = Upstream(delay=1.0)
    refused: list[float] = []

    async def one() -> None:
        try:
            await guard.call(upstream, None, estimate=1)
        except CircuitOpenError:
            refused.append(trio.current_time())

    await at(5.0)
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    assert len(upstream.started) == 3
    assert len(refused) == 97
    assert refused == [5.0] * 97
    assert breaker.state == "closed"
    assert trio.current_time() == 6.0


async def test_a_timeout_of_a_stalled_upstream_counts(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("up", attrs.evolve(SETTINGS, min_calls=2, failure_ratio=1.0))
    guard = guarded(breaker, attempts=3, attempt_timeout=1.0)
    with pytest.raises(UpstreamTimeoutError):
        await guard.call(Upstream(delay=math.inf), None, estimate=1)
    assert breaker.state == "open"
    assert trio.current_time() == pytest.approx(1.0 + seeded(3)(0.0, 1.0) + 1.0)


@attrs.frozen
class Plan:
    outcomes: tuple[str, ...]  # per call: ok, fail, caller, hang
    starts: tuple[float, ...]
    cancels: tuple[float | None, ...]
    half_open_calls: int


plans = st.integers(1, 8).flatmap(
    lambda n: st.builds(
        Plan,
        outcomes=st.lists(st.sampled_from(["ok", "fail", "caller", "hang"]), min_size=n, max_size=n).map(
            tuple
        ),
        starts=st.lists(st.sampled_from([0.0, 0.5, 1.0, 5.0, 5.25, 6.0]), min_size=n, max_size=n).map(tuple),
        cancels=st.lists(st.sampled_from([None, 0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n).map(tuple),
        half_open_calls=st.integers(1, 3),
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans)
def test_cancels_at_any_stage_leave_no_probe_taken(plan: Plan) -> None:
    """Calls through a guard whose breaker opens at t=0 (one failure) and half-opens at t=5, each
    cancelled at any moment or not: afterwards no probe place is lost (the breaker admits again), and
    never more than ``half_open_calls`` probes were out at once."""

    async def main() -> None:
        settings_ = BreakerSettings(
            min_calls=1, failure_ratio=1.0, open_for=5.0, half_open_calls=plan.half_open_calls
        )
        breaker = CircuitBreaker("up", settings_)
        guard = UpstreamGuard(
            "up", UpstreamPolicy(retry=RetryPolicy(max_attempts=2, base_delay=0.5)), breaker=breaker
        )
        with pytest.raises(UpstreamServerError):
            await guard.call(Upstream(failure()), None, estimate=1)
        most_out = 0

        async def attempt_for(outcome: str) -> Any:
            async def attempt(sink: Any) -> Completion:
                nonlocal most_out
                most_out = max(most_out, breaker._probes_out)
                await trio.sleep(0.5)
                if outcome == "fail":
                    raise failure()
                if outcome == "caller":
                    raise UpstreamResponseError("400", status=400)
                if outcome == "hang":
                    await trio.sleep_forever()
                return OK

            return attempt

        async def one(index: int) -> None:
            await trio.sleep(plan.starts[index])
            attempt = await attempt_for(plan.outcomes[index])
            with trio.move_on_after(plan.cancels[index] if plan.cancels[index] is not None else 3.0):
                with contextlib.suppress(CircuitOpenError, UpstreamServerError, UpstreamResponseError):
                    await guard.call(attempt, None, estimate=1)

        async with trio.open_nursery() as nursery:
            for index in range(len(plan.outcomes)):
                nursery.start_soon(one, index)
        assert most_out <= plan.half_open_calls
        assert breaker._probes_out == 0
        await trio.sleep_until(max(trio.current_time(), 20.0))  # any opening has ended
        ticket = await breaker.admit()  # a place is free: nothing leaked
        breaker.succeeded(ticket)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_calls_an_open_breaker_refused_are_not_requests_of_the_retry_budget(
    autojump_clock: Any,
) -> None:
    """Retries may be a share of the requests sent upstream; calls the open breaker failed at once were
    never sent, so they must not buy retries for later."""
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, budget_floor=0, budget_ratio=0.3)
    breaker = CircuitBreaker("up", SETTINGS)
    guard = UpstreamGuard("up", UpstreamPolicy(retry=retry), breaker=breaker)
    with pytest.raises(UpstreamRateLimitedError):
        await guard.call(Upstream(UpstreamRateLimitedError("429", retry_after=1.0)), None, estimate=1)
    for _ in range(10):
        with pytest.raises(CircuitOpenError):
            await guard.call(Upstream(), None, estimate=1)
    await at(1.0)
    assert await guard.call(Upstream(), None, estimate=1) is OK  # the probe closes it
    upstream = Upstream(failure(), None)
    with pytest.raises(UpstreamServerError):
        await guard.call(upstream, None, estimate=1)  # 3 requests sent: 0.3 x 3 leaves no retry
    assert len(upstream.started) == 1


# --- breakers of several processes sharing their probes (an in-memory cluster) -------------------------


class FakeCluster:
    """What Redis does for the breakers of one LM in several processes: probe counters that expire
    ``ttl`` after their first place (a claim's reply takes ``round_trip``; a claim cancelled while its
    reply is on its way keeps its place, as with Redis), and broadcasts heard after ``round_trip``."""

    def __init__(self, nursery: trio.Nursery, round_trip: float = 0.0) -> None:
        self.nursery = nursery
        self.round_trip = round_trip
        self.breakers: list[CircuitBreaker] = []
        self.counters: dict[str, tuple[int, float]] = {}  # epoch -> (taken, expires)
        self.epochs = 0
        self.out = 0  # probes let through and not ended, in every process
        self.most_out = 0

    def peers(self, index: int) -> FakePeers:
        return FakePeers(self, index)

    def taken(self, epoch: str) -> int:
        taken, expires = self.counters.get(epoch, (0, math.inf))
        return taken if trio.current_time() < expires else 0

    def tell(self, sender: int, hear: Any) -> None:
        async def deliver() -> None:
            await trio.sleep(self.round_trip)
            for index, breaker in enumerate(self.breakers):
                if index != sender:
                    hear(breaker)

        self.nursery.start_soon(deliver)


class FakePeers:
    def __init__(self, cluster: FakeCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index

    def new_epoch(self) -> str:
        self.cluster.epochs += 1
        return f"{self.index}:{self.cluster.epochs}"

    def opened(self, until: float, epoch: str) -> None:
        self.cluster.tell(self.index, lambda breaker: breaker.heard_open(until, epoch))

    def probe_succeeded(self, epoch: str) -> None:
        self.cluster.tell(self.index, lambda breaker: breaker.heard_probe_succeeded(epoch))

    def closed(self, epoch: str) -> None:
        self.cluster.counters.pop(epoch, None)

    async def claim_probe(self, epoch: str, limit: int, ttl: float) -> bool:
        cluster = self.cluster
        taken = cluster.taken(epoch) + 1
        expires = cluster.counters[epoch][1] if taken > 1 else trio.current_time() + ttl
        cluster.counters[epoch] = (taken, expires)
        await trio.sleep(cluster.round_trip)
        return taken <= limit

    def release_probe(self, epoch: str) -> None:
        taken, expires = self.cluster.counters.get(epoch, (0, math.inf))
        if taken > 0:
            self.cluster.counters[epoch] = (taken - 1, expires)


async def test_a_transition_during_a_probes_claim_sends_nothing_to_an_open_upstream(
    autojump_clock: Any,
) -> None:
    """A half-open breaker claims a probe's place from the cluster (a round-trip); another process's
    probe fails meanwhile and the opening is heard: the claimed call must fail fast, not go out as a
    probe of the opening before."""
    settings_ = attrs.evolve(SETTINGS, min_calls=1, failure_ratio=1.0)
    async with trio.open_nursery() as nursery:
        cluster = FakeCluster(nursery, round_trip=0.1)
        breaker = CircuitBreaker("up", settings_, peers=cluster.peers(0))
        cluster.breakers.append(breaker)
        guard = guarded(breaker, attempts=1)
        with pytest.raises(UpstreamServerError):
            await guard.call(Upstream(failure()), None, estimate=1)
        await at(5.0)
        assert breaker.state == "half_open"

        async def heard_meanwhile() -> None:
            await trio.sleep(0.05)
            breaker.heard_open(trio.current_time() + 5.0, "1:99")

        nursery.start_soon(heard_meanwhile)
        upstream = Upstream()
        with pytest.raises(CircuitOpenError):
            await guard.call(upstream, None, estimate=1)
        assert upstream.started == []
        assert breaker.state == "open"
        assert cluster.taken(breaker.epoch) == 0


@attrs.frozen
class ClusterPlan:
    processes: int
    outcomes: tuple[str, ...]  # per call: ok, fail, caller, hang
    where: tuple[int, ...]  # the process of each call
    starts: tuple[float, ...]
    cancels: tuple[float | None, ...]
    half_open_calls: int
    round_trip: float


cluster_plans = st.integers(1, 12).flatmap(
    lambda n: st.builds(
        ClusterPlan,
        processes=st.integers(2, 3),
        outcomes=st.lists(st.sampled_from(["ok", "fail", "caller", "hang"]), min_size=n, max_size=n).map(
            tuple
        ),
        where=st.lists(st.integers(0, 2), min_size=n, max_size=n).map(tuple),
        starts=st.lists(st.sampled_from([0.0, 5.0, 5.0, 5.05, 5.1, 5.5, 6.0]), min_size=n, max_size=n).map(
            tuple
        ),
        cancels=st.lists(st.sampled_from([None, 0.0, 0.05, 0.1, 0.5]), min_size=n, max_size=n).map(tuple),
        half_open_calls=st.integers(1, 3),
        round_trip=st.sampled_from([0.0, 0.1]),
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=cluster_plans)
def test_concurrent_calls_in_several_processes_never_probe_more_than_half_open_calls(
    plan: ClusterPlan,
) -> None:
    """Several processes' breakers of one LM, opened together at t=0 and half-open at t=5, take calls
    that succeed, fail, hang or are the caller's fault, each cancelled at any moment (a claim's
    round-trip included) or not: never more than ``half_open_calls`` probes are out at once across the
    processes, and afterwards none is stuck (each admits a call once any opening has ended)."""

    async def main() -> None:
        settings_ = BreakerSettings(
            min_calls=1, failure_ratio=1.0, open_for=5.0, half_open_calls=plan.half_open_calls
        )
        async with trio.open_nursery() as nursery:
            cluster = FakeCluster(nursery, round_trip=plan.round_trip)
            breakers = [
                CircuitBreaker("up", settings_, peers=cluster.peers(i)) for i in range(plan.processes)
            ]
            cluster.breakers.extend(breakers)
            guards = [
                UpstreamGuard(
                    "up", UpstreamPolicy(retry=RetryPolicy(max_attempts=2, base_delay=0.5)), breaker=b
                )
                for b in breakers
            ]
            with pytest.raises(UpstreamServerError):
                await guards[0].call(Upstream(failure()), None, estimate=1)
            await trio.sleep(plan.round_trip)  # every process heard the opening

            def attempt_for(outcome: str, breaker: CircuitBreaker) -> Any:
                async def attempt(sink: Any) -> Completion:
                    probe = breaker.state != "closed"
                    if probe:
                        cluster.out += 1
                        cluster.most_out = max(cluster.most_out, cluster.out)
                    try:
                        await trio.sleep(0.5)
                        if outcome == "fail":
                            raise failure()
                        if outcome == "caller":
                            raise UpstreamResponseError("400", status=400)
                        if outcome == "hang":
                            await trio.sleep_forever()
                        return OK
                    finally:
                        if probe:
                            cluster.out -= 1

                return attempt

            async def one(index: int) -> None:
                await trio.sleep(plan.starts[index])
                process = plan.where[index] % plan.processes
                attempt = attempt_for(plan.outcomes[index], breakers[process])
                cancel = plan.cancels[index]
                with trio.move_on_after(cancel if cancel is not None else 3.0):
                    with contextlib.suppress(CircuitOpenError, UpstreamServerError, UpstreamResponseError):
                        await guards[process].call(attempt, None, estimate=1)

            async with trio.open_nursery() as calls:
                for index in range(len(plan.outcomes)):
                    calls.start_soon(one, index)
            assert cluster.most_out <= plan.half_open_calls
            for breaker in breakers:
                assert breaker._probes_out == 0
            await trio.sleep_until(max(trio.current_time(), 30.0))  # any opening, any place has ended
            for breaker in breakers:
                ticket = await breaker.admit()  # a place is free: nothing leaked, nothing stuck
                breaker.succeeded(ticket)
                await trio.sleep(plan.round_trip + 0.01)  # the others hear of it
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
