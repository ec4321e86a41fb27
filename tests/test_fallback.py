"""Fallback chains in the engine, on Trio's virtual clock with scripted backends: when a call falls back
and when it must not, deadlines and cancels across the chain, streams before and after their first
delta, the fallback's own limits, and what the result says about who answered."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from dspy_trio.engine import (
    BreakerSettings,
    CallTimeouts,
    CircuitOpenError,
    Engine,
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    LMCall,
    LMConfig,
    Price,
    ProgramSpec,
    RateLimit,
    RateLimitWaitError,
    RetryPolicy,
    SkippedLM,
    UpstreamConnectionError,
    UpstreamContextWindowError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine import EngineError as EngineErrorType
from dspy_trio.engine.lm import Completion, DeltaSink, SimulatedLM
from dspy_trio.engine.lm._base import Message

from .helpers import tasks_living

QUESTION = {"question": "What is Trio?"}
FAIL_AFTER = 0.5  # a scripted failure comes this long after the call


class Scripted(SimulatedLM):
    """The simulated LM (its answer's first token after ``latency``, the rest at once), or, while
    ``steps`` holds any, the next step: an exception raised ``FAIL_AFTER`` seconds into the call,
    ``"hang"``, or ``(tokens, exception)``: that many tokens streamed, then the exception."""

    def __init__(self, model: str, *, latency: float = 1.0, **params: Any) -> None:
        super().__init__(model, first_token_delay=latency, token_delay=0.0, words_per_field=4, **params)
        self.steps: list[Any] = []
        self.calls: list[float] = []
        self.ended: list[float] = []
        self.params_seen: list[dict[str, Any]] = []

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        self.calls.append(trio.current_time())
        self.params_seen.append(dict(params))
        try:
            step = self.steps.pop(0) if self.steps else None
            if step == "hang":
                await trio.sleep_forever()
            if isinstance(step, BaseException):
                await trio.sleep(FAIL_AFTER)
                raise step
            if isinstance(step, tuple):
                tokens, error = step
                assert sink is not None
                for token in self.tokens(self.render(messages))[:tokens]:
                    await trio.sleep(0.1)
                    await sink.send(token)
                raise error
            return await super().complete(messages, params, sink)
        finally:
            self.ended.append(trio.current_time())


def failures(error: Exception, count: int) -> list[Exception]:
    return [error] * count


def server_error() -> UpstreamServerError:
    return UpstreamServerError("primary: 503", status=503)


def config(
    *,
    breaker: BreakerSettings | None = None,
    backup_breaker: BreakerSettings | None = None,
    attempts: int = 2,
    backup_attempts: int = 2,
    on_context_window: bool = False,
    backup_rpm: float | None = None,
    third: bool = False,
) -> EngineConfig:
    # base_delay 0: retries go at once, so every time below is exact.
    retry = RetryPolicy(max_attempts=attempts, base_delay=0.0, max_delay=0.0)
    backup_retry = RetryPolicy(max_attempts=backup_attempts, base_delay=0.0, max_delay=0.0)
    lms = {
        "primary": LMConfig(
            model="primary-model",
            fallbacks=("backup",),
            retry=retry,
            breaker=breaker or BreakerSettings(min_calls=100),
            fallback_on_context_window=on_context_window,
        ),
        "backup": LMConfig(
            model="backup-model",
            retry=backup_retry,
            breaker=backup_breaker,
            fallbacks=("third",) if third else (),
            rate_limit=RateLimit(rpm=backup_rpm),
        ),
    }
    if third:
        lms["third"] = LMConfig(model="third-model")
    return EngineConfig(lms=lms, programs={"default": ProgramSpec("question -> answer", lm="primary")})


@asynccontextmanager
async def engine_with(
    cfg: EngineConfig, **backends: Scripted
) -> AsyncIterator[tuple[Engine, dict[str, Scripted]]]:
    given = {name: backends.get(name) or Scripted(f"{name}-model") for name in cfg.lms}
    async with open_engine(cfg, lms=given) as engine:
        yield engine, given


def fallbacks(engine: Engine) -> dict[tuple[str, str, str], int]:
    return dict(engine.statistics().fallbacks)


# --- when a call falls back -------------------------------------------------------------------------


async def test_a_503_falls_back_after_the_primarys_own_retries(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 2)
    async with engine_with(config(), primary=primary) as (engine, lms):
        result = await engine.predict("default", QUESTION)
    assert primary.calls == [0.0, FAIL_AFTER]  # two attempts, then the backup
    assert lms["backup"].calls == [2 * FAIL_AFTER]
    assert result.timings.total == 2 * FAIL_AFTER + 1.0
    assert result.lm_calls == (
        LMCall(
            lm="backup",
            model="backup-model",
            seconds=2 * FAIL_AFTER + 1.0,
            prompt_tokens=result.lm_calls[0].prompt_tokens,
            completion_tokens=result.lm_calls[0].completion_tokens,
            skipped=(SkippedLM("primary", "server_error"),),
        ),
    )
    assert result.lm_calls[0].prompt_tokens > 0
    assert result.lms == ("backup",)
    assert set(result.usage.by_model) == {"backup-model"}  # usage is the answering model's
    assert fallbacks(engine) == {("primary", "backup", "server_error"): 1}


async def test_a_tenant_pays_for_each_answer_at_the_price_of_the_lm_that_gave_it(autojump_clock: Any) -> None:
    """A fallback's answer costs the backup's price, not the program's LM's (a backup ten times dearer
    costs ten times more); the primary's failed attempts reported no tokens and cost nothing."""
    base = config()
    dollar, ten = (
        Price(input_per_mtok=1e6, output_per_mtok=1e6),
        Price(input_per_mtok=1e7, output_per_mtok=1e7),
    )
    priced = attrs.evolve(
        base,
        lms={
            "primary": attrs.evolve(base.lms["primary"], price=dollar),
            "backup": attrs.evolve(base.lms["backup"], price=ten),
        },
    )
    primary = Scripted("primary-model")
    async with engine_with(priced, primary=primary) as (engine, _):
        answered = await engine.predict("default", QUESTION, tenant="acme")
        primary.steps = failures(server_error(), 2)
        fell_back = await engine.predict("default", {"question": "another"}, tenant="globex")
        stats = engine.statistics().tenants
    assert answered.lms == ("primary",)
    assert fell_back.lms == ("backup",)
    assert stats["acme"].cost_usd == pytest.approx(answered.usage.total_tokens)
    assert stats["globex"].cost_usd == pytest.approx(10 * fell_back.usage.total_tokens)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (UpstreamServerError("529", status=529), "server_error"),
        (UpstreamRateLimitedError("429"), "rate_limited"),
        (UpstreamConnectionError("refused"), "connection"),
    ],
)
async def test_every_retryable_upstream_error_falls_back(
    error: Exception, reason: str, autojump_clock: Any
) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(error, 2)
    async with engine_with(config(), primary=primary) as (engine, _):
        result = await engine.predict("default", QUESTION)
    assert result.lm_calls[0].skipped == (SkippedLM("primary", reason),)


