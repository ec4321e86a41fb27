"""Engine.stream: per-field events for every adapter and program shape, policies, cancellation."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import trio

from dspy_trio.engine import (
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    InvalidInputError,
    LMConfig,
    OverloadedError,
    ProgramSpec,
    SimulatedSettings,
    SlowConsumerError,
    StatusEvent,
    StreamOptions,
    UpstreamServerError,
    open_engine,
)

from .helpers import CountingLM, FailingLM, tasks_living

FAST = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))


def config(**changes: Any) -> EngineConfig:
    programs = {
        "default": ProgramSpec("question -> answer"),
        "cot": ProgramSpec("question -> answer", module="chain_of_thought"),
        "json": ProgramSpec("question -> answer, topic", adapter="json"),
        "typed": ProgramSpec("tests.sample_programs.qa:Classify"),
        "two_step": ProgramSpec("tests.sample_programs.qa:two_step"),
    }
    return EngineConfig(lms={"default": FAST}, programs=programs, **changes)


async def collect(engine: Any, program: str, inputs: dict[str, Any], **kwargs: Any) -> list[Any]:
    async with engine.stream(program, inputs, **kwargs) as events:
        return [event async for event in events]


def texts_by_field(events: list[Any]) -> dict[tuple[str, str], str]:
    texts: dict[tuple[str, str], str] = defaultdict(str)
    for event in events:
        if isinstance(event, FieldDelta):
            texts[event.predictor, event.field] += event.text
    return dict(texts)


@pytest.mark.parametrize(
    ("program", "inputs", "fields"),
    [
        ("default", {"question": "q"}, [("self", "answer")]),
        ("cot", {"question": "q"}, [("predict", "reasoning"), ("predict", "answer")]),
        ("json", {"question": "q"}, [("self", "answer"), ("self", "topic")]),
        (
            "two_step",
            {"question": "q"},
            [("draft", "draft"), ("polish.predict", "reasoning"), ("polish.predict", "answer")],
        ),
    ],
    ids=["chat", "chain_of_thought", "json", "two_predictors"],
)
async def test_deltas_per_predictor_and_field_rebuild_the_final_outputs(
    program: str, inputs: dict[str, Any], fields: list[tuple[str, str]]
) -> None:
    async with open_engine(config()) as engine:
        events = await collect(engine, program, inputs)
    assert isinstance(events[0], StatusEvent)
    assert isinstance(events[-1], FinalEvent)
    assert sum(isinstance(e, (FinalEvent, ErrorEvent)) for e in events) == 1
    texts = texts_by_field(events)
    assert list(texts) == fields, "fields arrive in order, each one whole before the next"
    final = events[-1].result
    for (_predictor, field), text in texts.items():
        if field in final.outputs:
            assert text == final.outputs[field]
    assert final.usage.completion_tokens > 0


async def test_non_string_fields_stream_their_text(autojump_clock: Any) -> None:
    async with open_engine(config()) as engine:
        events = await collect(engine, "typed", {"text": "t", "count": 1})
    assert texts_by_field(events) == {("self", "label"): events[-1].result.outputs["label"]}


async def test_the_first_event_says_how_long_the_request_queued(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=2.0)
    async with (
        open_engine(config(max_in_flight=1), lms={"default": lm}) as engine,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(engine.predict, "default", {"question": "first"})
        await trio.sleep(0.5)
        events = await collect(engine, "default", {"question": "second"})
    assert events[0] == StatusEvent("running", queued=1.5)


async def test_bad_input_and_overload_are_raised_on_entry_before_any_event(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=5.0)
    async with open_engine(config(max_in_flight=1, max_queued=0), lms={"default": lm}) as engine:
        with pytest.raises(InvalidInputError, match="missing input field 'question'"):
            await collect(engine, "default", {})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.predict, "default", {"question": "holds the slot"})
            await trio.sleep(1)
            with pytest.raises(OverloadedError):
                await collect(engine, "default", {"question": "q"})
        stats = engine.statistics()
        assert (stats.invalid, stats.rejected, stats.succeeded) == (1, 1, 1)


async def test_an_upstream_failure_mid_program_is_one_error_event() -> None:
    lm = FailingLM(UpstreamServerError("boom", status=502))
    async with open_engine(config(), lms={"default": lm}) as engine:
        events = await collect(engine, "default", {"question": "q"})
        assert engine.statistics().errors_by_code == {"upstream_server_error": 1}
    assert isinstance(events[-1], ErrorEvent)
    assert isinstance(events[-1].error, UpstreamServerError)
    assert sum(isinstance(e, (FinalEvent, ErrorEvent)) for e in events) == 1


async def test_block_policy_keeps_the_buffer_bounded_and_pauses_the_lm(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.01, token_delay=0.01, words_per_field=200)
    options = StreamOptions(backpressure="block", buffer_size=4)
    async with open_engine(config(), lms={"default": lm}) as engine:
        async with engine.stream("default", {"question": "q"}, options=options) as events:
            first = await events.__anext__()
            assert isinstance(first, StatusEvent)
            await trio.sleep(60)  # a consumer that stalls for a minute
            assert len(events.buffer) == 4
            assert lm.finished == 0, "the LM is paused, not running ahead"
            rest = [event async for event in events]
        assert events.buffer.peak == 4
    assert isinstance(rest[-1], FinalEvent)
    assert lm.finished == 1


async def test_timeout_policy_ends_a_stalled_stream_and_stops_the_lm(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.01, token_delay=0.01, words_per_field=200)
    options = StreamOptions(backpressure="timeout", buffer_size=4, consumer_timeout=3)
    async with open_engine(config(), lms={"default": lm}) as engine:
        async with engine.stream("default", {"question": "q"}, options=options) as events:
            await trio.sleep(60)
            assert (lm.started, lm.finished) == (1, 0)
            assert engine.statistics().in_flight == 0, "the slot was freed when the producer gave up"
            rest = [event async for event in events]
        assert engine.statistics().errors_by_code == {"slow_consumer": 1}
    assert isinstance(rest[-1], ErrorEvent)
    assert isinstance(rest[-1].error, SlowConsumerError)
    assert len(rest) == 5  # the 4 buffered events, then the error


async def test_drop_policy_counts_what_it_drops_and_the_final_is_complete(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.01, token_delay=0.01, words_per_field=100)
    options = StreamOptions(backpressure="drop", buffer_size=4)
    async with open_engine(config(), lms={"default": lm}) as engine:
        async with engine.stream("default", {"question": "q"}, options=options) as events:
            await trio.sleep(60)
            assert lm.finished == 1, "the LM never waited for the consumer"
            rest = [event async for event in events]
        final = rest[-1]
        assert isinstance(final, FinalEvent)
        assert final.dropped > 90
        assert len(final.result.outputs["answer"].split()) == 100
        assert engine.statistics().stream_deltas_dropped == final.dropped
    assert len(rest) <= 5


async def test_coalescing_cuts_the_event_count_and_keeps_the_text(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.01, token_delay=0.001, words_per_field=100)
    options = StreamOptions(coalesce_ms=20, coalesce_chars=200)
    async with open_engine(config(), lms={"default": lm}) as engine:
        plain = await collect(engine, "default", {"question": "q"})
        merged = await collect(engine, "default", {"question": "q"}, options=options)
    assert texts_by_field(plain) == texts_by_field(merged)
    deltas = [e for e in merged if isinstance(e, FieldDelta)]
    assert len(deltas) < len([e for e in plain if isinstance(e, FieldDelta)]) / 5
    assert merged[-1].coalesced > 0


@pytest.mark.parametrize("leave_at", [0, 0.005, 0.5, 1.5])
async def test_leaving_the_block_at_any_stage_cancels_and_leaves_nothing(
    autojump_clock: Any, leave_at: float
) -> None:
    lm = CountingLM(first_token_delay=1.0, token_delay=0.01, words_per_field=50)
    async with open_engine(config(max_in_flight=1), lms={"default": lm}) as engine:
        baseline = tasks_living()
        async with engine.stream("default", {"question": "q"}) as events:
            with trio.move_on_after(leave_at):
                async for _event in events:
                    pass
        stats = engine.statistics()
        assert (stats.in_flight, stats.queued, stats.abandoned) == (0, 0, 1), "leaving early is abandoned"
        assert tasks_living() == baseline
        # The slot is free at once: a new request runs immediately.
        result = await engine.predict("default", {"question": "next"})
        assert result.timings.queued == 0
    assert lm.finished == 1


async def test_caller_deadline_cancels_the_stream(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        with trio.move_on_after(2):
            await collect(engine, "default", {"question": "q"})
        assert trio.current_time() == 2
        assert engine.statistics().timed_out == 1
    assert lm.finished == 0


async def test_engine_close_ends_open_streams_with_an_error_event(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=100.0)
    received: list[Any] = []
    async with (
        trio.open_nursery() as nursery,
        open_engine(config(drain_timeout=3), lms={"default": lm}) as engine,
    ):

        async def consume() -> None:
            received.extend(await collect(engine, "default", {"question": "q"}))

        nursery.start_soon(consume)
        await trio.sleep(1)
    assert isinstance(received[-1], ErrorEvent)
    assert received[-1].error.code == "engine_closed"
    assert trio.current_time() == 4
