"""The per-token path of a stream: LM -> sink -> router -> scanner -> buffer -> consumer.

The engine's own router takes text straight from the backends (no DSPy chunk per token); a foreign
``send_stream`` (a user's channel read with ``dspy.streaming.StreamListener``) still gets DSPy's chunk
shape. Cutting work per token must keep backpressure, cancellation and the one terminal event.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest
import trio
from dspy.streaming import StreamListener

from dspy_trio.engine import (
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    LMConfig,
    OpenAISettings,
    SimulatedSettings,
    StatusEvent,
    StreamOptions,
    open_engine,
)
from dspy_trio.engine import _dspy as engine_dspy
from dspy_trio.engine._event_buffer import EventBuffer
from dspy_trio.engine.lm import ChunkSink, SimulatedLM
from dspy_trio.engine.lm._base import current_chunk_sink
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault

from .helpers import CountingLM, first_request_closed_by_client

FAST = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0, words_per_field=30))


def _no_dspy_chunks(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the engine's own stream built a DSPy chunk")


async def test_the_engines_router_takes_text_without_a_dspy_chunk_per_token(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: Any
) -> None:
    monkeypatch.setattr(engine_dspy, "stream_chunk", _no_dspy_chunks)
    async with (
        open_engine(EngineConfig(lms={"default": FAST})) as engine,
        engine.stream("default", {"question": "q"}) as events,
    ):
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    deltas = [e for e in received if isinstance(e, FieldDelta)]
    assert len(deltas) > 10
    assert "".join(d.text for d in deltas) == final.result.outputs["answer"]


async def test_the_engines_router_takes_text_from_the_http_backend_too(
    monkeypatch: pytest.MonkeyPatch, fake_upstream: FakeUpstream
) -> None:
    monkeypatch.setattr(engine_dspy, "stream_chunk", _no_dspy_chunks)
    config = LMConfig(model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url))
    async with (
        open_engine(EngineConfig(lms={"default": config})) as engine,
        engine.stream("default", {"question": "q"}) as events,
    ):
        received = [event async for event in events]
    assert isinstance(received[-1], FinalEvent)
    deltas = "".join(e.text for e in received if isinstance(e, FieldDelta))
    assert deltas == received[-1].result.outputs["answer"]


async def test_a_foreign_send_stream_still_gets_chunks_dspys_stream_listener_reads(
    autojump_clock: Any,
) -> None:
    """A user's own ``send_stream`` (as ``dspy.streamify`` sets) gets DSPy-shaped chunks that
    ``StreamListener`` turns into the answer, from a ``Predict`` run on an engine backend."""
    program = dspy.Predict("question -> answer")
    listener = StreamListener("answer", predict=program)
    lm = SimulatedLM(first_token_delay=0, token_delay=0, words_per_field=12)
    send, receive = trio.open_memory_channel[Any](0)
    streamed: list[str] = []

    async def listen() -> None:
        async for chunk in receive:
            assert chunk.predict_id == id(program)
            if response := listener.receive(chunk):
                streamed.append(response.chunk)

    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(), send_stream=send):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            prediction = await program.acall(question="What is Trio?")
            await send.aclose()
        if final := listener.finalize():
            streamed.append(final.chunk)
    assert "".join(streamed).strip() == prediction.answer


async def test_a_foreign_send_stream_gets_a_chunk_sink_and_the_router_its_own(autojump_clock: Any) -> None:
    send, _receive = trio.open_memory_channel[Any](1)
    with dspy.context(send_stream=send):
        sink = current_chunk_sink("m")
    assert isinstance(sink, ChunkSink)
    program = dspy.Predict("question -> answer")
    seen: list[Any] = []

    class Spy(SimulatedLM):
        async def complete(self, messages: Any, params: Any, sink: Any) -> Any:
            seen.append(sink)
            return await super().complete(messages, params, sink)

    from dspy_trio.engine._streaming import DeltaRouter

    router = DeltaRouter(program, EventBuffer(100, "block"))
    with dspy.context(lm=Spy(first_token_delay=0, token_delay=0), send_stream=router):
        await program.acall(question="q")
    assert seen[0] is not None
    assert not isinstance(seen[0], ChunkSink)


async def test_a_call_from_a_predictor_the_router_does_not_know_is_not_streamed(autojump_clock: Any) -> None:
    """Text nobody would see is not streamed at all (the backend makes a plain call)."""
    from dspy_trio.engine._streaming import DeltaRouter

    known, stranger = dspy.Predict("question -> answer"), dspy.Predict("question -> answer")
    seen: list[Any] = []

    class Spy(SimulatedLM):
        async def complete(self, messages: Any, params: Any, sink: Any) -> Any:
            seen.append(sink)
            return await super().complete(messages, params, sink)

    buffer = EventBuffer(100, "block")
    router = DeltaRouter(known, buffer)
    with dspy.context(lm=Spy(first_token_delay=0, token_delay=0), send_stream=router):
        await stranger.acall(question="q")
    assert seen == [None]
    assert len(buffer) == 0


async def test_block_policy_still_pauses_the_lm_at_capacity(autojump_clock: Any) -> None:
    """The LM's send is still where it waits (over a socket that pauses its reads: see
    ``test_streaming_network.test_block_policy_backpressure_reaches_the_upstream_socket``)."""
    lm = CountingLM(first_token_delay=0, token_delay=0, words_per_field=500)
    options = StreamOptions(backpressure="block", buffer_size=3)
    async with (
        open_engine(EngineConfig(lms={"default": FAST}), lms={"default": lm}) as engine,
        engine.stream("default", {"question": "q"}, options=options) as events,
    ):
        assert isinstance(await events.__anext__(), StatusEvent)
        await trio.sleep(10)
        assert len(events.buffer) == 3
        assert lm.finished == 0, "the LM waits for the consumer"
        rest = [event async for event in events]
    assert isinstance(rest[-1], FinalEvent)
    assert events.buffer.peak == 3


@pytest.mark.parametrize("stop_after", [1, 5, 50])
async def test_a_consumer_that_stops_mid_stream_closes_the_upstream(
    fake_upstream: FakeUpstream, stop_after: int
) -> None:
    fake_upstream.behavior = Behavior(words_per_field=5_000, token_delay=0.001)
    config = LMConfig(model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url))
    async with open_engine(EngineConfig(lms={"default": config})) as engine:
        with trio.CancelScope() as scope:
            async with engine.stream("default", {"question": "q"}) as events:
                seen = 0
                async for event in events:
                    seen += isinstance(event, FieldDelta)
                    if seen == stop_after:
                        scope.cancel()
        left_at = trio.current_time()
        record = await first_request_closed_by_client(fake_upstream, left_at)
        assert record.tokens_sent < 10_000
        assert engine.statistics().abandoned == 1
        assert engine.statistics().in_flight == 0


@pytest.mark.parametrize(
    "fault", [None, Fault("disconnect", after_tokens=20), Fault("malformed", after_tokens=20)]
)
@pytest.mark.parametrize("policy", ["block", "drop"])
async def test_every_stream_ends_with_exactly_one_terminal_event(
    fake_upstream: FakeUpstream, fault: Fault | None, policy: str
) -> None:
    fake_upstream.behavior = Behavior(words_per_field=200)
    if fault is not None:
        fake_upstream.add_faults(fault)
    config = LMConfig(model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url))
    options = StreamOptions(backpressure=policy, buffer_size=2)  # type: ignore[arg-type]
    async with (
        open_engine(EngineConfig(lms={"default": config})) as engine,
        engine.stream("default", {"question": "q"}, options=options) as events,
    ):
        received = []
        async for event in events:
            received.append(event)
            await trio.sleep(0.001)  # a consumer slower than the producer
    terminals = [e for e in received if isinstance(e, (FinalEvent, ErrorEvent))]
    assert len(terminals) == 1
    assert received[-1] is terminals[0]
    assert isinstance(terminals[0], FinalEvent if fault is None else ErrorEvent)


async def test_a_put_with_room_is_still_a_cancel_point(autojump_clock: Any) -> None:
    buffer = EventBuffer(10, "block")
    with trio.CancelScope() as scope:
        scope.cancel()
        await buffer.put(FieldDelta("self", "answer", "x"))
    assert scope.cancelled_caught
    assert len(buffer) == 0


async def test_a_get_with_events_is_still_a_cancel_point(autojump_clock: Any) -> None:
    buffer = EventBuffer(10, "block")
    await buffer.put(FieldDelta("self", "answer", "x"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await buffer.get()
    assert scope.cancelled_caught
    assert len(buffer) == 1


async def test_a_producer_with_room_does_not_wait_for_the_consumer(autojump_clock: Any) -> None:
    """Puts into a buffer with room complete without a schedule point, so a fast producer hands the
    consumer a batch per wake-up instead of one event per trip through the scheduler."""
    buffer = EventBuffer(8, "block")
    woke: list[int] = []

    async def consumer() -> None:
        while True:
            await buffer.get()
            woke.append(len(buffer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.sleep(1)
        for i in range(8):
            await buffer.put(FieldDelta("self", "answer", str(i)))
        assert woke == [], "the consumer has not run between the puts"
        await trio.sleep(1)
        assert woke == [7, 6, 5, 4, 3, 2, 1, 0]
        nursery.cancel_scope.cancel()