async def test_an_answer_that_is_not_a_completion_falls_back_without_a_retry(autojump_clock: Any) -> None:
    """A malformed body, an HTML page, a compression bomb: the same LM would answer the same (not
    retried), but another may answer well."""
    primary = Scripted("primary-model")
    primary.steps = [UpstreamResponseError("primary: the answer is not JSON")]
    async with engine_with(config(), primary=primary) as (engine, _):
        result = await engine.predict("default", QUESTION)
    assert primary.calls == [0.0]
    assert result.lm_calls[0].skipped == (SkippedLM("primary", "bad_response"),)


async def test_a_stalled_primary_falls_back_at_its_attempt_timeout(autojump_clock: Any) -> None:
    cfg = config(attempts=1)
    primary_config = attrs.evolve(cfg.lms["primary"], timeouts=CallTimeouts(attempt=2.0))
    cfg = EngineConfig(lms={**cfg.lms, "primary": primary_config}, programs=cfg.programs)
    primary = Scripted("primary-model")
    primary.steps = ["hang"]
    async with engine_with(cfg, primary=primary) as (engine, _):
        result = await engine.predict("default", QUESTION)
    assert primary.ended == [2.0]  # the stalled call was closed at its timeout
    assert result.timings.total == 3.0
    assert result.lm_calls[0].skipped == (SkippedLM("primary", "timeout"),)


