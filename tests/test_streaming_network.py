"""Streams over real sockets against the fake upstream: faults mid-stream, cancel, TCP backpressure."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

from dspy_trio.engine import (
    DSPySettings,
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    LMConfig,
    StreamOptions,
    UpstreamConnectionError,
    UpstreamResponseError,
    UpstreamTimeoutError,
    open_engine,
)
from dspy_trio.engine.lm import HTTPSettings, OpenAISettings
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault

from .helpers import first_request_closed_by_client


def openai_config(upstream: FakeUpstream, **settings: Any) -> EngineConfig:
    config = LMConfig(model="fake-model", settings=OpenAISettings(api_base=upstream.url, **settings))
    return EngineConfig(lms={"default": config})


async def collect(engine: Any, **kwargs: Any) -> list[Any]:
    async with engine.stream("default", {"question": "What is Trio?"}, **kwargs) as events:
        return [event async for event in events]


async def test_a_stream_through_the_http_backend(fake_upstream: FakeUpstream) -> None:
    async with open_engine(openai_config(fake_upstream)) as engine:
        events = await collect(engine)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    text = "".join(e.text for e in events if isinstance(e, FieldDelta))
    assert text == final.result.outputs["answer"]
    assert fake_upstream.records[0].body["stream"] is True
    assert final.result.usage.completion_tokens == fake_upstream.records[0].tokens_sent


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault("disconnect", after_tokens=8), UpstreamConnectionError),
        (Fault("malformed", after_tokens=8), UpstreamResponseError),
    ],
    ids=["disconnect", "malformed"],
)
async def test_mid_stream_faults_end_in_exactly_one_error_event(
    fake_upstream: FakeUpstream, fault: Fault, error: type[Exception]
) -> None:
    fake_upstream.add_faults(fault)
    async with open_engine(openai_config(fake_upstream)) as engine:
        events = await collect(engine)
        assert engine.statistics().failed == 1
    assert any(isinstance(e, FieldDelta) for e in events), "some tokens arrived before the fault"
    assert isinstance(events[-1], ErrorEvent)
    assert isinstance(events[-1].error, error)
    assert sum(isinstance(e, (FinalEvent, ErrorEvent)) for e in events) == 1


async def test_a_stalled_upstream_is_cut_off_by_the_read_timeout(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(first_token_delay=0.0, token_delay=10.0)
    async with open_engine(openai_config(fake_upstream, http=HTTPSettings(read_timeout=0.3))) as engine:
        events = await collect(engine)
    assert isinstance(events[-1], ErrorEvent)
    assert isinstance(events[-1].error, UpstreamTimeoutError)


async def test_leaving_the_stream_closes_the_upstream_connection(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.behavior = Behavior(first_token_delay=0.0, token_delay=0.05, words_per_field=2000)
    async with open_engine(openai_config(fake_upstream)) as engine:
        async with engine.stream("default", {"question": "q"}) as events:
            async for event in events:
                if isinstance(event, FieldDelta):
                    break
        left_at = trio.current_time()
        await first_request_closed_by_client(fake_upstream, left_at)
        assert engine.statistics().abandoned == 1


async def test_block_policy_backpressure_reaches_the_upstream_socket(fake_upstream: FakeUpstream) -> None:
    """A consumer that stops reading stops the upstream's writes once the socket buffers are full."""
    fake_upstream.behavior = Behavior(words_per_field=30_000)
    options = StreamOptions(backpressure="block", buffer_size=8)
    config = openai_config(fake_upstream)
    # No token cap (the backend's default is 1,024): the fake upstream stops at one, as a model does.
    uncapped = {"default": attrs.evolve(config.lms["default"], params={"max_tokens": None})}
    async with (
        open_engine(attrs.evolve(config, lms=uncapped)) as engine,
        engine.stream("default", {"question": "q"}, options=options) as events,
    ):
        await events.__anext__()
        await trio.sleep(1.0)
        stalled_at = fake_upstream.records[0].tokens_sent
        await trio.sleep(0.5)
        assert fake_upstream.records[0].tokens_sent == stalled_at, "the upstream is blocked on send"
        assert stalled_at < 30_000
        assert len(events.buffer) == 8
        rest = [event async for event in events]
    assert isinstance(rest[-1], FinalEvent)
    assert len(rest[-1].result.outputs["answer"].split()) == 30_000


async def test_the_thread_path_streams_too(fake_upstream: FakeUpstream) -> None:
    lm = LMConfig(model="openai/fake-model", settings=DSPySettings(api_base=fake_upstream.url, api_key="k"))
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        events = await collect(engine)
    deltas = [e for e in events if isinstance(e, FieldDelta)]
    assert len(deltas) > 3
    assert isinstance(events[-1], FinalEvent)
    assert "".join(d.text for d in deltas) == events[-1].result.outputs["answer"]
    assert fake_upstream.records[0].body["stream"] is True
