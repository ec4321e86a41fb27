"""Upstream connections the peer closed are reaped promptly, without waiting for the next request
(issue #12, item 12: after load stopped, 102 sockets sat in CLOSE-WAIT until the pool was next used).

Real sockets on 127.0.0.1: the fake upstream closes idle kept-alive connections with a half-close and
records when the client closed its end in turn."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from dspy_trio.engine import EngineConfig, LMConfig, open_engine
from dspy_trio.engine.lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM, TrioLM
from dspy_trio.engine.testing import Behavior, FakeUpstream, open_fake_upstream

from .helpers import HANG_GUARD

MESSAGES = [{"role": "user", "content": "What is Trio?"}]
CALLS = 5


def backend(kind: str, upstream: FakeUpstream, http: HTTPSettings) -> TrioLM:
    if kind == "anthropic":
        return AnthropicLM("anthropic/m", api_base=upstream.url, http=http)
    return OpenAICompatibleLM("openai/m", api_base=upstream.url, http=http)


async def load(lm: TrioLM) -> None:
    """CALLS concurrent calls, so CALLS connections are kept alive afterwards."""
    async with trio.open_nursery() as nursery:
        for _ in range(CALLS):
            nursery.start_soon(lambda: lm.acall(messages=MESSAGES))


def all_reaped(upstream: FakeUpstream) -> bool:
    closes = upstream.idle_closes
    return len(closes) == CALLS and all(c.client_closed_at is not None for c in closes)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_closed_idle_connections_are_reaped_without_a_new_request(kind: str) -> None:
    async with open_fake_upstream(Behavior(latency=0.05, idle_timeout=0.2)) as upstream:
        lm = backend(kind, upstream, HTTPSettings(idle_check_interval=0.05))
        async with trio.open_nursery() as nursery:
            await nursery.start(lm.maintain)
            await load(lm)
            with trio.fail_after(HANG_GUARD):
                await upstream.wait_for(all_reaped)
            nursery.cancel_scope.cancel()
        await lm.aclose()
    for close in upstream.idle_closes:
        assert close.client_closed_at is not None
        assert close.client_closed_at - close.closed_at < 1.0
    assert len(upstream.records) == CALLS, "reaping sent no request"


async def test_without_upkeep_the_client_keeps_closed_connections_in_close_wait() -> None:
    """The control: what httpcore does on its own, and why the upkeep task exists."""
    async with open_fake_upstream(Behavior(idle_timeout=0.1)) as upstream:
        lm = backend("openai", upstream, HTTPSettings())
        await load(lm)
        with trio.fail_after(HANG_GUARD):
            await upstream.wait_for(lambda u: len(u.idle_closes) == CALLS)
        await trio.sleep(0.5)
        assert all(c.client_closed_at is None for c in upstream.idle_closes)
        await lm.aclose()


async def test_an_open_engine_reaps_its_lms_connections(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(idle_timeout=0.2)
    lm = LMConfig.from_mapping(
        {
            "provider": "openai",
            "model": "m",
            "api_base": fake_upstream.url,
            "http": {"idle_check_interval": 0.05},
        }
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        async with trio.open_nursery() as nursery:
            for i in range(CALLS):  # distinct: identical ones would share one call (single-flight)
                nursery.start_soon(engine.predict, "default", {"question": f"q {i}"})
        with trio.fail_after(HANG_GUARD):
            await fake_upstream.wait_for(all_reaped)
    assert len(fake_upstream.records) == CALLS


async def test_upkeep_of_a_backend_without_connections_returns_at_once() -> None:
    from dspy_trio.engine.lm import SimulatedLM

    lm = SimulatedLM()
    async with trio.open_nursery() as nursery:
        value: Any = await nursery.start(lm.maintain)
    assert value is None