async def test_an_open_breaker_falls_back_at_once_and_never_touches_the_primary(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 2)
    breaker = BreakerSettings(min_calls=2, failure_ratio=1.0, open_for=30.0)
    async with engine_with(config(breaker=breaker), primary=primary) as (engine, lms):
        await engine.predict("default", QUESTION)  # two failures: the breaker opens
        assert engine.statistics().breakers["primary"].state == "open"
        started = trio.current_time()
        results = [await engine.predict("default", QUESTION) for _ in range(5)]
        assert trio.current_time() - started == 5 * 1.0  # only the backup's own latency
        assert primary.calls == [0.0, FAIL_AFTER]
        assert [r.lm_calls[0].skipped for r in results] == [(SkippedLM("primary", "breaker_open"),)] * 5
        assert fallbacks(engine)[("primary", "backup", "breaker_open")] == 5
        text = generate_latest(engine.metrics.registry).decode()
    assert 'dspy_trio_breaker_state{lm="primary"} 2.0' in text
    assert 'dspy_trio_breaker_state{lm="backup"} 0.0' in text  # a fallback gets a breaker too
    assert 'dspy_trio_fallbacks_total{from="primary",reason="breaker_open",to="backup"} 5.0' in text
    assert len(lms["backup"].calls) == 6


async def test_the_primary_takes_the_calls_again_once_its_probe_succeeds(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 2)
    breaker = BreakerSettings(min_calls=2, failure_ratio=1.0, open_for=10.0)
    async with engine_with(config(breaker=breaker), primary=primary) as (engine, _):
        await engine.predict("default", QUESTION)  # opened at t=1.0, until 11.0
        await trio.sleep_until(11.0)
        probe = await engine.predict("default", QUESTION)
        after = await engine.predict("default", QUESTION)
    assert probe.lms == after.lms == ("primary",)
    assert primary.calls == [0.0, FAIL_AFTER, 11.0, 12.0]


async def test_a_chain_goes_on_through_the_fallbacks_own_fallbacks(autojump_clock: Any) -> None:
    primary, backup = Scripted("primary-model"), Scripted("backup-model")
    primary.steps = failures(server_error(), 1)
    backup.steps = failures(UpstreamConnectionError("reset"), 1)
    async with engine_with(
        config(attempts=1, backup_attempts=1, third=True), primary=primary, backup=backup
    ) as (
        engine,
        _,
    ):
        result = await engine.predict("default", QUESTION)
    assert result.lm_calls[0].lm == "third"
    assert result.lm_calls[0].skipped == (
        SkippedLM("primary", "server_error"),
        SkippedLM("backup", "connection"),
    )


async def test_when_every_lm_fails_the_last_error_is_raised(autojump_clock: Any) -> None:
    primary, backup = Scripted("primary-model"), Scripted("backup-model")
    primary.steps = failures(server_error(), 1)
    backup.steps = failures(UpstreamConnectionError("backup: reset"), 1)
    async with engine_with(config(attempts=1, backup_attempts=1), primary=primary, backup=backup) as (
        engine,
        _,
    ):
        with pytest.raises(UpstreamConnectionError, match="backup: reset"):
            await engine.predict("default", QUESTION)
        assert engine.statistics().failed == 1


# --- when it must not ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_never_on_the_callers_own_errors(status: int, autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = [UpstreamResponseError(f"primary: {status}", status=status)]
    async with engine_with(config(), primary=primary) as (engine, lms):
        with pytest.raises(UpstreamResponseError):
            await engine.predict("default", QUESTION)
        assert lms["backup"].calls == []
        assert fallbacks(engine) == {}
        assert engine.statistics().breakers["primary"].calls == 0  # not a failure of the upstream


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_logged_loudly_not_hidden_by_a_fallback(
    status: int, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="dspy_trio.engine.fallback")
    primary = Scripted("primary-model")
    primary.steps = [UpstreamResponseError(f"primary: {status}", status=status)] * 20
    async with engine_with(config(), primary=primary) as (engine, lms):
        for _ in range(20):
            with pytest.raises(UpstreamResponseError):
                await engine.predict("default", QUESTION)  # 0.5 s each: 10 s in all
        assert lms["backup"].calls == []
    lines = [r.getMessage() for r in caplog.records if r.name == "dspy_trio.engine.fallback"]
    assert len(lines) == 1  # loud, but once per 10 s, not once per call
    assert f"refused its credentials (HTTP {status})" in lines[0]
    assert "backup" in lines[0]
    assert "lms.primary.api_key" in lines[0]


