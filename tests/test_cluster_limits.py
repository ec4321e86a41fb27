"""Shared RPM/TPM buckets and the shared cool-down on a real redis-server, driven by Trio's MockClock.

The quota script reads Redis's own clock (``TIME``); with ``mock_clock`` every process's script reads
Trio's clock in its place (one stand-in for all), so its "now" is virtual time: the clock stands still
while Redis answers (real I/O) and moves only when a test jumps it, and every wait is asserted in exact
virtual seconds. A process's own clock (``open_cluster(clock=...)``) is not the script's: tests set it
off to show that it does not matter.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine import RateLimitWaitError
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine._rate_window import Entry, LocalQuota, WindowLog, merge_gap
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.cluster import Cluster, SharedQuota, open_cluster
from dspy_trio.engine.cluster._heartbeat import beat
from dspy_trio.engine.cluster._quota_script import Reply
from dspy_trio.engine.cluster._redis import stand_in_for_redis_time
from dspy_trio.engine.lm._base import Completion
from tests.redis_server import RedisServer, delaying_proxy, eventually, own_redis_server, prefix, redis_server

__all__ = ["own_redis_server", "redis_server"]  # fixtures

# The clock stands still while Redis answers; it jumps by itself only after half a second of real idleness
# (the client's own teardown timers), never while a test is busy with Redis.
IDLE_JUMP = 0.5


@pytest.fixture
def mock_clock() -> Iterator[trio.testing.MockClock]:
    """Trio's MockClock, which every process's quota script also reads in place of Redis's TIME."""
    with stand_in_for_redis_time(trio.current_time):
        yield trio.testing.MockClock(autojump_threshold=IDLE_JUMP)


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


async def _reserved(quota: SharedQuota, requests: float) -> bool:
    return (await quota.usage())[0] >= requests


async def test_rpm_is_shared_two_processes_get_one_quota_between_them(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """30 requests a minute between two processes: 30 at once in total; the next ones wait for the
    window to slide (60 s), first come, first served across processes."""
    async with clusters(redis_server, 2) as (a, b):
        quota_a, quota_b = a.quota("up", 30, None), b.quota("up", 30, None)
        for i in range(30):
            await (quota_a if i % 2 else quota_b).acquire(0)
        assert trio.current_time() == 0.0

        with pytest.raises(RateLimitWaitError, match="would pass the deadline"), trio.fail_after(59):
            await quota_a.acquire(0)  # needs 60 s: refused at once, takes nothing
        assert trio.current_time() == 0.0
        assert (await quota_a.usage())[0] == 30

        done: list[tuple[str, float]] = []

        async def take(name: str, quota: SharedQuota) -> None:
            await quota.acquire(0)
            done.append((name, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "b", quota_b)
            await eventually(lambda: _reserved(quota_a, 31))  # reserved in Redis: the task now sleeps
            nursery.start_soon(take, "a", quota_a)
            await eventually(lambda: _reserved(quota_a, 32))
            mock_clock.jump(60.0)
        assert sorted(done) == [("a", 60.0), ("b", 60.0)]
        assert a.statistics().degraded is False


async def test_tpm_estimate_is_corrected_by_real_usage(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """TPM is charged with the estimate, and the correction (real usage) reaches the shared log."""
    async with clusters(redis_server, 2) as (a, b):
        tpm_a, tpm_b = a.quota("up", None, 600), b.quota("up", None, 600)
        grant = await tpm_a.acquire(500)
        assert (await tpm_b.usage())[1] == 500
        grant.commit(40)  # the call used 40 tokens
        await tpm_a.flush(idle_after=0.0)
        assert (await tpm_b.usage())[1] == 40
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


# --- the Lua script against the local window, on random operations ------------------------------------


@attrs.define
class Model:
    """The local window (engine/_rate_window.py) driven as the script is: corrections of a process
    reach the log with that process's next call."""

    rpm: float
    tpm: float
    log: WindowLog = attrs.Factory(lambda self: WindowLog(merge_gap(self.rpm)), takes_self=True)
    queued: dict[int, list[tuple[Entry, float, float]]] = attrs.Factory(lambda: {0: [], 1: []})

    def call(self, process: int, now: float) -> None:
        self.log.expire(now)
        for entry, requests, tokens in self.queued[process]:
            self.log.correct(entry, requests, tokens, now)
        self.queued[process] = []

    def take(self, process: int, now: float, tokens: float, max_wait: float) -> tuple[float, Entry | None]:
        self.call(process, now)
        at = self.log.earliest(now, 1.0, tokens, self.rpm, self.tpm)
        if at - now > 0 and at - now >= max_wait:
            return at - now, None
        return at - now, self.log.add(at, 1.0, tokens)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.01, 0.5, 7.0, 30.0, 59.99, 60.0])),
        st.tuples(
            st.just("take"),
            st.integers(0, 1),
            st.integers(0, 400),
            st.sampled_from([0.0, 1.0, 30.0, 1e9]),
        ),
        st.tuples(
            st.just("settle"), st.integers(0, 40), st.sampled_from(["refund", "all", "some", "none", "more"])
        ),
    ),
    max_size=40,
)


