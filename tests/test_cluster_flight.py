"""Single-flight and the response cache across processes, through a real ``redis-server``: engines
standing for processes coalesce and share answers; a Redis-backed hit is one round-trip; a corrupt entry
is a miss; Redis stopped mid-run leaves every process calling for itself without a hang; and a leader
*process* killed while it holds the lease is taken over once the lease expires.

The clock is real (Redis and other processes); every wait is bounded, no duration is asserted."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import attrs
import pytest
import trio

from dspy_trio.engine import Engine, EngineConfig, LMConfig, OpenAISettings, open_engine
from dspy_trio.engine._cache_config import CacheConfig
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine.testing.fake_upstream import Behavior, FakeUpstream, open_fake_upstream
from tests.cluster_processes import Process
from tests.redis_server import RedisServer, eventually, own_redis_server, prefix, redis_server

from .helpers import HANG_GUARD, wait_until

__all__ = ["own_redis_server", "redis_server"]  # fixtures

QUESTION = {"question": "What is Trio?"}


def config(server_url: str, upstream: FakeUpstream, key_prefix: str, **cache: Any) -> EngineConfig:
    lm = LMConfig(model="m", settings=OpenAISettings(api_base=upstream.url, api_key="k"))
    return EngineConfig(
        lms={"default": lm},
        cluster=ClusterConfig(redis_url=server_url, key_prefix=key_prefix, secret="s" * 32, call_timeout=0.5),
        cache=CacheConfig(**cache),
        max_in_flight=1024,
    )


def subscribed(*engines: Engine) -> bool:
    return all(e.cluster is not None and e.cluster.subscribed.is_set() for e in engines)


async def test_two_engines_coalesce_through_redis_and_share_their_answers(redis_server: RedisServer) -> None:
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=1.0)) as upstream:
        url = redis_server.url
        async with (
            open_engine(config(url, upstream, shared, backend="redis", ttl=60)) as a,
            open_engine(config(url, upstream, shared, backend="redis", ttl=60)) as b,
        ):
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(a, b))
                results = []

                async def predict(engine: Engine) -> None:
                    results.append(await engine.predict("default", QUESTION))

                async with trio.open_nursery() as nursery:
                    for _ in range(50):
                        nursery.start_soon(predict, a)
                        nursery.start_soon(predict, b)
            assert len(upstream.records) == 1, "one upstream call for both processes"
            assert len({str(r.outputs) for r in results}) == 1
            assert sum(bool(r.usage.total_tokens) for r in results) == 1
            sa, sb = a.statistics().sharing, b.statistics().sharing
            assert sa is not None
            assert sb is not None
            assert sa.coalesced + sb.coalesced == 99

            # A later identical prediction in either process is a hit: one Redis round-trip, no upstream
            # (once the answer's queued write is in).
            await eventually(lambda: _stored(redis_server, shared, 1))
            assert b.cluster is not None
            calls = b.cluster.link.round_trips
            hit = await b.predict("default", QUESTION)
            assert hit.timings.cached
            assert b.cluster.link.round_trips - calls == 1
            assert len(upstream.records) == 1
            keys = await b.cluster.link.call(lambda: b.cluster.link.client.keys(f"{shared}:*"))  # type: ignore[union-attr]
            assert not [k for k in keys if "What is Trio" in k or "lease" in k]  # hashed; no lease left


async def test_scope_key_never_shares_across_api_keys_through_redis(redis_server: RedisServer) -> None:
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=0.5)) as upstream:
        url = redis_server.url
        async with (
            open_engine(config(url, upstream, shared, backend="redis")) as a,
            open_engine(config(url, upstream, shared, backend="redis")) as b,
        ):
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(a, b))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: a.predict("default", QUESTION, owner="alice-key"))
                    nursery.start_soon(lambda: b.predict("default", QUESTION, owner="bob-key"))
                assert len(upstream.records) == 2
                # An answer is stored by a queued write after its prediction ends: wait until both are in.
                await eventually(lambda: _stored(redis_server, shared, 2))
                assert (await b.predict("default", QUESTION, owner="alice-key")).timings.cached
                assert len(upstream.records) == 2


async def _stored(server: RedisServer, key_prefix: str, count: int) -> bool:
    """Whether Redis holds at least ``count`` answers of the deployment ``key_prefix``."""
    command = ["redis-cli", "-p", str(server.port), "--scan", "--pattern", f"{key_prefix}:answer:*"]
    listed = await trio.run_process(command, capture_stdout=True)
    return len(listed.stdout.split()) >= count


async def test_a_corrupt_entry_is_a_miss_logged_once_and_deleted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    shared = prefix()
    async with (
        open_fake_upstream() as upstream,
        open_engine(config(redis_server.url, upstream, shared, backend="redis")) as engine,
    ):
        assert engine.cluster is not None
        link = engine.cluster.link

        async def stored() -> bool:  # the flight stores an answer once its waiter has parsed it
            return bool(await link.call(lambda: link.client.keys(f"{shared}:answer:*")))

        with trio.fail_after(HANG_GUARD):
            await engine.predict("default", QUESTION)
            await eventually(stored)
            (entry,) = await link.call(lambda: link.client.keys(f"{shared}:answer:*"))
            with caplog.at_level(logging.WARNING, logger="dspy_trio.engine.cluster"):
                for garbage in ('{"v": 1, "t": "cut', "\x00\x01binary"):
                    await link.call(lambda garbage=garbage: link.client.set(entry, garbage))
                    result = await engine.predict("default", QUESTION)
                    assert not result.timings.cached
                    assert result.outputs["answer"]
                    await eventually(stored)
            assert len(upstream.records) == 3
            assert sum("could not be read" in r.message for r in caplog.records) == 1
            sharing = engine.statistics().sharing
            assert sharing is not None
            assert sharing.corrupt_entries == 2
            # The good answer of the last miss replaced the garbage.
            assert (await engine.predict("default", QUESTION)).timings.cached


async def test_redis_stopped_mid_run_leaves_each_process_on_its_own_without_a_hang(
    own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=0.3)) as upstream:
        url = own_redis_server.url
        async with (
            open_engine(config(url, upstream, shared, backend="redis")) as a,
            open_engine(config(url, upstream, shared, backend="redis")) as b,
        ):
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(a, b))
                with caplog.at_level(logging.WARNING, logger="dspy_trio.engine.cluster"):

                    async def predict(engine: Engine, question: str) -> None:
                        result = await engine.predict("default", {"question": question})
                        assert result.outputs["answer"]

                    async with trio.open_nursery() as nursery:
                        for i in range(10):
                            nursery.start_soon(predict, a, f"before {i % 2}")
                            nursery.start_soon(predict, b, f"before {i % 2}")
                        await wait_until(lambda: len(upstream.records) >= 1, seconds=HANG_GUARD)
                        own_redis_server.stop()  # while calls are in flight
                    async with trio.open_nursery() as nursery:
                        for _ in range(10):
                            nursery.start_soon(predict, a, "after")
                            nursery.start_soon(predict, b, "after")
                assert a.statistics().succeeded == b.statistics().succeeded == 20
                # Without Redis each process still shares within itself: one call each for "after".
                assert sum(1 for r in upstream.records if "after" in str(r.body)) == 2
                assert a.cluster is not None
                assert a.cluster.statistics().degraded
                down = [r for r in caplog.records if "redis unreachable" in r.message]
                assert 1 <= len(down) <= 2  # once per process


async def test_across_processes_false_keeps_single_flight_in_the_process_and_costs_redis_nothing(
    redis_server: RedisServer,
) -> None:
    """``across_processes = false`` without a cache in Redis: a prediction makes no Redis call, and each
    process shares only its own."""
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=0.5)) as upstream:
        url = redis_server.url
        async with (
            open_engine(config(url, upstream, shared, backend="memory", across_processes=False)) as a,
            open_engine(config(url, upstream, shared, across_processes=False)) as b,
        ):
            assert a.cluster is not None
            assert b.cluster is not None
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(a, b))
                calls = a.cluster.link.round_trips + b.cluster.link.round_trips
                async with trio.open_nursery() as nursery:
                    for _ in range(10):
                        nursery.start_soon(a.predict, "default", QUESTION)
                        nursery.start_soon(b.predict, "default", QUESTION)
            assert len(upstream.records) == 2  # one per process
            heartbeats = 2 * 2  # at most a couple of heartbeats each meanwhile
            assert a.cluster.link.round_trips + b.cluster.link.round_trips - calls <= heartbeats


async def test_a_redis_that_stops_answering_costs_a_claim_the_call_cap_never_the_answer(
    own_redis_server: RedisServer,
) -> None:
    """Redis hangs (SIGSTOP) while the engine is up: the flight's claim gives up at the 0.2 s call cap
    and the flight calls the upstream itself; every prediction is answered (one upstream call: they
    still share within the process)."""
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=0.2)) as upstream:
        hung = config(own_redis_server.url, upstream, shared, backend="redis")
        hung = attrs.evolve(hung, cluster=attrs.evolve(hung.cluster, call_timeout=0.2))
        async with open_engine(hung) as engine:
            assert engine.cluster is not None
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(engine))
                own_redis_server.freeze()
                try:
                    async with trio.open_nursery() as nursery:
                        for _ in range(10):
                            nursery.start_soon(engine.predict, "default", QUESTION)
                finally:
                    own_redis_server.thaw()
            assert engine.statistics().succeeded == 10
            assert len(upstream.records) == 1
            sharing = engine.statistics().sharing
            assert sharing is not None
            assert sharing.redis_fallbacks == 1
            assert engine.cluster.statistics().failures >= 1


@pytest.mark.parametrize("backend", ["off", "memory"])
async def test_with_a_cluster_single_flight_crosses_processes_whatever_the_cache(
    redis_server: RedisServer, backend: str
) -> None:
    """With ``[cluster] redis_url`` and the cache off (the default) or in memory, identical predictions
    in two processes still make one upstream call: the leader hands its answer over in an entry that
    lives a lease TTL, not in a cache (a later prediction makes its own call while the cache is off)."""
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=1.0)) as upstream:
        url = redis_server.url
        async with (
            open_engine(config(url, upstream, shared, backend=backend, lease_ttl=1.0)) as a,
            open_engine(config(url, upstream, shared, backend=backend, lease_ttl=1.0)) as b,
        ):
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(a, b))
                results = []

                async def predict(engine: Engine) -> None:
                    results.append(await engine.predict("default", QUESTION))

                async with trio.open_nursery() as nursery:
                    for _ in range(25):
                        nursery.start_soon(predict, a)
                        nursery.start_soon(predict, b)
                assert len(upstream.records) == 1, "one upstream call for both processes"
                assert len({str(r.outputs) for r in results}) == 1
                assert sum(bool(r.usage.total_tokens) for r in results) == 1
                if backend == "off":
                    await trio.sleep(1.5)  # the hand-off entry has expired
                    assert not (await b.predict("default", QUESTION)).timings.cached
                    assert len(upstream.records) == 2


async def test_an_answer_too_large_to_hand_over_lets_the_other_processes_call_at_once(
    redis_server: RedisServer,
) -> None:
    """An answer over ``max_entry_bytes`` cannot be handed over: the followers in other processes were
    told "released" and claimed the call one after another, so with three processes the last waited for
    three upstream calls in a row (3 s of a 1 s upstream). Told it was too large, each makes its own
    call at once."""
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=1.0, words_per_field=200)) as upstream:
        url = redis_server.url
        small = {"backend": "off", "lease_ttl": 5.0, "max_entry_bytes": 64}
        async with (
            open_engine(config(url, upstream, shared, **small)) as a,
            open_engine(config(url, upstream, shared, **small)) as b,
            open_engine(config(url, upstream, shared, **small)) as c,
        ):
            with trio.fail_after(HANG_GUARD):
                await eventually(lambda: subscribed(a, b, c))

                async def predict(engine: Engine) -> None:
                    await engine.predict("default", QUESTION)

                async with trio.open_nursery() as nursery:
                    for engine in (a, b, c):
                        nursery.start_soon(predict, engine)
                        await trio.sleep(0.05)  # a leads; b and c follow its lease
    leader, first, second = sorted(upstream.records, key=lambda record: record.index)
    assert first.received_at >= leader.completed_at  # (the followers waited for the leader's answer)
    assert second.received_at < first.completed_at  # the followers' calls overlap: not one after another


LEADER = """
import sys, trio
from dspy_trio.engine import CacheConfig, EngineConfig, LMConfig, OpenAISettings, open_engine
from dspy_trio.engine._cluster_config import ClusterConfig

