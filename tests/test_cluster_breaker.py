"""Circuit breakers shared through a real redis-server: an opening reaches the other processes (within
100 ms of wall time, between two real processes), half-open probes are counted across the cluster, a
heard opening is bounded like one's own, and a Redis that is down leaves each process its own breaker.

The MockClock tests use Trio's clock as the shared one (``clock=trio.current_time``); the clock stands
still while Redis answers and jumps after half a second of real idleness.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from dspy_trio.engine import BreakerSettings, CircuitOpenError, UpstreamServerError
from dspy_trio.engine._breaker import CircuitBreaker
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine.cluster import Cluster, open_cluster
from tests.redis_server import (
    REDIS,
    RedisServer,
    cuttable_proxy,
    eventually,
    own_redis_server,
    prefix,
    redis_server,
)

__all__ = ["own_redis_server", "redis_server"]  # fixtures

SETTINGS = BreakerSettings(min_calls=2, failure_ratio=1.0, open_for=5.0, half_open_calls=1)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.5)


def config(server: RedisServer, key_prefix: str | None = None, **changes: Any) -> ClusterConfig:
    changes = {"call_timeout": 60.0, "heartbeat_interval": 600.0, **changes}
    return ClusterConfig(redis_url=server.url, key_prefix=key_prefix or prefix(), **changes)


@asynccontextmanager
async def clusters(
    server: RedisServer, count: int, *, clocks: list[Callable[[], float]] | None = None, **changes: Any
) -> AsyncIterator[list[Cluster]]:
    """``count`` processes' views of one cluster (each its own connection), on Trio's clock."""
    shared = config(server, **changes)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                open_cluster(shared, clock=clocks[i] if clocks else trio.current_time)
            )
            for i in range(count)
        ]


async def made(
    cluster: Cluster, settings: BreakerSettings = SETTINGS, *, longest_open: float = 60.0, lm: str = "up"
) -> CircuitBreaker:
    """``cluster``'s breaker of ``lm``, once it has read what Redis keeps of it (in the background:
    on the MockClock, an opening heard after the clock jumped would count from then)."""
    breaker = cluster.breaker(lm, settings, longest_open=longest_open)
    await cluster._breakers[lm].read_once.wait()
    return breaker


async def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        ticket = await breaker.admit()
        breaker.failed(ticket, UpstreamServerError("503", status=503))


async def test_an_opening_in_one_process_opens_the_others_until_the_same_instant(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(redis_server, 3) as (a, b, c):
        breakers = [await made(x) for x in (a, b, c)]
        await trio.sleep(1.0)
        await fail(breakers[0], 2)  # opens at t=1 until t=6
        await eventually(lambda: breakers[1].state == "open" and breakers[2].state == "open")
        for breaker in breakers:
            assert breaker.statistics().open_remaining == 5.0
        with pytest.raises(CircuitOpenError):
            await breakers[1].admit()  # fails fast there too, without a call of its own
        other = await made(a, lm="other")
        assert other.state == "closed"  # an opening is per LM


async def test_half_open_probes_are_counted_across_the_cluster(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(redis_server, 2) as (a, b):
        breaker_a, breaker_b = [await made(x) for x in (a, b)]
        await fail(breaker_a, 2)
        await eventually(lambda: breaker_b.state == "open")
        mock_clock.jump(5.0)
        assert breaker_a.state == breaker_b.state == "half_open"
        probe = await breaker_a.admit()
        with pytest.raises(CircuitOpenError, match="other processes are probing"):
            await breaker_b.admit()  # the one probe of the cluster is a's
        with pytest.raises(CircuitOpenError):
            await breaker_b.admit()  # and b does not ask Redis again meanwhile
        breaker_a.succeeded(probe)
        assert breaker_a.state == "closed"
        await eventually(lambda: breaker_b.state == "closed")  # b heard the probe succeed
        assert not (await breaker_b.admit()).probe


async def test_a_failed_probe_opens_every_process_again_and_a_cancelled_one_frees_its_place(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(redis_server, 2) as (a, b):
        breaker_a, breaker_b = [await made(x) for x in (a, b)]
        await fail(breaker_a, 2)
        await eventually(lambda: breaker_b.state == "open")
        mock_clock.jump(5.0)
        probe = await breaker_b.admit()
        breaker_b.release(probe)  # cancelled: its place goes back to the cluster
        await eventually(lambda: _no_claims(a, "up", breaker_a.epoch))
        probe = await breaker_a.admit()
        breaker_a.failed(probe, UpstreamServerError("503", status=503))  # t=5: open until 10
        await eventually(lambda: breaker_b.epoch == breaker_a.epoch)
        assert breaker_b.state == "open"
        assert breaker_b.statistics().open_remaining == 5.0
        mock_clock.jump(5.0)
        probe = await breaker_b.admit()  # a new opening: a new place
        breaker_b.succeeded(probe)
        await eventually(lambda: breaker_a.state == "closed")


async def _no_claims(cluster: Cluster, lm: str, epoch: str) -> bool:
    value = await cluster.link.client.get(cluster.link.key("breaker", lm, "probes", epoch))
    return int(value or 0) == 0


@pytest.mark.parametrize("sender", ["clock-an-hour-ahead", "infinity", "garbage"])
async def test_an_opening_heard_from_another_process_is_bounded_like_ones_own(
    redis_server: RedisServer,
    mock_clock: trio.testing.MockClock,
    sender: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer whose clock is an hour ahead opens it for just as long as its own would; a message with
    ``Infinity`` for at most its longest opening; garbage is logged and ignored."""
    ahead: Callable[[], float] = lambda: trio.current_time() + 3600.0  # noqa: E731
    async with clusters(redis_server, 2, clocks=[trio.current_time, ahead]) as (a, b):
        breaker_a = await made(a, longest_open=30.0)
        await made(b, longest_open=30.0)
        channel = b.link.key("breaker")
        if sender == "clock-an-hour-ahead":
            await fail(b._breakers["up"].breaker, 2)  # type: ignore[arg-type]
            await eventually(lambda: breaker_a.state == "open")
            assert breaker_a.statistics().open_remaining == 5.0  # its open_for: the sender's clock is moot
        elif sender == "infinity":
            message = json.dumps(
                {"lm": "up", "event": "open", "seconds": math.inf, "epoch": "x", "from": "peer"}
            )
            await b.link.call(lambda: b.link.client.publish(channel, message))
            await eventually(lambda: breaker_a.state == "open")
            assert breaker_a.statistics().open_remaining == 30.0  # its longest opening
        else:
            for garbage in (
                "[]",
                "{}",
                '{"lm": "up", "event": "open"}',
                '{"lm": "up", "event": "?", "epoch": 1}',
                '{"lm": "up", "event": "open", "epoch": "x", "seconds": "?"}',
            ):
                await b.link.call(lambda garbage=garbage: b.link.client.publish(channel, garbage))  # type: ignore[misc]
            # both processes hear them; "{}" names no LM of theirs and is not theirs to judge
            await eventually(lambda: caplog.text.count("malformed circuit-breaker message") == 8)
            nan = '{"lm": "up", "event": "open", "epoch": "x", "seconds": NaN, "from": "peer"}'
            await b.link.call(lambda: b.link.client.publish(channel, nan))  # not a length: ignored
            assert breaker_a.state == "closed"