async def test_a_context_window_error_falls_back_only_when_the_lm_says_so(autojump_clock: Any) -> None:
    too_long = UpstreamContextWindowError("primary: the prompt is too long", status=400)
    primary = Scripted("primary-model")
    primary.steps = [too_long]
    async with engine_with(config(), primary=primary) as (engine, lms):
        with pytest.raises(UpstreamContextWindowError):
            await engine.predict("default", QUESTION)
        assert lms["backup"].calls == []
    primary.steps = [too_long]
    async with engine_with(config(on_context_window=True), primary=primary) as (engine, lms):
        result = await engine.predict("default", QUESTION)
        assert result.lm_calls[0].skipped == (SkippedLM("primary", "context_window"),)
        assert len(primary.calls) == 2  # not retried: once in each engine
        assert engine.statistics().breakers["primary"].calls == 0  # the prompt's fault, not the upstream's


# --- deadlines and cancels -------------------------------------------------------------------------------


async def test_the_deadline_runs_out_during_the_fallback(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 1)
    async with engine_with(config(attempts=1), primary=primary) as (engine, lms):
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.9):
            await engine.predict("default", QUESTION)
        assert trio.current_time() == 0.9
        assert lms["backup"].calls == [FAIL_AFTER]
        assert lms["backup"].ended == [0.9]  # its call was cancelled at the deadline, not later
        assert engine.statistics().timed_out == 1


async def test_a_deadline_that_passed_with_the_primarys_failure_starts_no_fallback(
    autojump_clock: Any,
) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 1)
    async with engine_with(config(attempts=1), primary=primary) as (engine, lms):
        with pytest.raises(trio.TooSlowError), trio.fail_after(FAIL_AFTER):
            await engine.predict("default", QUESTION)
        assert trio.current_time() == FAIL_AFTER
        assert lms["backup"].calls == []
        assert fallbacks(engine) == {}


async def test_a_fallback_whose_quota_wait_would_pass_the_deadline_is_refused_at_once(
    autojump_clock: Any,
) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 2)
    async with engine_with(config(attempts=1, backup_rpm=1), primary=primary) as (engine, lms):
        await engine.predict("default", QUESTION)  # the backup's one request of the minute
        with pytest.raises(RateLimitWaitError), trio.fail_after(30):
            await engine.predict("default", QUESTION)
        assert trio.current_time() == 2 * FAIL_AFTER + 1.0  # refused when the primary failed
        assert len(lms["backup"].calls) == 1


@pytest.mark.parametrize("cancel_at", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.499, 1.5, 2.0])
async def test_a_cancel_at_any_moment_of_a_fallback_leaves_nothing_behind(
    cancel_at: float, autojump_clock: Any
) -> None:
    """The primary fails at 0.5; the backup answers at 1.5. A cancel at any moment ends the call then,
    closes whichever LM call was running, and leaves no probe or task behind."""
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 1)
    async with engine_with(config(attempts=1), primary=primary) as (engine, lms):
        before = tasks_living()
        with trio.move_on_after(cancel_at) as scope:
            await engine.predict("default", QUESTION)
        assert trio.current_time() == min(cancel_at, 1.5)
        every_end = primary.ended + lms["backup"].ended
        assert all(end <= cancel_at for end in every_end)
        assert len(every_end) == len(primary.calls) + len(lms["backup"].calls)  # each call ended
        assert tasks_living() == before
        s = engine.statistics()
        assert (s.timed_out, s.succeeded) == ((1, 0) if scope.cancelled_caught else (0, 1))
        for breaker in s.breakers.values():
            assert breaker.state == "closed"
        assert engine._breakers["backup"]._probes_out == 0


