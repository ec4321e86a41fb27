"""When Redis is down or hung: no request waits on it beyond a short cap, limits fall back to this
process's share of the quota, the state is logged once and exported, and it recovers by itself.

Trio's MockClock: it stands still while Redis answers, and jumps after half a second of real idleness, so
a hung Redis shows up as an exact virtual time (the call's cap), never as a hang.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from dspy_trio.engine import RateLimitWaitError
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine.cluster import Cluster, SharedQuota, open_cluster
from dspy_trio.engine.cluster._heartbeat import beat
from dspy_trio.engine.cluster._redis import stand_in_for_redis_time
from tests.redis_server import RedisServer, delaying_proxy, eventually, own_redis_server, prefix

__all__ = ["own_redis_server"]  # fixture


@pytest.fixture
def mock_clock() -> Iterator[trio.testing.MockClock]:
    """Trio's MockClock, which every process's quota script also reads in place of Redis's TIME."""
    with stand_in_for_redis_time(trio.current_time):
        yield trio.testing.MockClock(autojump_threshold=0.5)


@asynccontextmanager
async def clusters(server: RedisServer, count: int, **changes: Any) -> AsyncIterator[list[Cluster]]:
    changes = {"key_prefix": prefix(), "call_timeout": 0.25, "heartbeat_interval": 1.0, **changes}
    config = ClusterConfig(redis_url=server.url, **changes)
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
        quota = a.quota("up", 30, None)
        for _ in range(30):  # never reached Redis: a full share (one process known: all of it)
            await quota.acquire(0)
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(0)
        assert trio.current_time() == 0.0