async def main():
    redis_url, key_prefix, api_base = sys.argv[1:4]
    config = EngineConfig(
        lms={"default": LMConfig(model="m", settings=OpenAISettings(api_base=api_base, api_key="k"))},
        cluster=ClusterConfig(redis_url=redis_url, key_prefix=key_prefix, secret="s" * 32),
        cache=CacheConfig(lease_ttl=1.0, across_processes=True),
    )
    async with open_engine(config) as engine:
        print("leader ready", flush=True)
        await engine.predict("default", {"question": "What is Trio?"})
        print("leader answered", flush=True)

trio.run(main)
"""


async def test_a_leader_process_killed_with_its_lease_held_is_taken_over(redis_server: RedisServer) -> None:
    """Another process leads the call (holds the lease) and is killed (SIGKILL: no clean-up): this
    process, following it, takes the call over once the lease expires, and answers."""
    shared = prefix()
    async with open_fake_upstream(Behavior(latency=60)) as upstream:
        leader = Process(
            [sys.executable, "-c", LEADER, redis_server.url, shared, upstream.url],
            {"PYTHONPATH": os.getcwd()},
        )
        try:
            with trio.fail_after(HANG_GUARD):
                await wait_until(lambda: "leader ready" in leader.output(), seconds=HANG_GUARD, poll=0.05)
                await upstream.wait_for(lambda u: len(u.records) == 1)  # the leader's call, lease held
                following = config(redis_server.url, upstream, shared, lease_ttl=1.0, across_processes=True)
                async with open_engine(following) as follower:
                    assert follower.cluster is not None
                    result: list[Any] = []

                    async def follow() -> None:
                        result.append(await follower.predict("default", QUESTION))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(follow)
                        await trio.sleep(0.3)  # the follower has claimed and follows
                        assert len(upstream.records) == 1
                        leader.popen.send_signal(signal.SIGKILL)
                        leader.popen.wait()
                        await upstream.wait_for(lambda u: len(u.records) == 2)  # taken over
                        upstream.release_waiting()
                    assert result[0].outputs["answer"]
                    sharing = follower.statistics().sharing
                    assert sharing is not None
                    assert sharing.takeovers == 1
        finally:
            leader.stop()
