"""When Redis is down or hung: no request waits on it beyond a short cap, limits fall back to this
process's share of the quota, the state is logged once and exported, and it recovers by itself.

Trio's MockClock: it stands still while Redis answers, and jumps after half a second of real idleness, so
a hung Redis shows up as an exact virtual time (the call's cap), never as a hang.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing

from engine import RateLimitWaitError
from engine._config import ClusterConfig
from engine.cluster import Cluster, open_cluster
from engine.cluster._heartbeat import beat
from tests.redis_server import RedisServer, own_redis_server, prefix

__all__ = ["own_redis_server"]  # fixture


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.5)


@asynccontextmanager
async def clusters(server: RedisServer, count: int) -> AsyncIterator[list[Cluster]]:
    config = ClusterConfig(
        redis_url=server.url, key_prefix=prefix(), call_timeout=0.25, heartbeat_interval=1.0
    )
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_cluster(config, clock=trio.current_time))
            for _ in range(count)
        ]


def unreachable_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "redis unreachable" in r.getMessage()]


async def test_redis_down_at_start_serves_with_local_limits(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    own_redis_server.stop()
    async with clusters(own_redis_server, 1) as (a,):
        assert a.statistics().degraded
        quota = a.quota("up", "rpm", 30)
        for _ in range(30):  # never reached Redis: a full share (one process known: all of it)
            await quota.acquire(1)
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(1)
        assert trio.current_time() == 0.0


async def test_redis_stopped_mid_load_falls_back_to_the_share_and_recovers(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes share 30/min; Redis dies: each keeps 30/2 = 15/min alone; Redis returns: shared."""
    caplog.set_level(logging.WARNING, "engine.cluster")
    async with clusters(own_redis_server, 2) as (a, _b):
        await beat(a.link)
        assert a.statistics().processes == 2
        quota = a.quota("up", "rpm", 30)
        for _ in range(20):
            await quota.acquire(1)  # shared: 10 left
        own_redis_server.stop()

        # The first call finds Redis gone; the local share serves from then on: 15/min, starting empty
        # (what the other process took meanwhile is unknown).
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(1)
        assert a.statistics().degraded
        assert trio.current_time() == 0.0
        assert trio.current_time() == 0.0
        calls = a.statistics().round_trips
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(1)
        assert a.statistics().round_trips == calls  # degraded: Redis is not asked per request
        await quota.acquire(1)
        assert trio.current_time() == 4.0  # 60 s / 15
        await a.quota("up", "tpm", 6000).acquire(3000)  # degraded, never shared: a full share at once
        assert trio.current_time() == 4.0
        assert len(unreachable_logs(caplog)) <= 2  # once per process (b notices at its own heartbeat)

        own_redis_server.start()
        for _ in range(40):  # the next heartbeat probes Redis and ends the degraded state
            mock_clock.jump(1.0)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # real time: Redis answers
            if not a.statistics().degraded:
                break
        assert not a.statistics().degraded
        await quota.acquire(1)
        assert await quota.level() == 29.0  # a fresh shared bucket in the restarted Redis, used again
        assert [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]


async def test_a_hung_redis_costs_a_request_at_most_the_call_cap(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(own_redis_server, 1) as (a,):
        quota = a.quota("up", "rpm", 30)
        await quota.acquire(1)  # shared
        own_redis_server.freeze()
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(1)  # the cap, then the local share (starting empty) refused it
        assert trio.current_time() == 0.25
        assert a.statistics().degraded
        calls = a.statistics().round_trips
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(1)
        assert trio.current_time() == 0.25  # degraded: Redis is not asked again
        assert a.statistics().round_trips == calls
        own_redis_server.thaw()


async def test_a_request_deadline_shorter_than_the_cap_bounds_the_redis_call(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(own_redis_server, 1) as (a,):
        quota = a.quota("up", "rpm", 30)
        own_redis_server.freeze()
        with trio.move_on_after(0.1):
            await quota.acquire(1)
        assert trio.current_time() == 0.1
        assert not a.statistics().degraded  # the caller's deadline, not Redis's fault
        own_redis_server.thaw()
