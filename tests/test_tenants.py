"""Tenants through the engine on the virtual clock: ``tenant=`` everywhere ``owner=`` is, each tenant's
own caps, rate limit and budget refusing at once (before any upstream call) with the code that names
the cause, cost by the price table, deadline-aware refusal, and the tenant in statistics, metrics and
logs.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client import generate_latest

from dspy_trio.engine import (
    BudgetExceededError,
    BudgetLimit,
    DeadlineUnmeetableError,
    EngineConfig,
    InvalidInputError,
    LMConfig,
    Price,
    RateLimit,
    RequestCancelledError,
    TenantConfig,
    TenantOverloadedError,
    TenantRateLimitedError,
    open_engine,
)

from .helpers import CountingLM

# A dollar a token, either way: costs are the token counts.
DOLLAR_A_TOKEN = Price(input_per_mtok=1e6, output_per_mtok=1e6)


def config(tenants: dict[str, TenantConfig] | None = None, **changes: Any) -> EngineConfig:
    return EngineConfig(lms={"default": LMConfig(price=DOLLAR_A_TOKEN)}, tenants=tenants or {}, **changes)


def sample(engine: Any, name: str, **labels: str) -> float | None:
    value = engine.metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


async def test_each_tenant_counts_its_own_usage_and_cost(autojump_clock: Any) -> None:
    async with open_engine(config(), lms={"default": CountingLM()}) as engine:
        first = await engine.predict("default", {"question": "q"}, tenant="acme")
        await engine.predict("default", {"question": "q"}, tenant="acme")
        await engine.predict("default", {"question": "q"})
        stats = engine.statistics().tenants
    acme, default = stats["acme"], stats["default"]
    tokens = first.usage.total_tokens
    assert (acme.requests, acme.prompt_tokens + acme.completion_tokens) == ({"succeeded": 2}, 2 * tokens)
    assert acme.cost_usd == pytest.approx(2 * tokens)
    assert default.requests == {"succeeded": 1}
    assert sample(engine, "dspy_trio_cost_usd_total", tenant="acme") == pytest.approx(2 * tokens)
    assert sample(engine, "dspy_trio_tenant_requests_total", tenant="default", outcome="succeeded") == 1
    assert b'dspy_trio_tenant_tokens_total{direction="in",tenant="acme"}' in generate_latest(
        engine.metrics.registry
    )


async def test_an_lm_without_a_price_costs_nothing(autojump_clock: Any) -> None:
    async with open_engine(EngineConfig(), lms={"default": CountingLM()}) as engine:
        await engine.predict("default", {"question": "q"}, tenant="a")
        assert engine.statistics().tenants["a"].cost_usd == 0
        assert sample(engine, "dspy_trio_cost_usd_total", tenant="a") == 0


async def test_request_log_lines_carry_the_tenant(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_trio.engine.requests")
    async with open_engine(config(), lms={"default": CountingLM()}) as engine:
        await engine.predict("default", {"question": "q"}, tenant="acme")
    lines = [json.loads(r.message) for r in caplog.records if r.name == "dspy_trio.engine.requests"]
    assert [line["tenant"] for line in lines] == ["acme"]


async def test_over_its_rpm_a_tenant_is_refused_at_once_and_nothing_is_sent(autojump_clock: Any) -> None:
    tenants = {"small": TenantConfig(rate_limit=RateLimit(rpm=2))}
    lm = CountingLM(first_token_delay=0.5)
    async with open_engine(config(tenants), lms={"default": lm}) as engine:
        await engine.predict("default", {"question": "q"}, tenant="small")
        await trio.sleep(30)  # paced at the limit (60 / rpm apart): grants are kept apart, not merged
        await engine.predict("default", {"question": "q"}, tenant="small")
        start = trio.current_time()
        with pytest.raises(TenantRateLimitedError) as info:
            await engine.predict("default", {"question": "q"}, tenant="small")
        assert trio.current_time() == start
        assert info.value.retry_after == pytest.approx(60 - start)  # the first grant leaves the window
        assert info.value.tenant == "small"
        assert lm.started == 2
        await engine.predict("default", {"question": "q"}, tenant="other")  # others are not limited
        await trio.sleep_until(60)
        await engine.predict("default", {"question": "q"}, tenant="small")
        stats = engine.statistics()
    assert stats.errors_by_code == {"tenant_rate_limited": 1}
    assert stats.tenants["small"].requests == {"succeeded": 3, "rejected": 1}


async def test_over_its_tpm_a_tenant_is_refused_until_the_window_has_room(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.5)
    async with open_engine(config(), lms={"default": lm}) as engine:
        tokens = (await engine.predict("default", {"question": "q"})).usage.total_tokens
    tenants = {"t": TenantConfig(rate_limit=RateLimit(tpm=2 * tokens))}
    async with open_engine(config(tenants), lms={"default": lm}) as engine:
        start = trio.current_time()
        await engine.predict("default", {"question": "q"}, tenant="t")
        await engine.predict("default", {"question": "q"}, tenant="t")
        with pytest.raises(TenantRateLimitedError) as info:
            await engine.predict("default", {"question": "q"}, tenant="t")
        assert info.value.retry_after == pytest.approx(60 - (trio.current_time() - start))


async def test_a_request_that_never_ran_gives_its_rate_grant_back(autojump_clock: Any) -> None:
    tenants = {"t": TenantConfig(rate_limit=RateLimit(rpm=2))}
    async with open_engine(
        config(tenants, max_in_flight=1), lms={"default": CountingLM(first_token_delay=5)}
    ) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(engine.predict, "default", {"question": "runs"}, tenant="t"))
            await trio.sleep(0.1)
            with trio.move_on_after(1):  # queued behind the first, then abandoned
                await engine.predict("default", {"question": "queued"}, tenant="t")
        await engine.predict("default", {"question": "the grant came back"}, tenant="t")


async def test_over_budget_a_tenant_is_refused_before_any_upstream_call_until_the_window_ends(
    autojump_clock: Any,
) -> None:
    lm = CountingLM(first_token_delay=1.0)
    tenants = {"t": TenantConfig(budget=BudgetLimit(usd=1, window=3600))}
    async with open_engine(config(tenants), lms={"default": lm}) as engine:
        await trio.sleep(100)
        await engine.predict("default", {"question": "q"}, tenant="t")  # costs its tokens: > 1 USD
        with pytest.raises(BudgetExceededError) as info:
            await engine.predict("default", {"question": "q"}, tenant="t")
        assert info.value.retry_after == pytest.approx(3600 - trio.current_time())
        assert lm.started == 1
        with pytest.raises(BudgetExceededError):
            async with engine.stream("default", {"question": "q"}, tenant="t"):
                pass  # pragma: no cover - refused on entry
        await trio.sleep_until(3600)
        await engine.predict("default", {"question": "q"}, tenant="t")  # a new window
        assert engine.statistics().errors_by_code == {"budget_exceeded": 2}


async def test_a_zero_budget_refuses_everything_that_costs(autojump_clock: Any) -> None:
    tenants = {"t": TenantConfig(budget=BudgetLimit(usd=0))}
    async with open_engine(config(tenants), lms={"default": CountingLM()}) as engine:
        with pytest.raises(BudgetExceededError):
            await engine.predict("default", {"question": "q"}, tenant="t")


async def test_a_tenant_over_its_caps_is_overloaded_while_others_still_run(autojump_clock: Any) -> None:
    tenants = {"t": TenantConfig(max_in_flight=1, max_queued=1)}
    lm = CountingLM(first_token_delay=2.0)
    async with open_engine(config(tenants), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(partial(engine.predict, "default", {"question": "q"}, tenant="t"))
            await trio.sleep(0.5)
            with pytest.raises(TenantOverloadedError) as info:
                await engine.predict("default", {"question": "q"}, tenant="t")
            assert info.value.retry_after > 0
            with pytest.raises(TenantOverloadedError):
                engine.precheck("default", {"question": "q"}, tenant="t")
            with pytest.raises(TenantOverloadedError):
                engine.refuse_if_overloaded("default", tenant="t")
            start = trio.current_time()
            await engine.predict("default", {"question": "q"}, tenant="u")
            assert trio.current_time() - start == 2.0
        assert trio.current_time() == 4.0  # the tenant's two ran one after the other
        stats = engine.statistics()
    assert stats.errors_by_code == {"tenant_overloaded": 2}
    assert stats.tenants["t"].requests == {"succeeded": 2, "rejected": 2}


async def test_a_doomed_wait_is_refused_at_once_not_timed_out_in_the_queue(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(max_in_flight=2), lms={"default": lm}) as engine:
        await engine.predict("default", {"question": "measure"})
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(engine.predict, "default", {"question": "q"})
            await trio.sleep(0.1)
            start = trio.current_time()
            with trio.move_on_after(2), pytest.raises(DeadlineUnmeetableError) as info:
                await engine.predict("default", {"question": "q"})
            assert trio.current_time() == start
            assert info.value.retry_after > 0
            with trio.move_on_after(2), pytest.raises(DeadlineUnmeetableError):
                async with engine.stream("default", {"question": "q"}):
                    pass  # pragma: no cover - refused on entry
        stats = engine.statistics()
    assert (stats.rejected, stats.timed_out) == (2, 0)
    assert stats.deadline_refusals == 2
    assert sample(engine, "dspy_trio_deadline_refusals_total") == 2


async def test_batch_items_count_against_the_tenant(autojump_clock: Any) -> None:
    tenants = {"t": TenantConfig(rate_limit=RateLimit(rpm=3))}
    async with open_engine(config(tenants), lms={"default": CountingLM()}) as engine:
        items = await engine.batch("default", [{"question": f"q{i}"} for i in range(5)], tenant="t")
        stats = engine.statistics().tenants["t"]
    assert [type(item.error).__name__ if item.error else "ok" for item in items].count("ok") == 3
    assert sum(isinstance(item.error, TenantRateLimitedError) for item in items) == 2
    assert stats.requests == {"succeeded": 3, "rejected": 2}


async def test_tenant_names_are_checked_and_unconfigured_ones_are_bounded(autojump_clock: Any) -> None:
    async with open_engine(config(), lms={"default": CountingLM(first_token_delay=0)}) as engine:
        with pytest.raises(InvalidInputError):
            await engine.predict("default", {"question": "q"}, tenant="x" * 1000)
        with pytest.raises(InvalidInputError):
            await engine.predict("default", {"question": "q"}, tenant="")
        engine._tenants._max_unconfigured = 5
        for i in range(50):  # idle unconfigured tenants are forgotten to make room
            await engine.predict("default", {"question": "q"}, tenant=f"user-{i}")
        assert len(engine._tenants._live) <= 6  # 5 and the default


async def test_cancelled_queued_requests_leave_every_tenant_consistent(autojump_clock: Any) -> None:
    tenants = {"a": TenantConfig(weight=3, max_in_flight=2), "b": TenantConfig(max_queued=6)}
    lm = CountingLM(first_token_delay=1)
    ended: list[str] = []

    async def one(i: int) -> None:
        try:
            await engine.predict("default", {"question": f"q{i}"}, request_id=f"r{i}", tenant="ab"[i % 2])
            ended.append("ok")
        except RequestCancelledError:
            ended.append("cancelled")

    async with open_engine(config(tenants, max_in_flight=2), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
            await trio.sleep(0.5)
            for i in range(0, 12, 3):
                engine.cancel(f"r{i}")
        stats = engine.statistics()
    assert sorted(ended) == ["cancelled"] * 4 + ["ok"] * 8
    assert lm.finished == 8
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert all((t.in_flight, t.queued) == (0, 0) for t in stats.tenants.values())
    assert stats.requests_total == 12