async def test_a_huge_or_odd_breaker_message_is_ignored_with_a_short_log_line(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A megabyte of garbage, a megabyte-long epoch, a length given as ``true`` and an event of a newer
    version: each ignored, and logged in a line of bounded length (not the megabyte)."""
    async with clusters(redis_server, 2) as (a, b):
        breaker_a = await made(a)
        channel = b.link.key("breaker")
        messages = [
            "x" * 1_000_000,
            json.dumps({"lm": "up", "event": "open", "seconds": 5, "epoch": "e" * 1_000_000, "from": "p"}),
            json.dumps({"lm": "up", "event": "open", "seconds": True, "epoch": "x", "from": "p"}),
            json.dumps({"lm": "up", "event": "half_open", "epoch": "x", "from": "p"}),
        ]
        for message in messages:
            await b.link.call(lambda message=message: b.link.client.publish(channel, message))  # type: ignore[misc]
        # the garbage is no JSON for b either; the others are for a (b has no breaker of "up")
        await eventually(lambda: caplog.text.count("malformed circuit-breaker message") == 5)
        assert breaker_a.state == "closed"
        assert max(len(record.getMessage()) for record in caplog.records) < 1000


@pytest.mark.parametrize(
    "kept",
    [
        ("string", "garbage"),
        ("hash", {"epoch": "x", "half_open_ms": "?"}),
        ("hash", {"epoch": "e" * 10_000, "half_open_ms": "1000"}),
        ("hash-for-ever", {"epoch": "x", "half_open_ms": "1000"}),
    ],
    ids=["not-a-hash", "not-a-number", "huge-epoch", "no-expiry"],
)
async def test_a_malformed_kept_opening_is_ignored_and_redis_still_counts_as_up(
    redis_server: RedisServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    kept: tuple[str, Any],
) -> None:
    async with clusters(redis_server, 1) as (a,):
        key = a.link.key("breaker", "up", "open")
        kind, value = kept
        if kind == "string":
            await a.link.client.set(key, value, px=60_000)
        else:
            await a.link.client.hset(key, value)
            if kind == "hash":
                await a.link.client.pexpire(key, 60_000)
        breaker = await made(a)
        assert breaker.state == "closed"
        assert not a.link.degraded
        assert a.statistics().failures == 0


async def test_with_redis_down_each_process_keeps_its_own_breaker(
    own_redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    async with clusters(own_redis_server, 2, call_timeout=0.25, heartbeat_interval=1.0) as (a, b):
        breaker_a, breaker_b = [await made(x) for x in (a, b)]
        own_redis_server.stop()
        await fail(breaker_a, 2)  # the broadcast cannot go out
        assert breaker_a.state == "open"
        assert breaker_b.state == "closed"
        mock_clock.jump(5.0)
        started = trio.current_time()
        probe = await breaker_a.admit()  # the claim fails within the call cap: a local probe
        assert probe.probe
        assert trio.current_time() - started <= 0.25
        breaker_a.succeeded(probe)
        assert breaker_a.state == "closed"


# --- a process that joins, or comes back, while the breaker is open elsewhere ---------------------------


async def test_a_process_that_starts_while_the_breaker_is_open_elsewhere_starts_open(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """The opening is kept in Redis as its remaining length (Redis's own clock): a process that starts
    meanwhile refuses its first call instead of sending it to the dead upstream."""
    shared = config(redis_server)
    async with open_cluster(shared, clock=trio.current_time) as a:
        breaker_a = await made(a)
        await fail(breaker_a, 2)  # open until t=5
        await eventually(lambda: _written(a, a.link.key("breaker", "up", "open")))
        await trio.sleep(1.0)  # virtual: Redis's key has lived a few real milliseconds
        async with open_cluster(shared, clock=trio.current_time) as b:
            breaker_b = await made(b)
            assert breaker_b.state == "open"
            assert breaker_b.epoch == breaker_a.epoch
            # Redis's clock, not ours: the real second or so this took, not the virtual one
            assert 3.0 < breaker_b.statistics().open_remaining < 5.0
            with pytest.raises(CircuitOpenError):
                await breaker_b.admit()


async def test_a_process_that_starts_while_the_cluster_probes_takes_no_probe_of_its_own() -> None:
    """Real time (Redis keeps the opening on its own clock). A process that starts while the others
    are half-open joins the same opening: the cluster's one probe is out, so its call fails fast; the
    probe's success closes it with the others, and the opening is gone from Redis."""
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    quick = BreakerSettings(min_calls=1, failure_ratio=1.0, open_for=0.3, half_open_calls=1)
    server = RedisServer()
    server.start()
    try:
        shared = config(server, call_timeout=5.0)
        async with open_cluster(shared) as a:
            breaker_a = await made(a, quick)
            await fail(breaker_a)
            await trio.sleep(0.3)
            assert breaker_a.state == "half_open"
            probe = await breaker_a.admit()
            assert probe.probe
            async with open_cluster(shared) as b:
                breaker_b = await made(b, quick)
                assert breaker_b.state == "half_open"
                assert breaker_b.epoch == breaker_a.epoch
                with pytest.raises(CircuitOpenError, match="other processes are probing"):
                    await breaker_b.admit()
                breaker_a.succeeded(probe)
                await eventually(lambda: breaker_b.state == "closed")
                await eventually(lambda: _gone(a, a.link.key("breaker", "up", "open")))
                async with open_cluster(shared) as c:  # starts after: closed
                    breaker_c = await made(c, quick)
                    assert breaker_c.state == "closed"
    finally:
        server.stop()


async def test_a_process_that_lost_redis_learns_the_opening_it_missed_when_redis_answers_again(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """b loses Redis alone (its connections cut) while a's breaker opens: the broadcast never reaches
    b; when b reaches Redis again it reads the opening and refuses its calls too."""
    key_prefix = prefix()
    async with cuttable_proxy(redis_server.port) as proxy:
        direct = config(redis_server, key_prefix, call_timeout=0.25, heartbeat_interval=1.0)
        via_proxy = attrs.evolve(direct, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        async with (
            open_cluster(direct, clock=trio.current_time) as a,
            open_cluster(via_proxy, clock=trio.current_time) as b,
        ):
            breaker_a, breaker_b = [await made(x) for x in (a, b)]
            proxy.cut()
            await trio.sleep(2.0)  # b's subscriber gives up reconnecting (its retries sleep on Trio's clock)
            assert b.link.degraded
            await fail(breaker_a, 2)  # open for 5 s; b hears nothing
            await trio.sleep(0.5)
            assert breaker_b.state == "closed"
            proxy.mend()
            await trio.sleep(2.0)  # b's heartbeat finds Redis again
            await eventually(lambda: not b.link.degraded and breaker_b.state == "open")
            assert breaker_b.epoch == breaker_a.epoch


async def test_an_opening_made_while_redis_was_unreachable_is_told_when_it_answers_again(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """b's breaker opens while b cannot reach Redis (its broadcast is dropped); once b reaches Redis
    again the others learn that opening."""
    key_prefix = prefix()
    async with cuttable_proxy(redis_server.port) as proxy:
        direct = config(redis_server, key_prefix, call_timeout=0.25, heartbeat_interval=1.0)
        via_proxy = attrs.evolve(direct, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        async with (
            open_cluster(direct, clock=trio.current_time) as a,
            open_cluster(via_proxy, clock=trio.current_time) as b,
        ):
            breaker_a, breaker_b = [await made(x) for x in (a, b)]
            proxy.cut()
            await trio.sleep(2.0)  # b's subscriber gives up reconnecting (its retries sleep on Trio's clock)
            assert b.link.degraded
            await fail(breaker_b, 2)  # open until t=5, as b alone knows
            proxy.mend()
            await trio.sleep(2.0)
            await eventually(lambda: breaker_a.state == "open")
            assert breaker_a.epoch == breaker_b.epoch
            assert breaker_a.statistics().open_remaining <= breaker_b.statistics().open_remaining + 0.01


# --- between two real processes, on the wall clock ------------------------------------------------------

_WATCHER = textwrap.dedent(
    """
    import sys, time, trio
    from dspy_trio.engine import BreakerSettings
    from dspy_trio.engine._cluster_config import ClusterConfig
    from dspy_trio.engine.cluster import open_cluster

    async def main() -> None:
        config = ClusterConfig(redis_url=sys.argv[1], key_prefix=sys.argv[2])
        async with open_cluster(config) as cluster:
            settings = BreakerSettings(min_calls=1, failure_ratio=1.0)
            breaker = cluster.breaker("up", settings, longest_open=60.0)
            print("ready", flush=True)
            while breaker.state != "open":
                await trio.sleep(0.001)
            print(f"open {time.time()!r}", flush=True)

    trio.run(main)
    """
)


async def test_a_breaker_opened_in_one_process_is_open_in_the_other_within_100_ms(
    redis_server: RedisServer,
) -> None:
    key_prefix = prefix()
    command = [sys.executable, "-c", _WATCHER, redis_server.url, key_prefix]
    watcher = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert watcher.stdout is not None
    output = watcher.stdout
    buffer = b""

    async def readline() -> str:
        nonlocal buffer
        while b"\n" not in buffer:
            data = await output.receive_some()
            if not data:
                raise AssertionError(f"the other process ended: {buffer!r}")
            buffer += data
        line, _, buffer = buffer.partition(b"\n")
        return line.decode()

    try:
        with trio.fail_after(60):  # a hang guard (the other process starts, imports DSPy)
            line = await readline()
        assert line.strip() == "ready", line
        async with open_cluster(
            config(redis_server, key_prefix, call_timeout=0.5, heartbeat_interval=1.0)
        ) as me:
            await me.subscribed.wait()
            breaker = me.breaker("up", BreakerSettings(min_calls=1, failure_ratio=1.0), longest_open=60.0)
            opened = time.time()
            await fail(breaker)
            with trio.fail_after(30):  # a hang guard; the bound under test is below
                line = await readline()
        seen = float(line.split()[1])
        logging.getLogger(__name__).info(
            "opening seen by the other process after %.1f ms", (seen - opened) * 1000
        )
        assert seen - opened < 0.1
    finally:
        watcher.kill()
        await watcher.wait()
        await output.aclose()


async def test_a_probe_given_back_after_its_place_expired_leaves_no_key_for_ever(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """A probe's place expires after ``open_for``; one cancelled after that gives its place back to a key
    that is gone: the counter it leaves must expire too (a DECR alone made a -1 that stayed for ever).

    The place's expiry is the test's ``DEL`` (Redis expires it ``open_for`` of real time after the
    claim): with an ``open_for`` of 200 ms the counter left lived 200 ms too, and a test process
    stalled that long on a busy machine never saw it."""
    settings = BreakerSettings(min_calls=2, failure_ratio=1.0, open_for=30.0)
    async with clusters(redis_server, 2) as (a, b):
        breaker_a, breaker_b = [await made(x, settings) for x in (a, b)]
        await fail(breaker_a, 2)
        await eventually(lambda: breaker_b.state == "open")
        mock_clock.jump(30.0)
        probe = await breaker_b.admit()
        key = b.link.key("breaker", "up", "probes", breaker_b.epoch)
        assert 29_000 < await b.link.client.pttl(key) <= 30_000  # the place expires with open_for
        await b.link.client.delete([key])  # it expired
        breaker_b.release(probe)  # cancelled, late
        await eventually(lambda: _written(b, key))
        assert await b.link.client.get(key) == "-1"
        assert 0 < await b.link.client.pttl(key) <= 30_000


async def _written(cluster: Cluster, key: str) -> bool:
    return bool(await cluster.link.client.exists([key]))


async def _gone(cluster: Cluster, key: str) -> bool:
    return not await _written(cluster, key)