async def test_redis_stopped_mid_load_falls_back_to_the_share_and_recovers(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes share 30 a minute; a took 20 of them. Redis dies: a's share is 15 a minute, and
    its own 20 of the last minute count against it (what b took meanwhile is unknown), so a waits for
    them to leave the window; Redis comes back (empty): a's grants are sent to the new log."""
    caplog.set_level(logging.WARNING, "dspy_trio.engine.cluster")
    async with clusters(own_redis_server, 2, heartbeat_interval=5.0) as (a, b):
        await beat(a.link)
        assert a.statistics().processes == 2
        quota = a.quota("up", 30, None)
        b.quota("up", 30, None)  # an engine makes its guards' quotas at start: b uses none of it
        for _ in range(20):
            await quota.acquire(0)  # shared: 10 left
        own_redis_server.stop()

        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(0)
        assert a.statistics().degraded
        assert trio.current_time() == 0.0
        calls = a.statistics().round_trips
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(0)
        assert a.statistics().round_trips == calls  # degraded: Redis is not asked per request
        await quota.acquire(0)
        assert trio.current_time() == 60.0  # a's own 20 left the window: 15 a minute from now on
        assert len(unreachable_logs(caplog)) <= 2  # once per process (b notices at its own heartbeat)

        own_redis_server.start()
        await _until_up(mock_clock, a, b)
        # The log was lost with the restart: a's grant made locally is in the new one, and b (which
        # had none) has checked in; three heartbeats after the loss was seen (by a heartbeat, or by the
        # first call after the restart, whichever came first), nothing is unknown any more.
        for _ in range(6):
            mock_clock.jump(a.link.config.heartbeat_interval)
            if await _holds_soon(lambda: _usage_is(quota, 1.0)):  # real time: the heartbeats' Redis calls
                break
        else:
            raise AssertionError(f"the usage never came back to a's one grant: {await quota.usage()}")
        assert trio.current_time() < 120.0  # a's grant (at 60 s) is still in the window
        assert [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]


async def _until_up(clock: trio.testing.MockClock, *processes: Cluster) -> None:
    """Let heartbeats probe Redis until every process has left the degraded state (a first call on a
    connection to the stopped server may fail: the next heartbeat tries again)."""
    for _ in range(10):
        clock.jump(processes[0].link.config.heartbeat_interval)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # real time: Redis answers
        if not any(p.statistics().degraded for p in processes):
            return
    raise AssertionError("Redis answers, but a process stayed degraded")


async def _holds_soon(condition: Callable[[], Awaitable[bool]], seconds: float = 3.0) -> bool:
    """Whether ``condition`` holds within ``seconds`` of real time (virtual time stands still meanwhile:
    the loop never blocks, so the clock does not jump), for Redis calls on a busy machine."""
    limit = time.monotonic() + seconds
    while time.monotonic() < limit:
        if await condition():
            return True
        await trio.lowlevel.checkpoint()
    return False


async def _usage_is(quota: SharedQuota, requests: float) -> bool:
    return (await quota.usage())[0] == requests


async def test_what_was_spent_while_redis_was_unreachable_is_charged_back(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """One process, 30 a minute: 10 shared; Redis hangs; the process knows it is alone and that 20 were
    free, so its share grants those 20. Redis answers again: the 20 reach the shared log, and a process
    that joins then gets nothing before the minute has passed. (The call that found Redis hung ran
    once Redis woke up, and its answer came: the request it reserved for a caller that went on with
    the local share is given back, not charged twice.)"""
    async with clusters(own_redis_server, 1) as (a,):
        quota = a.quota("up", 30, None)
        for _ in range(10):
            await quota.acquire(0)
        own_redis_server.freeze()
        with trio.fail_after(1):
            for _ in range(20):
                await quota.acquire(0)  # the first finds Redis hung (the cap), then the local share
        assert trio.current_time() == 0.25
        assert a.statistics().degraded
        with pytest.raises(RateLimitWaitError), trio.fail_after(30):
            await quota.acquire(0)
        own_redis_server.thaw()
        await eventually(lambda: not quota._left)  # the late answer came
        await _until_up(mock_clock, a)
        await eventually(lambda: _usage_is(quota, 30.0))
        async with clusters(own_redis_server, 1, key_prefix=a.link.config.key_prefix) as (c,):
            with pytest.raises(RateLimitWaitError), trio.fail_after(30):
                await c.quota("up", 30, None).acquire(0)


async def test_a_grant_reserved_before_redis_stopped_is_kept(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """A call waiting for a reservation made in Redis goes at its time, Redis or not."""
    async with clusters(own_redis_server, 1, heartbeat_interval=100.0) as (a,):
        quota = a.quota("up", 1, None)
        await quota.acquire(0)
        granted: list[float] = []

        async def wait_for_it() -> None:
            await quota.acquire(0)
            granted.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await eventually(lambda: _usage_is(quota, 2.0))
            own_redis_server.stop()
        assert granted == [60.0]


async def test_a_hung_redis_costs_a_request_at_most_the_call_cap(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(own_redis_server, 2) as (a, _b):
        await beat(a.link)
        quota = a.quota("up", 30, None)
        for _ in range(20):
            await quota.acquire(0)  # shared: a's 20 already over its share of 15
        own_redis_server.freeze()
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(0)  # the cap, then the local share refused it
        assert trio.current_time() == 0.25
        assert a.statistics().degraded
        calls = a.statistics().round_trips
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota.acquire(0)
        assert trio.current_time() == 0.25  # degraded: Redis is not asked again
        assert a.statistics().round_trips == calls
        own_redis_server.thaw()


async def test_a_request_deadline_shorter_than_the_cap_bounds_the_redis_call(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(own_redis_server, 1) as (a,):
        quota = a.quota("up", 30, None)
        own_redis_server.freeze()
        with trio.move_on_after(0.1):
            await quota.acquire(0)
        assert trio.current_time() == 0.1
        assert not a.statistics().degraded  # the caller's deadline, not Redis's fault
        own_redis_server.thaw()


async def test_a_redis_slower_than_a_second_but_within_the_call_cap_is_subscribed_and_stays_up(
    own_redis_server: RedisServer,
) -> None:
    """Redis answers 1.05 s late (a far region, a loaded server): every call still fits ``call_timeout``
    (2.5 s), so the cluster must work: subscribed (cancels and cool-downs of the other processes
    heard), not degraded. It never subscribed, flapped between degraded and up every few seconds (the
    quota falling back to the local share each time), and a cancel by id failed with
    ``ClusterUnavailableError``. Real clock (the proxy's delay); nothing timed but the proxy's."""
    async with delaying_proxy(own_redis_server.port, 1.05) as port:
        config = ClusterConfig(
            redis_url=f"redis://127.0.0.1:{port}/0",
            key_prefix=prefix(),
            call_timeout=2.5,
            heartbeat_interval=60.0,
        )
        async with open_cluster(config, clock=trio.current_time) as a:  # waits for the subscription
            assert a.subscribed.is_set(), "never subscribed"
            assert not a.statistics().degraded
            assert a.link.degraded_episodes == 0


async def test_one_process_cut_off_from_redis_adds_at_most_its_share_to_the_quota(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """10 a minute, two processes. Only a's link to Redis breaks (its host's network, a slow path that
    passes its call cap): a falls back to its share (5), b still takes from the shared log, which has
    all 10 free. The documented bound of a partial partition, (1 + k/N) times the quota with k of N
    processes cut off, and no more: 15. (The processes keep serving through the partition; a stricter
    quota would need per-process leases of it, at the cost of the capacity they hold while every
    process is connected, and of serving nothing once Redis is down for all.) (a's link is marked down
    the way a failed call marks it; b's stays up.)"""
    async with clusters(own_redis_server, 2, call_timeout=60.0, heartbeat_interval=600.0) as (a, b):
        await beat(a.link)
        await beat(b.link)  # both count two processes
        quota_a, quota_b = a.quota("up", 10, None), b.quota("up", 10, None)
        await quota_a.usage()  # a knows the log: all 10 free
        a.link.mark_down("a's path to Redis broke")
        granted = 0
        for quota in (quota_a, quota_b):
            for _ in range(10):
                with trio.move_on_after(1), contextlib.suppress(RateLimitWaitError):
                    await quota.acquire(0)
                    granted += 1
        assert not b.statistics().degraded
        assert trio.current_time() < 60.0
    assert granted == 15  # 10 from the shared log to b, a's share of 5 to a