async def test_a_cancel_of_a_half_open_probe_that_fell_back_gives_the_probe_back(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = [*failures(server_error(), 2), "hang"]
    breaker = BreakerSettings(min_calls=2, failure_ratio=1.0, open_for=5.0)
    async with engine_with(config(breaker=breaker), primary=primary) as (engine, _):
        await engine.predict("default", QUESTION)
        await trio.sleep_until(6.0)
        with trio.move_on_after(1.0):
            await engine.predict("default", QUESTION)  # the probe hangs; the caller leaves
        assert engine._breakers["primary"]._probes_out == 0
        result = await engine.predict("default", QUESTION)  # a new probe goes
        assert result.lms == ("primary",)
        assert engine.statistics().breakers["primary"].state == "closed"


# --- the fallback's own limits -----------------------------------------------------------------------


async def test_the_fallback_waits_out_its_own_429_cool_down_within_the_deadline(autojump_clock: Any) -> None:
    primary, backup = Scripted("primary-model"), Scripted("backup-model")
    primary.steps = failures(server_error(), 4)
    backup.steps = [UpstreamRateLimitedError("backup: 429", retry_after=3.0)]
    off = BreakerSettings(enabled=False)
    cfg = config(attempts=1, backup_attempts=1, backup_breaker=off)
    async with engine_with(cfg, primary=primary, backup=backup) as (engine, _):
        with pytest.raises(UpstreamRateLimitedError):
            await engine.predict("default", QUESTION)  # t=1.0: the backup's cool-down lasts until 4.0
        assert trio.current_time() == 2 * FAIL_AFTER
        with pytest.raises(RateLimitWaitError), trio.fail_after(2.5):
            await engine.predict("default", QUESTION)  # primary fails at 1.5; 4.0 is past the deadline
        assert trio.current_time() == 3 * FAIL_AFTER
        result = await engine.predict("default", QUESTION)  # primary fails at 2.0, then waits until 4.0
        assert backup.calls == [FAIL_AFTER, 4.0]
        assert trio.current_time() == 5.0
        assert result.lms == ("backup",)


async def test_a_fallback_with_its_own_breaker_open_is_skipped_too(autojump_clock: Any) -> None:
    primary, backup = Scripted("primary-model"), Scripted("backup-model")
    primary.steps = failures(server_error(), 4)
    backup.steps = [UpstreamRateLimitedError("backup: 429", retry_after=3.0)]
    async with engine_with(config(attempts=1, backup_attempts=1), primary=primary, backup=backup) as (
        engine,
        _,
    ):
        with pytest.raises(UpstreamRateLimitedError):
            await engine.predict("default", QUESTION)
        with pytest.raises(CircuitOpenError) as refused:
            await engine.predict("default", QUESTION)  # the backup's Retry-After opened its breaker
        assert refused.value.retry_after == pytest.approx(3.0 - FAIL_AFTER)
        assert backup.calls == [FAIL_AFTER]


async def test_a_fallback_gets_the_calls_parameters_over_its_own_defaults(autojump_clock: Any) -> None:
    primary = Scripted("primary-model", temperature=0.1, max_tokens=50)
    backup = Scripted("backup-model", temperature=0.9)
    primary.steps = failures(server_error(), 2)
    async with engine_with(config(), primary=primary, backup=backup) as (engine, _):
        await engine.predict("default", QUESTION)
    assert primary.params_seen[0] == {"temperature": 0.1, "max_tokens": 50}
    assert backup.params_seen == [{"temperature": 0.9}]


# --- streams -------------------------------------------------------------------------------------------


async def collect(engine: Engine) -> list[Any]:
    async with engine.stream("default", QUESTION) as events:
        return [event async for event in events]


async def test_a_stream_falls_back_before_its_first_delta(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 2)
    async with engine_with(config(), primary=primary) as (engine, _):
        events = await collect(engine)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert final.result.lms == ("backup",)
    assert final.result.lm_calls[0].skipped == (SkippedLM("primary", "server_error"),)
    assert any(isinstance(event, FieldDelta) for event in events)


async def test_a_stream_never_falls_back_after_its_first_delta(autojump_clock: Any) -> None:
    primary = Scripted("primary-model")
    primary.steps = [(3, UpstreamConnectionError("primary: the connection broke mid-answer"))]
    async with engine_with(config(), primary=primary) as (engine, lms):
        events = await collect(engine)
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].error.code == "upstream_connection_error"
    assert lms["backup"].calls == []
    assert len(primary.calls) == 1  # nor retried: text went out
    assert fallbacks(engine) == {}


async def test_the_engine_statistics_of_a_chain(autojump_clock: Any) -> None:
    async with engine_with(config()) as (engine, _):
        stats = engine.statistics()
    assert set(stats.breakers) == {"primary", "backup"}
    assert stats.breakers["primary"].state == "closed"
    assert math.isclose(stats.breakers["primary"].open_remaining, 0.0)


# --- with single-flight and the response cache ----------------------------------------------------------


