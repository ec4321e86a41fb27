"""A tenant's rate limit and budget shared through a real ``redis-server``: engines standing for two
processes enforce them together, a budget's tally survives a lost reply and a lost key, and while Redis
is unreachable each process spends only its share of what was left."""

from __future__ import annotations

import subprocess
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing

from dspy_trio.engine import (
    BudgetExceededError,
    BudgetLimit,
    EngineConfig,
    LMConfig,
    Price,
    RateLimit,
    TenantConfig,
    TenantRateLimitedError,
    open_engine,
)
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine.cluster import open_cluster
from dspy_trio.engine.cluster._budget import SharedBudget
from tests.helpers import CountingLM
from tests.redis_server import RedisServer, eventually, own_redis_server, prefix, redis_server

__all__ = ["own_redis_server", "redis_server"]  # fixtures

DOLLAR_A_TOKEN = Price(input_per_mtok=1e6, output_per_mtok=1e6)


def config(server: RedisServer, key_prefix: str, tenants: dict[str, TenantConfig]) -> EngineConfig:
    return EngineConfig(
        lms={"default": LMConfig(price=DOLLAR_A_TOKEN)},
        tenants=tenants,
        cluster=ClusterConfig(redis_url=server.url, key_prefix=key_prefix, secret="0123456789abcdef-tenants"),
    )


async def test_two_processes_enforce_one_tenants_rpm_together(redis_server: RedisServer) -> None:
    """4 a minute in total: two each, then both refuse; a tenant without limits is not affected.

    Every call asks its own question: identical calls share one upstream call across processes, and
    one made just after the other's answer returned follows it while that answer's queued
    announcement is on its way to Redis (on a busy machine: no call of its own)."""
    shared = prefix()
    tenants = {"t": TenantConfig(rate_limit=RateLimit(rpm=4))}
    lm_a, lm_b = CountingLM(first_token_delay=0), CountingLM(first_token_delay=0)
    async with (
        open_engine(config(redis_server, shared, tenants), lms={"default": lm_a}) as a,
        open_engine(config(redis_server, shared, tenants), lms={"default": lm_b}) as b,
    ):
        for n, engine in enumerate((a, b, a, b)):
            await engine.predict("default", {"question": f"q{n}"}, tenant="t")
        for n, engine in enumerate((a, b), start=4):
            with pytest.raises(TenantRateLimitedError) as info:
                await engine.predict("default", {"question": f"q{n}"}, tenant="t")
            assert 55 < info.value.retry_after <= 60
        await a.predict("default", {"question": "q6"}, tenant="u")
        assert (lm_a.started, lm_b.started) == (3, 2)


async def test_two_processes_enforce_one_tenants_budget_together(redis_server: RedisServer) -> None:
    """a spends the budget; b refuses the tenant's next request before any upstream call, as soon as
    a's spend is written (one round-trip, by a task of a's cluster)."""
    shared = prefix()
    tenants = {"t": TenantConfig(budget=BudgetLimit(usd=1.0, window=3600))}
    lm_a, lm_b = CountingLM(first_token_delay=0), CountingLM(first_token_delay=0)
    async with (
        open_engine(config(redis_server, shared, tenants), lms={"default": lm_a}) as a,
        open_engine(config(redis_server, shared, tenants), lms={"default": lm_b}) as b,
    ):
        result = await a.predict("default", {"question": "q"}, tenant="t")
        assert result.usage.total_tokens > 1  # > 1 USD at a dollar a token

        assert b.cluster is not None
        shared_budget = b.cluster.budget("t", tenants["t"].budget)  # type: ignore[arg-type]
        with trio.fail_after(10):
            await eventually(lambda: _spent_is(shared_budget, result.usage.total_tokens))
        with pytest.raises(BudgetExceededError) as info:
            await b.predict("default", {"question": "q"}, tenant="t")
        assert 0 < info.value.retry_after <= 3600
        assert lm_b.started == 0
        with pytest.raises(BudgetExceededError):
            await a.predict("default", {"question": "q"}, tenant="t")
        assert b.statistics().tenants["t"].cost_usd == 0
        assert a.statistics().tenants["t"].cost_usd == pytest.approx(result.usage.total_tokens)


def _redis_cli(server: RedisServer, *args: str) -> str:
    command = ["redis-cli", "-p", str(server.port), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=False).stdout


async def test_a_budget_tally_lost_by_redis_is_written_again(own_redis_server: RedisServer) -> None:
    """Each process writes its running total, not an increment: after FLUSHALL the next check notices
    its part is missing and writes it again, so the spend is not forgotten."""
    settings = ClusterConfig(redis_url=own_redis_server.url, key_prefix=prefix())
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_cluster(settings, clock=lambda: 1000.0))
        b = await stack.enter_async_context(open_cluster(settings, clock=lambda: 1000.0))
        limit = BudgetLimit(usd=10, window=3600)
        mine, theirs = a.budget("t", limit), b.budget("t", limit)
        mine.spend(3.0)
        theirs.spend(4.0)
        await eventually(lambda: _spent_is(mine, 7.0))
        _redis_cli(own_redis_server, "FLUSHALL")
        assert (await mine.spent()).usd == 3.0  # only its own part is known now, and it writes it again
        await eventually(lambda: _spent_is(theirs, 3.0 + 4.0))


async def _spent_is(budget: SharedBudget, usd: float) -> bool:
    return (await budget.spent()).usd == pytest.approx(usd)


async def test_while_redis_is_down_each_process_spends_its_share_of_what_was_left(
    own_redis_server: RedisServer,
) -> None:
    """Two processes, 10 USD, 4 spent by each: 2 left, so 1 each while Redis cannot be asked."""
    settings = ClusterConfig(redis_url=own_redis_server.url, key_prefix=prefix(), call_timeout=0.25)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_cluster(settings, clock=lambda: 1000.0))
        b = await stack.enter_async_context(open_cluster(settings, clock=lambda: 1000.0))
        await eventually(lambda: a.link.processes == 2 or _beat(a))
        limit = BudgetLimit(usd=10, window=3600)
        mine, theirs = a.budget("t", limit), b.budget("t", limit)
        mine.spend(4.0)
        theirs.spend(4.0)
        await eventually(lambda: _spent_is(mine, 8.0))
        own_redis_server.stop()
        mine.spend(0.5)
        assert (await mine.spent()).usd < 10  # half of its 1 USD share
        assert a.link.degraded
        mine.spend(0.5)
        assert (await mine.spent()).usd >= 10  # its share is spent: refuse until Redis answers


async def _beat(cluster: Any) -> bool:
    from dspy_trio.engine.cluster._heartbeat import beat

    await beat(cluster.link)
    return bool(cluster.link.processes == 2)


async def test_a_tenant_rate_limit_degrades_to_the_local_share(own_redis_server: RedisServer) -> None:
    """With Redis gone a tenant's window is this process's share (rpm / processes): 4 a minute alone."""
    shared = prefix()
    tenants = {"t": TenantConfig(rate_limit=RateLimit(rpm=4))}
    own_redis_server.stop()
    cfg = EngineConfig(
        lms={"default": LMConfig()},
        tenants=tenants,
        cluster=ClusterConfig(redis_url=own_redis_server.url, key_prefix=shared, call_timeout=0.25),
    )
    async with open_engine(cfg, lms={"default": CountingLM(first_token_delay=0)}) as engine:
        for _ in range(4):
            await engine.predict("default", {"question": "q"}, tenant="t")
        with pytest.raises(TenantRateLimitedError):
            await engine.predict("default", {"question": "q"}, tenant="t")
