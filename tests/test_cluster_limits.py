"""Shared RPM/TPM buckets and the shared cool-down on a real redis-server, driven by Trio's MockClock.

The shared clock of these clusters is Trio's clock (``clock=trio.current_time``), so the Lua script's
"now" is virtual time: the clock stands still while Redis answers (real I/O) and moves only when a test
jumps it, and every wait is asserted in exact virtual seconds.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing

from engine import RateLimitWaitError
from engine._config import ClusterConfig
from engine._upstream import UpstreamGuard, UpstreamPolicy
from engine.cluster import Cluster, SharedQuota, open_cluster
from engine.lm._base import Completion
from tests.redis_server import RedisServer, eventually, own_redis_server, prefix, redis_server

__all__ = ["own_redis_server", "redis_server"]  # fixtures

# The clock stands still while Redis answers; it jumps by itself only after half a second of real idleness
# (the client's own teardown timers), never while a test is busy with Redis.
IDLE_JUMP = 0.5


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=IDLE_JUMP)


@asynccontextmanager
async def clusters(server: RedisServer, count: int, **changes: float) -> AsyncIterator[list[Cluster]]:
    """``count`` processes' views of one cluster (each its own connection), on Trio's clock."""
    changes = {"call_timeout": 60.0, "heartbeat_interval": 600.0, **changes}
    config = ClusterConfig(redis_url=server.url, key_prefix=prefix(), **changes)  # type: ignore[arg-type]
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_cluster(config, clock=trio.current_time))
            for _ in range(count)
        ]


async def _below(quota: SharedQuota, level: float) -> bool:
    return await quota.level() < level


async def test_rpm_is_shared_two_processes_get_one_quota_between_them(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """30 requests/minute between two processes: 30 at once in total, the 31st waits 2 s (rate 0.5/s)."""
    async with clusters(redis_server, 2) as (a, b):
        quota_a, quota_b = a.quota("up", "rpm", 30), b.quota("up", "rpm", 30)
        for i in range(30):
            await (quota_a if i % 2 else quota_b).acquire(1)
        assert trio.current_time() == 0.0

        with pytest.raises(RateLimitWaitError, match="would pass the deadline"), trio.fail_after(1.5):
            await quota_a.acquire(1)  # needs 2 s: refused at once, takes nothing
        assert trio.current_time() == 0.0

        done: list[float] = []

        async def take(quota: SharedQuota) -> None:
            await quota.acquire(1)
            done.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, quota_b)
            await eventually(lambda: _below(quota_b, -0.5))  # reserved in Redis: the task now sleeps
            nursery.start_soon(take, quota_a)
            await eventually(lambda: _below(quota_a, -1.5))
            mock_clock.jump(2.0)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [2.0]
            mock_clock.jump(2.0)
        assert done == [2.0, 4.0]  # first come, first served across processes
        assert a.statistics().degraded is False


async def test_tpm_estimate_is_corrected_by_real_usage(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """TPM is charged with the estimate, and the correction (real usage) reaches the shared bucket."""
    async with clusters(redis_server, 2) as (a, b):
        tpm_a, tpm_b = a.quota("up", "tpm", 600), b.quota("up", "tpm", 600)
        await tpm_a.acquire(500)
        assert await tpm_b.level() == 100
        tpm_a.adjust(40 - 500)  # the call used 40 tokens
        await tpm_a.flush()
        assert await tpm_b.level() == 560
        await tpm_b.acquire(560)
        assert trio.current_time() == 0.0


async def test_a_429_in_one_process_pauses_the_others(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """A cool-down set by one process (Retry-After) reaches every other process of the cluster."""
    async with clusters(redis_server, 3) as (a, b, c):
        cool = [x.cooldown("up") for x in (a, b, c)]
        cool[0].extend_to(trio.current_time() + 5.0)
        await eventually(lambda: cool[1].until == 5.0 and cool[2].until == 5.0)
        assert cool[1].until == cool[2].until == 5.0


async def test_guard_waits_out_a_cool_down_heard_from_another_process(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """An UpstreamGuard on cluster limits does not call the upstream during another process's cool-down."""
    async with clusters(redis_server, 2) as (a, b):
        guard_b = UpstreamGuard("up", UpstreamPolicy(rpm=60), limits=b)
        a.cooldown("up").extend_to(3.0)
        await eventually(lambda: guard_b.statistics().cooldown_remaining == 3.0)
        called: list[float] = []

        async def attempt(sink: object) -> Completion:
            called.append(trio.current_time())
            return Completion(["ok"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(guard_b.call, attempt, None, estimate=1))
            await trio.testing.wait_all_tasks_blocked()
            assert called == []
            mock_clock.jump(3.0)
        assert called == [3.0]