async def test_the_waiters_of_one_call_fall_back_together_in_one_call(autojump_clock: Any) -> None:
    """Four identical calls share the primary's one call; its 503 reaches every waiter at once, and
    they share one call of the backup too: one outcome each, two upstream calls in all."""
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 1)
    async with engine_with(config(attempts=1), primary=primary) as (engine, lms):
        results: list[Any] = []

        async def ask() -> None:
            results.append(await engine.predict("default", QUESTION))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(ask)
        assert trio.current_time() == FAIL_AFTER + 1.0
        stats = engine.statistics()
    assert (len(primary.calls), len(lms["backup"].calls)) == (1, 1)
    assert stats.succeeded == 4
    assert len({result.outputs["answer"] for result in results}) == 1
    assert [r.lm_calls[0].lm for r in results] == ["backup"] * 4
    # The four share one prediction (a Predict program is shared whole), which fell back once.
    assert fallbacks(engine)[("primary", "backup", "server_error")] == 1


@pytest.mark.parametrize("last_leaves_at", [0.25, 0.75, 1.25])
async def test_the_last_waiter_to_leave_during_a_fallback_ends_the_backups_call(
    last_leaves_at: float, autojump_clock: Any
) -> None:
    """Two waiters; one leaves at 0.1, the other at ``last_leaves_at`` (during the primary's call, or the
    backup's): the call in flight then ends at that moment, and nothing is left behind."""
    primary = Scripted("primary-model")
    primary.steps = failures(server_error(), 1)
    async with engine_with(config(attempts=1), primary=primary) as (engine, lms):
        before = tasks_living()

        async def ask(leave_at: float) -> None:
            with trio.move_on_after(leave_at):
                await engine.predict("default", QUESTION)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 0.1)
            nursery.start_soon(ask, last_leaves_at)
        assert trio.current_time() == last_leaves_at
        every = primary.ended + lms["backup"].ended
        assert len(every) == len(primary.calls) + len(lms["backup"].calls)  # each call ended
        assert max(every) == last_leaves_at
        assert tasks_living() == before
        stats = engine.statistics()
        assert (stats.timed_out, stats.succeeded, stats.in_flight) == (2, 0, 0)
        assert engine._breakers["backup"]._probes_out == 0
    assert len(lms["backup"].calls) == (1 if last_leaves_at > FAIL_AFTER else 0)


async def test_a_cached_answer_is_given_while_the_lms_breaker_is_open(autojump_clock: Any) -> None:
    """A hit answers before the breaker is asked: it sends nothing upstream, so an open breaker (which
    protects the upstream) has no reason to refuse it, nor to send it to the fallback, whose answer
    would differ from the one the cache holds."""
    from dspy_trio.engine import CacheConfig

    primary = Scripted("primary-model")
    breaker = BreakerSettings(min_calls=3, failure_ratio=0.5, open_for=30.0)
    cfg = attrs.evolve(config(breaker=breaker, attempts=1), cache=CacheConfig(backend="memory"))
    async with engine_with(cfg, primary=primary) as (engine, lms):
        first = await engine.predict("default", QUESTION)
        primary.steps = failures(server_error(), 2)
        for other in ("a", "b"):
            await engine.predict("default", {"question": other})  # two failures: the breaker opens
        assert engine.statistics().breakers["primary"].state == "open"
        calls = (len(primary.calls), len(lms["backup"].calls))
        again = await engine.predict("default", QUESTION)
        async with engine.stream("default", QUESTION) as events:
            streamed = [event async for event in events]
    assert (len(primary.calls), len(lms["backup"].calls)) == calls
    assert again.outputs == first.outputs
    assert again.timings.cached
    assert again.lm_calls == () or again.lm_calls[0].skipped == ()
    final = streamed[-1]
    assert isinstance(final, FinalEvent)
    assert final.result.outputs == first.outputs


# --- a property: over random failures, cancels and streams -------------------------------------------


class Named(Scripted):
    """A scripted LM whose answers start with its name, so a spliced answer shows."""

    def render(self, messages: Sequence[Message]) -> str:
        return super().render(messages).replace("[[ ## answer ## ]]\n", f"[[ ## answer ## ]]\n{self.model} ")


STEPS = {
    "ok": None,
    "503": UpstreamServerError("503", status=503),
    "429": UpstreamRateLimitedError("429", retry_after=0.75),
    "400": UpstreamResponseError("400", status=400),
    "hang": "hang",
    "mid": (9, UpstreamConnectionError("broke mid-answer")),  # the answer field has begun
}


@attrs.frozen
class Call:
    stream: bool
    start: float
    cancel_after: float | None


