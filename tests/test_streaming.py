"""Engine.stream: per-field events for every adapter and program shape, policies, cancellation."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import dspy
import h11
import pytest
import trio
import trio.testing

from dspy_trio.engine import (
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    InvalidInputError,
    LMConfig,
    OpenAISettings,
    OverloadedError,
    ProgramSpec,
    SimulatedSettings,
    SlowConsumerError,
    StatusEvent,
    StreamOptions,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine.lm import SimulatedLM
from dspy_trio.engine.lm._base import Completion

from .helpers import CountingLM, FailingLM, tasks_living
from .transport_helpers import RawServer, open_raw_server, read_request

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


class _AskTwiceAtOnce(dspy.Module):  # type: ignore[misc]
    """A module calling its one predictor twice concurrently (e.g. two drafts, keep the better)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        answers: dict[str, str] = {}

        async def ask(key: str, text: str) -> None:
            answers[key] = (await self.step.acall(question=text)).answer

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "first", f"{question} alpha")
            nursery.start_soon(ask, "second", f"{question} beta gamma")
        return dspy.Prediction(first=answers["first"], second=answers["second"])


ask_twice_at_once = _AskTwiceAtOnce()


async def test_two_overlapping_calls_of_one_predictor_each_stream_their_own_numbered_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """FieldDelta.call: "a predictor called twice streams numbered calls, each scanned afresh". When the
    two calls overlap (a module that runs them in a nursery), ``new_call`` runs for both before any
    text arrives; each call's text must still go to a scanner of its own (one shared scanner would see
    both interleaved token by token, never a whole ``[[ ## answer ## ]]`` header, and stream no delta
    at all), so each call's deltas rebuild that call's answer."""
    config = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0.01, token_delay=0.01))},
        programs={"at_once": ProgramSpec(f"{__name__}:ask_twice_at_once")},
    )
    async with open_engine(config) as engine, engine.stream("at_once", {"question": "q"}) as events:
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    answers = [e for e in received if isinstance(e, FieldDelta) and e.field == "answer"]
    by_call: dict[int, str] = {}
    for delta in answers:
        by_call[delta.call] = by_call.get(delta.call, "") + delta.text
    outputs = final.result.outputs
    assert sorted(text.strip() for text in by_call.values()) == sorted([outputs["first"], outputs["second"]])


_finished_at: list[float] = []


class _AskAndNote(dspy.Module):  # type: ignore[misc]
    """One predictor call; notes the (virtual) time the program's LM text has all been produced."""

    def __init__(self) -> None:
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        prediction = await self.step.acall(question=question)
        _finished_at.append(trio.current_time())
        return prediction


ask_and_note = _AskAndNote()


async def test_under_drop_a_consumer_that_has_not_read_the_status_event_blocks_the_producer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Backpressure ``drop``: "the producer never waits; the oldest text delta in the buffer is dropped
    to make room". With ``buffer_size=1`` the stream's first event, the ``running`` StatusEvent (never
    dropped), fills the buffer; the first delta then finds no delta to drop, and must not park the
    producer (which would make the program, and its upstream read, wait for the consumer: the
    ``block`` policy). A consumer that reads 100 s later finds the program finished long before, with
    the deltas it could not hold counted as dropped."""
    _finished_at.clear()
    config = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0.01, token_delay=0.01))},
        programs={"noted": ProgramSpec(f"{__name__}:ask_and_note")},
    )
    options = StreamOptions(backpressure="drop", buffer_size=1)
    async with (
        open_engine(config) as engine,
        engine.stream("noted", {"question": "q"}, options=options) as events,
    ):
        started = trio.current_time()
        await trio.sleep(100)  # a consumer that is genuinely slow
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    assert _finished_at
    assert _finished_at[0] - started < 10  # not 100.x: the producer did not wait
    assert final.dropped > 0


class _ChatThenJSON(SimulatedLM):
    """Answers its first call without ChatAdapter's markers (unparsable), its second, the JSONAdapter
    fallback DSPy's ChatAdapter makes, with a JSON object; streams both, a few characters at a time."""

    def __init__(self) -> None:
        super().__init__(first_token_delay=0.0, token_delay=0.0)
        self.calls = 0

    async def complete(self, messages: Any, params: Any, sink: Any) -> Completion:
        self.calls += 1
        text = "I forgot the markers." if self.calls == 1 else '{"answer": "from the json call"}'
        if sink is not None:
            for start in range(0, len(text), 4):
                await sink.send(text[start : start + 4])
        return Completion([text])


async def test_a_chat_programs_json_fallback_call_streams_the_answer_it_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A ``chat`` program whose LM reply lacks the ``[[ ## answer ## ]]`` markers: DSPy's ChatAdapter
    falls back to JSONAdapter and calls the same predictor again (``call=1``). The final answer comes
    from that call ("the outputs are rebuilt from the deltas of the predictor's last call"), so that
    call's JSON reply must be scanned as JSON (a ChatFieldScanner chosen once for the program's adapter
    would find no delta in it): the stream shows the answer it ends with."""
    lm = _ChatThenJSON()
    async with (
        open_engine(EngineConfig(lms={"default": LMConfig()}), lms={"default": lm}) as engine,
        engine.stream("default", {"question": "q"}) as events,
    ):
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent), final
    assert lm.calls == 2
    assert final.result.outputs["answer"] == "from the json call"
    answers = [e for e in received if isinstance(e, FieldDelta) and e.field == "answer"]
    last = max((e.call for e in answers), default=None)
    assert last == 1
    assert "".join(e.text for e in answers if e.call == last) == "from the json call"


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
    ``get`` the whole time. ``drop`` is for consumers that fall behind; this one is always ready, so
    nothing is dropped: the producer lets the waiting consumer run while it handles the read (were
    ``EventBuffer.put`` with room no schedule point, 296 of 300 deltas would be dropped)."""

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
    predictor twice streams both calls' ``answer`` text; each call is numbered (``FieldDelta.call``)
    and scanned afresh, so the last call's deltas rebuild the final answer (one unnumbered run of
    ``("step", "answer")`` deltas would glue the two answers together)."""
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
    # the last call's deltas rebuild the output.
    assert {e.call for e in answers} == {0, 1}
    assert [e.call for e in answers] == sorted(e.call for e in answers)
    rebuilt = "".join(e.text for e in answers if e.call == 1)
    assert rebuilt == final.result.outputs["answer"]
    first = "".join(e.text for e in answers if e.call == 0)
    assert first
    assert first != rebuilt
