"""Attacks on the hot-path changes of 2026-11-25: each test here fails on the code it was written
against because of a real defect (see /work/reports/attack4.md)."""

from __future__ import annotations

import functools
import gc
import json
import weakref
from collections.abc import Iterator
from typing import Any

import dspy
import h11
import pytest
import trio
import trio.testing

from dspy_trio.engine import (
    EngineConfig,
    FieldDelta,
    FinalEvent,
    LMConfig,
    OpenAISettings,
    ProgramSpec,
    SimulatedSettings,
    StreamOptions,
    UpstreamTimeoutError,
    open_engine,
    tune_gc_for_serving,
)
from dspy_trio.engine.lm._transport import LeanClient, Timeouts
from dspy_trio.web.server import Server, serve
from tests.web_helpers import settings as web_settings

from .transport_helpers import RawServer, open_raw_server, read_request, wait_closed

# --- transport: the SSE consumer must never be timed out by the read timeout -----------------------


async def test_slow_consumer_of_the_last_unterminated_sse_event_is_not_a_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The body ends (content-length) right after ``data: b`` with no blank line, which arrives in a
    read of its own: the transport dispatches that event at EndOfMessage. The consumer takes 10 s
    on every event under a 5 s read timeout; the read timeout bounds socket silence only, so both
    events must be consumed and the call must succeed. It fails with ReadTimeout: the final
    dispatch runs under the deadline of the last read (``timer.pause()`` is not called on that
    path)."""
    body = b"data: a\n\ndata: b\n"

    async def answer(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body[:9]
        )
        await trio.sleep(1)
        await stream.send_all(body[9:])  # a read of its own, completing no event
        await wait_closed(stream)

    async with open_raw_server(answer) as server:
        client = LeanClient(server.url, timeouts=Timeouts(read=5.0))
        seen: list[tuple[str, float]] = []
        started = trio.current_time()

        async def slow_consumer(name: str, data: str) -> None:
            seen.append((data, trio.current_time() - started))
            await trio.sleep(10)

        failure: UpstreamTimeoutError | None = None
        try:
            await client.post_sse("m", "x", {}, slow_consumer)
        except UpstreamTimeoutError as exc:
            failure = exc
        finally:
            client.close()
        ended = trio.current_time() - started
    assert failure is None, f"the slow consumer was timed out as the upstream: {failure} (seen: {seen})"
    assert [data for data, _ in seen] == ["a", "b"]
    assert ended == 20.0


# --- telemetry: a provider named in the environment -------------------------------------------------


def test_a_tracer_provider_named_in_the_environment_after_import_makes_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``OTEL_PYTHON_TRACER_PROVIDER`` set after ``dspy_trio.engine`` was imported (an application setting up
    its environment in ``main()``): OpenTelemetry's own ``get_tracer_provider()`` loads the SDK's
    provider from it, so stock code traces. ``span()`` read the variable once at import and returns
    the do-nothing context: the requests are never traced."""
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    from dspy_trio.engine import _telemetry

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")
    with _telemetry.span("dspy_trio.predict", request_id="env-1") as current:
        made, recording = current, current is not None and current.is_recording()
    assert not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert made is not None, "span() made no span although a tracer provider is configured"
    assert recording


# --- the garbage collector settings of a serving process --------------------------------------------


@pytest.fixture
def gc_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_for_serving_keeps_automatic_collection_off_when_the_application_turned_it_off(
    gc_restored: None,
) -> None:
    """``gc.set_threshold(0)`` is Python's documented way to turn automatic collection off; the
    function promises to never lower the young threshold, but it must not silently turn collection
    back on either: ``max(0, 10_000)`` makes the process collect every 10,000 allocations again."""
    gc.set_threshold(0, 10, 10)
    settings_now = tune_gc_for_serving()
    assert gc.get_threshold()[0] == 0, f"automatic collection turned back on: {settings_now.thresholds}"