@attrs.frozen
class Plan:
    scripts: tuple[tuple[str, ...], ...]  # per LM: its answers, in call order
    calls: tuple[Call, ...]
    min_calls: int


fallback_plans = st.builds(
    Plan,
    scripts=st.tuples(*[st.lists(st.sampled_from(sorted(STEPS)), max_size=6).map(tuple) for _ in range(3)]),
    calls=st.lists(
        st.builds(
            Call,
            stream=st.booleans(),
            start=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
            cancel_after=st.sampled_from([None, None, 0.0, 0.3, 0.6, 1.2, 2.5]),
        ),
        min_size=1,
        max_size=5,
    ).map(tuple),
    min_calls=st.integers(1, 4),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=fallback_plans)
def test_over_random_failures_and_cancels_every_call_ends_once_and_no_answer_is_spliced(plan: Plan) -> None:
    """A chain a -> b -> c of LMs failing at random (503, 429, 400, a hang, a break mid-answer), calls
    and streams cancelled at random moments: every request ends with one outcome; a result's LM is in the
    chain after every LM it skipped; a stream's text is the answer of the one LM that answered (never two
    spliced); afterwards no task, connection or probe place is left behind."""

    async def main() -> None:
        names = ("a", "b", "c")
        breaker = BreakerSettings(min_calls=plan.min_calls, failure_ratio=0.5, open_for=1.0)
        timeouts = CallTimeouts(attempt=1.0)
        retry = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0)
        lms = {
            name: LMConfig(
                model=name,
                fallbacks=(names[i + 1],) if i < 2 else (),
                breaker=breaker,
                timeouts=timeouts,
                retry=retry,
            )
            for i, name in enumerate(names)
        }
        cfg = EngineConfig(lms=lms, programs={"default": ProgramSpec("question -> answer", lm="a")})
        backends = {name: Named(name, latency=0.25) for name in names}
        for name, script in zip(names, plan.scripts, strict=True):
            backends[name].steps = [STEPS[step] for step in script]
        seen: list[tuple[Call, Any]] = []
        async with open_engine(cfg, lms=backends) as engine:
            before = tasks_living()

            async def one(call: Call) -> None:
                await trio.sleep(call.start)
                outcome: Any = "cancelled"
                with trio.move_on_after(call.cancel_after if call.cancel_after is not None else math.inf):
                    if call.stream:
                        async with engine.stream("default", QUESTION) as events:
                            outcome = [event async for event in events]
                    else:
                        try:
                            outcome = await engine.predict("default", QUESTION)
                        except EngineErrorType as error:
                            outcome = error
                seen.append((call, outcome))

            async with trio.open_nursery() as nursery:
                for call in plan.calls:
                    nursery.start_soon(one, call)
            assert tasks_living() == before
            stats = engine.statistics()
            assert stats.in_flight == stats.queued == 0
            assert stats.ended == len(plan.calls)
            for breaker_ in engine._breakers.values():
                assert breaker_._probes_out == 0
        for backend in backends.values():
            assert len(backend.ended) == len(backend.calls)  # every upstream call ended
        for _call, outcome in seen:
            results = (
                [outcome]
                if not isinstance(outcome, list)
                else [e.result for e in outcome if isinstance(e, FinalEvent)]
            )
            for result in results:
                if not hasattr(result, "lm_calls"):
                    continue
                answered = result.lm_calls[0]
                order = [s.lm for s in answered.skipped] + [answered.lm]
                assert order == sorted(order)  # chain order
                assert len(set(order)) == len(order)  # each once
                assert result.outputs["answer"].startswith(answered.lm + " ")
            if isinstance(outcome, list):
                text = "".join(e.text for e in outcome if isinstance(e, FieldDelta))
                final = [e for e in outcome if isinstance(e, FinalEvent)]
                terminal = [e for e in outcome if isinstance(e, FinalEvent | ErrorEvent)]
                assert len(terminal) <= 1
                if final:
                    assert final[0].result.outputs["answer"].startswith(text.split(" ")[0]) or not text
                words = {word for word in text.split() if word in names}
                assert len(words) <= 1, f"two LMs' answers spliced: {text!r}"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# --- chains of three, Retry-After beyond the deadline ---------------------------------------------------