@attrs.define
class Pair:
    """Two processes' views of one cluster, open in a Trio run of their own (a thread), so that every
    hypothesis example runs against them without opening a cluster each time."""

    token: trio.lowlevel.TrioToken
    clusters: tuple[Cluster, Cluster]
    clock: list[float]
    stop: trio.Event
    examples: int = 0

    def run(self, function: Any, *args: Any) -> Any:
        return trio.from_thread.run(function, *args, trio_token=self.token)


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer) -> Iterator[Pair]:
    ready: list[Pair] = []
    opened = threading.Event()
    clock = [1000.0]

    async def host() -> None:
        config = ClusterConfig(
            redis_url=redis_server.url, key_prefix=prefix(), call_timeout=60.0, heartbeat_interval=600.0
        )
        async with (
            open_cluster(config, clock=lambda: clock[0]) as a,
            open_cluster(config, clock=lambda: clock[0]) as b,
        ):
            ready.append(Pair(trio.lowlevel.current_trio_token(), (a, b), clock, trio.Event()))
            opened.set()
            await ready[0].stop.wait()

    thread = threading.Thread(target=trio.run, args=(host,), daemon=True)
    thread.start()
    assert opened.wait(10)
    try:
        yield ready[0]
    finally:
        trio.from_thread.run_sync(ready[0].stop.set, trio_token=ready[0].token)
        thread.join(10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rpm=st.none() | st.integers(1, 6),
    tpm=st.none() | st.integers(200, 1000),
    ops=operations,
)
def test_the_shared_log_grants_exactly_what_the_local_window_grants(
    pair: Pair, rpm: int | None, tpm: int | None, ops: list[tuple[Any, ...]]
) -> None:
    """Two processes' calls of the script, interleaved, against the local window: the same grants at
    the same instants, the same refusals, the same totals; and, unless a call used more tokens than it
    was granted (which no limiter can foresee), every 60 seconds of the grants keep the quota (with
    what each call was finally charged)."""
    if rpm is None and tpm is None:
        rpm = 3
    clock = pair.clock
    pair.examples += 1
    name = f"up-{pair.examples}"

    async def main() -> None:
        quotas = [cluster.quota(name, rpm, tpm) for cluster in pair.clusters]
        model = Model(float(rpm or 0), float(tpm or 0))
        grants: list[tuple[int, int, float, Entry]] = []  # process, seq, estimate, model entry
        settled: set[int] = set()
        overspent = False
        for op in ops:
            if op[0] == "advance":
                clock[0] += op[1]
            elif op[0] == "take":
                _, process, tokens, max_wait = op
                tokens = min(tokens, tpm or tokens)
                expected_wait, entry = model.take(process, clock[0], tokens, max_wait)
                with stand_in_for_redis_time(lambda: clock[0]):
                    reply = await _take(quotas[process], tokens, max_wait)
                assert reply.wait == expected_wait
                assert (reply.status == "ok") == (entry is not None)
                if entry is not None:
                    grants.append((process, reply.seq, float(tokens), entry))
            elif grants and op[1] % len(grants) not in settled:
                index = op[1] % len(grants)
                settled.add(index)
                process, seq, estimate, entry = grants[index]
                requests, used = {
                    "refund": (-1.0, 0.0),
                    "all": (0.0, estimate),
                    "some": (0.0, estimate // 2),
                    "none": (0.0, 0.0),
                    "more": (0.0, 2 * estimate),  # used more than estimated: charged now if its grant left
                }[op[2]]
                overspent = overspent or used > estimate
                quotas[process]._corrections.append((seq, requests, used - estimate))
                model.queued[process].append((entry, requests, used - estimate))
        for process in (0, 1):
            model.call(process, clock[0])
            with stand_in_for_redis_time(lambda: clock[0]):
                usage = await quotas[process].usage()
        assert usage == (model.log.requests, model.log.tokens)
        if not overspent:
            _assert_within([(e.at, e.requests, e.tokens) for e in model.log], rpm, tpm)

    pair.run(main)


async def _take(quota: SharedQuota, tokens: float, max_wait: float) -> Reply:
    for _ in range(3):
        reply = await quota._run(1.0, tokens, max_wait)
        if reply.status != "epoch":
            return reply
    raise AssertionError("the epoch kept changing")


def _assert_within(entries: list[tuple[float, float, float]], rpm: int | None, tpm: int | None) -> None:
    """Every 60 seconds of ``(time, requests, tokens)`` entries keep the limits."""
    entries = sorted(entries)
    for i, (start, _, _) in enumerate(entries):
        window = [(requests, tokens) for at, requests, tokens in entries[i:] if at < start + 60.0]
        assert rpm is None or sum(r for r, _ in window) <= rpm
        assert tpm is None or sum(t for _, t in window) <= tpm


async def test_a_lost_log_never_starts_full_and_is_exact_once_every_process_sent_its_grants(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """30 a minute, all taken at 0 s (20 by a, 10 by b); then Redis loses its data (FLUSHALL). A
    missing log that started full would grant 30 more at once; it starts with the minute's use unknown,
    and each process's own grants replace the unknown as it sends them."""
    async with clusters(redis_server, 2) as (a, b):
        quota_a, quota_b = a.quota("up", 30, None), b.quota("up", 30, None)
        for _ in range(20):
            await quota_a.acquire(0)
        for _ in range(10):
            await quota_b.acquire(0)
        await beat(a.link)  # a knows two processes share the quota
        await a.link.call(lambda: a.link.client.flushall())

        with pytest.raises(RateLimitWaitError), trio.fail_after(59):
            await quota_a.acquire(0)
        assert trio.current_time() == 0.0
        assert await quota_a.usage() == (30.0, 0.0)  # a's 20 sent, 10 still unknown
        await quota_b.flush(idle_after=0.0)  # b checks in (its heartbeat): its 10 replace the unknown
        assert await quota_a.usage() == (30.0, 0.0)
        assert [e.requests for e in quota_b.mirror] == [10.0]

        granted: list[float] = []

        async def take(quota: SharedQuota) -> None:
            await quota.acquire(0)
            granted.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for quota in (quota_a, quota_b):
                nursery.start_soon(take, quota)
            await eventually(lambda: _reserved(quota_a, 32))
            mock_clock.jump(60.0)
        assert granted == [60.0, 60.0]


async def test_a_lost_log_starts_fully_used_even_when_a_process_counted_too_few_processes(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """30 a minute, three processes took 5 each at 0 s; a counted only itself at its last heartbeat
    (it beat before b and c joined: the first second of a deployment, or of a scale-up). Redis loses
    the log. a recreates it and sends its 5: the 10 of b and c are still unknown, so nothing more fits
    (a count of one freed the unknown there and then, and a took 25 more at once: 40 in the minute).
    Once every live process has beaten since the loss (three heartbeat intervals) and as many have
    sent their grants as the most counted, the unknown is freed: 15 of 30 used."""
    async with clusters(redis_server, 3, heartbeat_interval=5.0) as (a, b, c):
        assert a.link.processes == 1  # each counted the processes open when it joined
        quotas = [cluster.quota("up", 30, None) for cluster in (a, b, c)]
        for quota in quotas:
            for _ in range(5):
                await quota.acquire(0)
        lost = quotas[0].epoch
        await a.link.call(lambda: a.link.client.flushall())
        with pytest.raises(RateLimitWaitError) as refused, trio.fail_after(1):
            await quotas[0].acquire(0)
        assert refused.value.retry_after == 60.0
        assert await quotas[0].usage() == (30.0, 0.0)
        for _ in range(2):  # heartbeats at 5 and 10 s: b and c, idle, send their grants
            mock_clock.jump(5.0)
            await trio.testing.wait_all_tasks_blocked()
            await eventually(lambda: all(_sent(quota, lost) for quota in quotas))
        assert trio.current_time() == 10.0
        assert await quotas[0].usage() == (30.0, 0.0)  # every process sent: still too soon to tell
        mock_clock.jump(5.0)
        await eventually(lambda: _usage_is(quotas[0], 15.0))
        assert trio.current_time() == 15.0
        await quotas[0].acquire(0)
        assert trio.current_time() == 15.0


async def test_a_lost_log_a_new_process_recreated_empty_is_full_once_a_process_that_knew_it_calls(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """30 a minute, a and b took 15 each at 0 s; Redis loses the log, and a process that never reached
    it (a worker started since) is the first to call: it cannot tell a lost log from a new deployment's,
    and takes one. The first call of a process that knew the lost log tells: the minute's use is
    unknown again, a's 15 replace part of it, and nothing more fits until they leave the window (a
    took 14 more at once: b's 15 were forgotten)."""
    async with clusters(redis_server, 2) as (a, b):
        quota_a, quota_b = a.quota("up", 30, None), b.quota("up", 30, None)
        for _ in range(15):
            await quota_a.acquire(0)
            await quota_b.acquire(0)
        await a.link.call(lambda: a.link.client.flushall())
        mock_clock.jump(10.0)
        async with open_cluster(a.link.config, clock=trio.current_time) as new:
            await new.quota("up", 30, None).acquire(0)
            with pytest.raises(RateLimitWaitError) as refused, trio.fail_after(1):
                await quota_a.acquire(0)
            assert refused.value.retry_after == 50.0  # when a's 15 leave the window
            assert await quota_a.usage() == (31.0, 0.0)
            await quota_b.flush(idle_after=0.0)  # b's 15 replace the rest of the unknown
            assert await quota_a.usage() == (31.0, 0.0)


async def test_a_process_that_called_the_recreated_log_first_still_counts_as_having_sent_its_grants(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """30 a minute; a took 20 and knows the log; b never called it. Redis loses the log and b calls
    first: it knows no log, so it recreates it empty and sends its (no) grants in that first call. a's
    first call then marks the minute unknown. Both processes have now sent their grants, so once three
    heartbeat intervals have passed the unknown is freed: only a's 20 count. (It stayed unknown until it
    left the window: b's first call, made before the minute was marked unknown, was never counted, and
    b makes no other first call; 1 run in 4 of test_cluster_fallback's recovery test.)"""
    async with clusters(redis_server, 2, heartbeat_interval=5.0) as (a, b):
        quota_a, quota_b = a.quota("up", 30, None), b.quota("up", 30, None)
        await beat(b.link)
        await beat(a.link)
        assert a.statistics().processes == 2
        for _ in range(20):
            await quota_a.acquire(0)
        await a.link.call(lambda: a.link.client.flushall())
        await beat(b.link)
        await beat(a.link)
        await quota_b.usage()  # b first: the log is recreated empty (b cannot tell it was lost)
        assert await quota_a.usage() == (30.0, 0.0)  # a's first call: the minute is unknown, a's 20 in it
        mock_clock.jump(3 * a.link.config.heartbeat_interval)
        assert await quota_a.usage() == (20.0, 0.0)  # every process has sent its grants: the rest is free


async def test_an_idle_process_sends_its_grants_at_its_heartbeat(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """Two processes; b took 20 of 30 at 0 s and stays idle; the log is lost at 30 s. The whole minute
    is unknown (a, which took none, is refused: the unknown leaves the window at 90 s); b's heartbeat
    sends its 20 (taken at 0 s), which replace 20 of the unknown at their real time. The other 10 stay
    unknown until every live process has beaten three times since the loss (150 s here, past the
    minute): a gets one when b's 20 leave, at 60 s (not at 90 s)."""
    async with clusters(redis_server, 2, heartbeat_interval=40.0) as (a, b):
        quota_a, quota_b = a.quota("up", 30, None), b.quota("up", 30, None)
        await quota_a.usage()  # a knows the log (it takes nothing)
        for _ in range(20):
            await quota_b.acquire(0)
        mock_clock.jump(30.0)
        lost = quota_b.epoch
        await a.link.call(lambda: a.link.client.flushall())
        with pytest.raises(RateLimitWaitError) as refused, trio.fail_after(1):
            await quota_a.acquire(0)
        assert refused.value.retry_after == 60.0
        assert await quota_a.usage() == (30.0, 0.0)
        mock_clock.jump(10.0)  # b's heartbeat (40 s): b checks in with its 20
        await eventually(lambda: _sent(quota_b, lost))
        with pytest.raises(RateLimitWaitError) as refused, trio.fail_after(1):
            await quota_a.acquire(0)
        assert refused.value.retry_after == 20.0
        await quota_a.acquire(0)
        assert trio.current_time() == 60.0


def _sent(quota: SharedQuota, lost: str) -> bool:
    """Whether ``quota`` has sent its grants to the log that replaced the epoch ``lost``."""
    return quota.epoch != lost and all(entry.tag == quota.epoch for entry in quota.mirror)


async def _usage_is(quota: SharedQuota, requests: float) -> bool:
    return (await quota.usage())[0] == requests


async def test_a_cancel_while_waiting_for_the_shared_quota_gives_it_back(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(redis_server, 2) as (a, b):
        quota_a, quota_b = a.quota("up", 2, 100), b.quota("up", 2, 100)
        await quota_a.acquire(10)
        await quota_a.acquire(10)
        with trio.CancelScope() as waiting:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(quota_b.acquire, 50)
                await eventually(lambda: _usage_is(quota_a, 3.0))
                waiting.cancel()
        await quota_b.flush(idle_after=0.0)
        assert await quota_a.usage() == (2.0, 20.0)
        assert (quota_b.mirror.requests, quota_b.mirror.tokens) == (0.0, 0.0)


async def test_a_wait_the_redis_round_trip_would_push_past_the_deadline_is_refused_at_once(
    redis_server: RedisServer,
) -> None:
    """Redis answers 0.2 s late. 2 a minute, taken 59 s ago (on the shared clock): the next fits 1 s
    after them, and the caller's deadline is 0.1 s after that. Without the round trip counted, the wait
    is granted and the caller sleeps past its deadline (a 504 and a wasted reservation); counted, it is
    refused at once with a Retry-After, and nothing stays reserved. Real clock; nothing timed."""
    async with delaying_proxy(redis_server.port, 0.2) as port:
        config = ClusterConfig(redis_url=f"redis://127.0.0.1:{port}/0", key_prefix=prefix(), call_timeout=5.0)
        async with open_cluster(config) as a:
            quota = a.quota("up", 2, None)
            with stand_in_for_redis_time(lambda: trio.current_time() - 59.0):  # taken 59 s ago
                await quota.acquire(0)
                await quota.acquire(0)
            fits_at = next(iter(quota.mirror)).at + 1.0  # on Trio's clock, Redis's from now on
            with stand_in_for_redis_time(trio.current_time):
                with pytest.raises(RateLimitWaitError) as info, trio.fail_at(fits_at + 0.1):
                    await quota.acquire(0)
                assert info.value.retry_after is not None
                assert 0 < info.value.retry_after <= 1.0
                assert (await quota.usage())[0] == 2


# --- attacks on the shared window (the upstream attack round; each fix flips its test) ---------------


async def test_a_cancel_while_the_reply_is_in_flight_leaves_nothing_reserved(
    redis_server: RedisServer,
) -> None:
    """A client leaves (its request's scope is cancelled) while the acquire's round trip is under way:
    Redis already ran the script and reserved the request, the reply never arrives. The call was never
    sent, so the window must not count it; otherwise every disconnect during a round trip burns a
    request of the quota for a minute (with ``rpm = 1``, the whole minute). The same loss happens when
    the reply is later than ``call_timeout`` (and the call then takes from the local share as well).
    Real clock (Redis replies 0.6 s late through a proxy); nothing timed."""
    async with delaying_proxy(redis_server.port, 0.6) as port:
        key_prefix = prefix()
        slow = ClusterConfig(redis_url=f"redis://127.0.0.1:{port}/0", key_prefix=key_prefix, call_timeout=5.0)
        direct = ClusterConfig(redis_url=redis_server.url, key_prefix=key_prefix, call_timeout=30.0)
        async with (
            open_cluster(slow, clock=trio.current_time) as a,
            open_cluster(direct, clock=trio.current_time) as b,
        ):
            quota_a, quota_b = a.quota("up", 10, None), b.quota("up", 10, None)
            await quota_a.usage()  # a knows the log's epoch
            with trio.CancelScope() as leaving:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(quota_a.acquire, 0)
                    await eventually(lambda: _usage_is(quota_b, 1.0))  # the script ran in Redis
                    leaving.cancel()  # the reply is still on its way
            assert not a.statistics().degraded
            await quota_a.flush(idle_after=0.0)  # whatever a queued for the log, sent
            assert await quota_b.usage() == (0.0, 0.0)


async def test_a_reply_later_than_call_timeout_leaves_nothing_reserved(redis_server: RedisServer) -> None:
    """Redis holds a's acquire for 0.6 s (CLIENT PAUSE: a busy or stalled server) and a gives up after
    its ``call_timeout`` (0.3 s): it takes from its local share instead, and that grant is charged back
    when Redis answers again. The script still ran once Redis resumed and reserved a request for a
    caller that was gone: the window must not count it too (it did: 2 for the one call sent). Real
    clock; nothing timed."""
    key_prefix = prefix()
    impatient = ClusterConfig(
        redis_url=redis_server.url, key_prefix=key_prefix, call_timeout=0.3, heartbeat_interval=0.2
    )
    patient = ClusterConfig(redis_url=redis_server.url, key_prefix=key_prefix, call_timeout=30.0)
    async with (
        open_cluster(impatient, clock=trio.current_time) as a,
        open_cluster(patient, clock=trio.current_time) as b,
    ):
        quota_a, quota_b = a.quota("up", 10, None), b.quota("up", 10, None)
        await quota_a.usage()  # a knows the log's epoch
        await b.link.call(lambda: b.link.client.client_pause(600))
        await quota_a.acquire(0)  # from the local share: Redis did not answer in time
        assert a.statistics().degraded

        def settled() -> bool:
            return (
                not a.link.degraded
                and not quota_a._left
                and not quota_a._corrections
                and all(e.tag == quota_a.epoch for e in quota_a.mirror)
            )

        await eventually(settled)  # Redis answers again, a has sent what it queued
        assert await quota_b.usage() == (1.0, 0.0)


async def test_a_correction_after_the_grant_left_the_window_counts_the_same_locally_and_shared(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """One process alone must see the same grants through Redis as without it. A call estimated at 50
    tokens runs 61 s and reports 100 (a long stream): its correction arrives after its grant left the
    window. The next call (100 tokens of a 100 tpm limit) went at once locally and waited 60 s through
    Redis."""
    waits: dict[str, float] = {}
    async with clusters(redis_server, 1) as (a,):
        for name, quota in (("local", LocalQuota("up", None, 100)), ("shared", a.quota("up", None, 100))):
            grant = await quota.acquire(50)
            mock_clock.jump(61)
            grant.commit(100)
            if isinstance(quota, SharedQuota):
                await quota.flush(idle_after=0.0)
            waits[name] = 0.0
            with trio.move_on_after(30):  # a deadline: a wait is refused at once, with its length
                try:
                    await quota.acquire(100)
                except RateLimitWaitError as refused:
                    waits[name] = refused.retry_after or 0.0
    assert waits["local"] == waits["shared"], waits


@pytest.mark.parametrize("off_by", [-5.0, 3600.0])
async def test_processes_whose_clocks_disagree_still_keep_the_quota(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock, off_by: float
) -> None:
    """Two processes, 2 requests a minute; b's own clock is off (5 s behind: a VM without NTP; an hour
    ahead: a container after a host suspend). b takes one at 0 s, a one at 35 s: the window is full
    until 60 s. At 55 s a asks again and must be refused. When the script's "now" was each caller's
    clock, b's grant was logged at -5 s, looked 60 s old at 55 s, and a third request went within 55 s
    of the first (an hour ahead, b's grant held the window for an hour). Redis's clock is the only one
    the script reads; a process's own clock must not matter."""
    config = ClusterConfig(
        redis_url=redis_server.url, key_prefix=prefix(), call_timeout=60.0, heartbeat_interval=600.0
    )
    async with (
        open_cluster(config, clock=trio.current_time) as a,
        open_cluster(config, clock=lambda: trio.current_time() + off_by) as b,
    ):
        quota_a, quota_b = a.quota("up", 2, None), b.quota("up", 2, None)
        sent = []
        await quota_b.acquire(0)
        sent.append(trio.current_time())
        mock_clock.jump(35)  # more than a request's pace (30 s) apart: never merged into one entry
        await quota_a.acquire(0)
        sent.append(trio.current_time())
        mock_clock.jump(20)
        with pytest.raises(RateLimitWaitError) as refused, trio.move_on_after(1):
            await quota_a.acquire(0)
        assert refused.value.retry_after == 5.0  # when b's grant leaves the window
    _assert_within([(at, 1.0, 0.0) for at in sent], 2, None)


@pytest.mark.parametrize("off_by", [-30.0, 3600.0])
async def test_grants_charged_back_after_an_outage_are_dated_by_their_age_not_a_clock(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock, off_by: float
) -> None:
    """4 a minute, two processes: a takes 2 at 0 s; b, cut off from Redis, takes its share (2) locally;
    Redis answers again at 10 s and b charges them back. They were made 10 s before, on Redis's clock
    too, whatever b's own clock says (an hour ahead, they were dated an hour in the future and held the
    window for an hour; 30 s behind, they left it 30 s early): a is refused until 60 s, then served."""
    config = ClusterConfig(
        redis_url=redis_server.url, key_prefix=prefix(), call_timeout=60.0, heartbeat_interval=600.0
    )
    async with (
        open_cluster(config, clock=trio.current_time) as a,
        open_cluster(config, clock=lambda: trio.current_time() + off_by) as b,
    ):
        quota_a, quota_b = a.quota("up", 4, None), b.quota("up", 4, None)
        await quota_b.usage()  # b knows the log (empty)
        await quota_a.acquire(0)
        await quota_a.acquire(0)
        b.link.mark_down("b's path to Redis broke")
        await quota_b.acquire(0)
        await quota_b.acquire(0)
        mock_clock.jump(10)
        b.link.mark_up()
        await quota_b.flush(idle_after=0.0)  # b's two grants reach the log
        assert await quota_a.usage() == (4.0, 0.0)
        with pytest.raises(RateLimitWaitError) as refused, trio.move_on_after(1):
            await quota_a.acquire(0)
        assert refused.value.retry_after == 50.0
        mock_clock.jump(50)
        await quota_a.acquire(0)
        assert trio.current_time() == 60.0


async def test_an_idle_process_checks_in_by_the_time_it_was_idle_not_by_its_clock(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """b's own clock stands still (a broken clock source). b took 20 of 30 at 0 s; the log is lost at
    30 s; b's heartbeat must still check in (b has been idle a heartbeat interval, however its clock
    reads) and send its 20, so that a gets one when they leave the window at 60 s, not at 90 s."""
    config = ClusterConfig(
        redis_url=redis_server.url, key_prefix=prefix(), call_timeout=60.0, heartbeat_interval=40.0
    )
    async with (
        open_cluster(config, clock=trio.current_time) as a,
        open_cluster(config, clock=lambda: 1000.0) as b,
    ):
        quota_a, quota_b = a.quota("up", 30, None), b.quota("up", 30, None)
        await quota_a.usage()
        for _ in range(20):
            await quota_b.acquire(0)
        mock_clock.jump(30.0)
        lost = quota_b.epoch
        await a.link.call(lambda: a.link.client.flushall())
        with pytest.raises(RateLimitWaitError), trio.fail_after(1):
            await quota_a.acquire(0)
        mock_clock.jump(10.0)  # b's heartbeat (40 s): b checks in with its 20
        await eventually(lambda: _sent(quota_b, lost))
        with pytest.raises(RateLimitWaitError) as refused, trio.fail_after(1):
            await quota_a.acquire(0)
        assert refused.value.retry_after == 20.0


async def test_a_process_whose_clock_is_ahead_still_counts_the_others(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """Two processes beat every second; b's clock is 10 s ahead of a's (more than three intervals). Each
    must count two: b's beats must not drop a as silent."""
    config = ClusterConfig(
        redis_url=redis_server.url, key_prefix=prefix(), call_timeout=60.0, heartbeat_interval=1.0
    )
    async with (
        open_cluster(config, clock=trio.current_time) as a,
        open_cluster(config, clock=lambda: trio.current_time() + 10.0) as b,
    ):
        await beat(a.link)
        await beat(b.link)
        await beat(a.link)
        assert (a.statistics().processes, b.statistics().processes) == (2, 2)


@pytest.mark.parametrize("sender", ["clock-an-hour-ahead", "infinity"])
async def test_a_cool_down_heard_from_another_process_is_bounded_like_ones_own(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock, sender: str
) -> None:
    """A process caps a ``Retry-After`` at its policy's ``max_retry_after`` (60 s by default) before it
    pauses the upstream. A pause heard from a peer must be bounded the same: a peer whose clock is an
    hour ahead broadcast a 5 s pause that held this process's calls for 3,605 s, and a message with
    ``Infinity`` (a peer's bug, or anyone who can publish) stopped every call to the upstream until
    restart."""
    config = ClusterConfig(
        redis_url=redis_server.url, key_prefix=prefix(), call_timeout=60.0, heartbeat_interval=600.0
    )
    async with (
        open_cluster(config, clock=trio.current_time) as a,
        open_cluster(config, clock=lambda: trio.current_time() + 3600.0) as b,
    ):
        guard_a = UpstreamGuard("up", UpstreamPolicy(rpm=60), limits=a)
        if sender == "infinity":
            message = json.dumps({"upstream": "up", "seconds": math.inf, "from": "peer"})
            await b.link.call(lambda: b.link.client.publish(b.link.key("cooldown"), message))
        else:
            b.cooldown("up").extend_to(trio.current_time() + 5.0)
        await eventually(lambda: guard_a.statistics().cooldown_remaining > 0)
        assert guard_a.statistics().cooldown_remaining <= guard_a.policy.retry.max_retry_after
        if sender == "clock-an-hour-ahead":  # a pause is sent as its length: the sender's clock is moot
            assert guard_a.statistics().cooldown_remaining == 5.0


async def test_a_cool_down_that_gives_only_its_end_is_ignored(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A message with only an end (``until``) could be read only on this process's clock, which need not
    agree with the sender's (an hour apart, it paused this process an hour): it is malformed, logged and
    ignored; a pause travels as its length (``seconds``)."""
    caplog.set_level(logging.WARNING, "dspy_trio.engine.cluster")
    async with clusters(redis_server, 2) as (a, b):
        guard_a = UpstreamGuard("up", UpstreamPolicy(rpm=60), limits=a)
        channel = b.link.key("cooldown")
        for message in (
            {"upstream": "up", "until": trio.current_time() + 30.0, "from": "peer"},
            {"upstream": "up", "seconds": 5.0, "from": "peer"},
        ):
            await b.link.call(lambda m=message: b.link.client.publish(channel, json.dumps(m)))  # type: ignore[misc]
        await eventually(lambda: guard_a.statistics().cooldown_remaining > 0)
        assert guard_a.statistics().cooldown_remaining == 5.0
        assert any("malformed cool-down" in r.getMessage() for r in caplog.records)