async def test_a_stopped_server_is_garbage_collected(gc_restored: None) -> None:
    """``serve`` returns after ``Server.shutdown()``; what it built (app, engine, state) is then garbage
    and must be collectable, as it is without ``freeze_heap``. With it (the default), the start-up heap
    was frozen for the life of the process: the stopped server's cycles are never collected, and each
    ``serve`` in the same process leaks a whole app and engine. (With ``freeze_heap=False`` the same
    test passes: the state is collected.)"""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(functools.partial(serve, web_settings(), handle_signals=False))
        state = weakref.ref(server.state)
        server.shutdown()
    del server
    gc.collect()
    assert state() is None, "the stopped server's state is still alive after a full collection"


# --- streams: the event buffer yields only when it waits ------------------------------------------


def _sse_answer(words: int) -> bytes:
    """An OpenAI-style event stream of ``question -> answer`` in ChatAdapter's format, one word per
    event, as a whole HTTP response."""
    parts = ["[[ ## answer ## ]]\n", *(f"w{i} " for i in range(words)), "\n\n[[ ## completed ## ]]"]
    events = b"".join(
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": part}}]}).encode() + b"\n\n"
        for part in parts
    )
    body = events + b"data: [DONE]\n\n"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


async def test_drop_policy_drops_nothing_for_a_consumer_that_is_waiting_for_every_event() -> None:
    """An upstream that sends its whole answer in one burst (one TCP read holds all 300 events; a
    fast local model does this) and a consumer that does nothing but read the stream, parked in
    ``get`` the whole time. ``drop`` is for consumers that fall behind; this one is always ready. Yet
    ``EventBuffer.put`` with room is no schedule point, so the producer handles the whole read
    without letting the consumer run once: 296 of 300 deltas are dropped. Before the merge of
    ``stream`` (78c714f), when ``put`` was a schedule point, none were."""

    async def burst(stream: trio.abc.Stream, server: RawServer) -> None:
        while await read_request(stream, h11.Connection(h11.SERVER), server):
            await stream.send_all(_sse_answer(300))

    options = StreamOptions(backpressure="drop", buffer_size=4)
    async with open_raw_server(burst) as upstream:
        lm = LMConfig(model="fake-model", settings=OpenAISettings(api_base=upstream.url, api_key="k"))
        async with open_engine(EngineConfig(lms={"default": lm})) as engine:
            with trio.fail_after(30):
                async with engine.stream("default", {"question": "q"}, options=options) as events:
                    received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    deltas = [event for event in received if isinstance(event, FieldDelta)]
    assert final.dropped == 0, f"{final.dropped} deltas dropped for a consumer waiting on each one"
    assert "".join(delta.text for delta in deltas) == final.result.outputs["answer"]


class _AskTwice(dspy.Module):  # type: ignore[misc]
    """A module calling its one predictor twice: the second answer refines the first."""

    def __init__(self) -> None:
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        first = await self.step.acall(question=question)
        return await self.step.acall(question=first.answer)


ask_twice = _AskTwice()


async def test_deltas_of_a_predictor_called_twice_rebuild_its_final_output(autojump_clock: Any) -> None:
    """README: deltas are per predictor and field and rebuild the outputs. A module that calls the same
    predictor twice streams both calls' ``answer`` text as one run of ``("step", "answer")`` deltas,
    with nothing telling the consumer where the second call starts: the rebuilt text is the two
    answers glued together (``...everycleanly...``), not the final answer. (Also so before the
    merge of ``stream``: the scanner is per predictor, not per LM call.)"""
    config = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))},
        programs={"twice": ProgramSpec(f"{__name__}:ask_twice")},
    )
    async with (
        open_engine(config) as engine,
        engine.stream("twice", {"question": "q"}) as events,
    ):
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    answers = [e for e in received if isinstance(e, FieldDelta) and e.field == "answer"]
    # Both calls stream (the first one's text is what the second refines); each call is numbered, and
    # the last call's deltas rebuild the output. (The fix: FieldDelta.call, a fresh scan per call.)
    assert {e.call for e in answers} == {0, 1}
    assert [e.call for e in answers] == sorted(e.call for e in answers)
    rebuilt = "".join(e.text for e in answers if e.call == 1)
    assert rebuilt == final.result.outputs["answer"]
    first = "".join(e.text for e in answers if e.call == 0)
    assert first
    assert first != rebuilt