def three(primary_open: float, backup_open: float, third_open: float) -> EngineConfig:
    retry = RetryPolicy(max_attempts=1, base_delay=0.0, max_delay=0.0)

    def lm(model: str, open_for: float, fallbacks: tuple[str, ...]) -> LMConfig:
        breaker = BreakerSettings(min_calls=1, failure_ratio=1.0, open_for=open_for)
        return LMConfig(model=model, fallbacks=fallbacks, retry=retry, breaker=breaker)

    lms = {
        "primary": lm("primary-model", primary_open, ("backup",)),
        "backup": lm("backup-model", backup_open, ("third",)),
        "third": lm("third-model", third_open, ()),
    }
    return EngineConfig(lms=lms, programs={"default": ProgramSpec("question -> answer", lm="primary")})


async def test_a_chain_of_three_with_two_breakers_open_goes_to_the_third_at_once(autojump_clock: Any) -> None:
    primary, backup = Scripted("primary-model"), Scripted("backup-model")
    primary.steps = [server_error()]
    backup.steps = [UpstreamServerError("backup: 502", status=502)]
    async with engine_with(three(10.0, 10.0, 10.0), primary=primary, backup=backup) as (engine, lms):
        first = await engine.predict("default", QUESTION)  # both fail, the third answers
        assert first.lms == ("third",)
        started = trio.current_time()
        result = await engine.predict("default", QUESTION)
        assert trio.current_time() - started == 1.0  # the third's own latency: nothing else waited
    assert result.lm_calls[0].skipped == (
        SkippedLM("primary", "breaker_open"),
        SkippedLM("backup", "breaker_open"),
    )
    assert len(primary.calls) == len(backup.calls) == 1
    assert len(lms["third"].calls) == 2


async def test_when_every_breaker_of_the_chain_is_open_the_retry_after_is_the_soonest_probe(
    autojump_clock: Any,
) -> None:
    """Every LM refused at once: the caller is told to come back when the first of them lets a probe
    through (here the backup's), not when the last LM of the chain does."""
    primary, backup, third = (Scripted(f"{name}-model") for name in ("primary", "backup", "third"))
    primary.steps = [server_error()]
    backup.steps = [UpstreamServerError("backup: 502", status=502)]
    third.steps = [UpstreamServerError("third: 500", status=500)]
    async with engine_with(three(10.0, 2.0, 6.0), primary=primary, backup=backup, third=third) as (engine, _):
        with pytest.raises(UpstreamServerError, match="third: 500"):
            await engine.predict("default", QUESTION)
        assert trio.current_time() == 3 * FAIL_AFTER  # open until 10.5, 3.0 and 7.5
        with pytest.raises(CircuitOpenError) as refused:
            await engine.predict("default", QUESTION)
        assert refused.value.retry_after == pytest.approx(3.0 - 3 * FAIL_AFTER)
        await trio.sleep(refused.value.retry_after)
        result = await engine.predict("default", QUESTION)  # the backup's probe answers
        assert result.lms == ("backup",)


@pytest.mark.parametrize("breaker", [True, False], ids=["breaker", "no-breaker"])
async def test_a_retry_after_longer_than_the_deadline_falls_back_at_once(
    breaker: bool, autojump_clock: Any
) -> None:
    """The primary asks for 30 s with 5 s left: the call goes to the backup now (not after a wait that
    cannot fit), and the next call too, without touching the primary."""
    primary = Scripted("primary-model")
    primary.steps = [UpstreamRateLimitedError("primary: 429", retry_after=30.0)]
    settings = BreakerSettings() if breaker else BreakerSettings(enabled=False)
    cfg = config(attempts=3, breaker=settings)
    cfg = attrs.evolve(
        cfg,
        lms={
            **cfg.lms,
            "primary": attrs.evolve(
                cfg.lms["primary"], retry=RetryPolicy(max_attempts=3, base_delay=0.0, max_retry_after=60.0)
            ),
        },
    )
    async with engine_with(cfg, primary=primary) as (engine, lms):
        with trio.fail_after(5.0):
            result = await engine.predict("default", QUESTION)
        assert result.lms == ("backup",)
        assert trio.current_time() == FAIL_AFTER + 1.0
        with trio.fail_after(5.0):
            again = await engine.predict("default", QUESTION)
        assert again.lms == ("backup",)
        assert again.lm_calls[0].skipped == (
            SkippedLM("primary", "breaker_open" if breaker else "rate_limited"),
        )
    assert primary.calls == [0.0]
    assert len(lms["backup"].calls) == 2
