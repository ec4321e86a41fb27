"""The built-in simulated LM: well-formed answers for any signature, paced exactly on Trio's clock."""

from __future__ import annotations

from typing import Any, Literal

import dspy
import pytest
import trio

from dspy_trio.engine.lm import SimulatedLM


class Typed(dspy.Signature):
    """Answer with typed fields."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    ok: bool = dspy.OutputField()
    kind: Literal["alpha", "beta"] = dspy.OutputField()
    tags: list[str] = dspy.OutputField()


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
async def test_answers_parse_for_every_output_type(adapter: Any) -> None:
    lm = SimulatedLM(first_token_delay=0, token_delay=0)
    with dspy.context(lm=lm, adapter=adapter):
        prediction = await dspy.Predict(Typed).acall(question="What is Trio?")
    assert isinstance(prediction.answer, str)
    assert prediction.answer
    assert prediction.count == 42
    assert prediction.score == 0.5
    assert prediction.ok is True
    assert prediction.kind == "alpha"
    assert isinstance(prediction.tags, list)
    assert len(prediction.tags) == 2


async def test_chain_of_thought_gets_reasoning_and_answer() -> None:
    with dspy.context(lm=SimulatedLM(first_token_delay=0, token_delay=0)):
        prediction = await dspy.ChainOfThought("question -> answer").acall(question="Why?")
    assert prediction.reasoning
    assert prediction.answer


async def test_same_prompt_same_answer_different_prompt_different_answer() -> None:
    lm = SimulatedLM(first_token_delay=0, token_delay=0)
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        first = await program.acall(question="one")
        again = await program.acall(question="one")
        other = await program.acall(question="two")
    assert first.answer == again.answer
    assert first.answer != other.answer


async def test_non_streaming_call_takes_first_token_delay_plus_token_delays(autojump_clock: Any) -> None:
    lm = SimulatedLM(first_token_delay=0.5, token_delay=0.01, words_per_field=4)
    messages = [{"role": "user", "content": "hi"}]
    n_tokens = len(lm.tokens(lm.render(messages)))
    start = trio.current_time()
    await lm.acall(messages=messages)
    assert trio.current_time() - start == pytest.approx(0.5 + (n_tokens - 1) * 0.01, abs=1e-9)


async def test_streaming_paces_each_token_on_the_clock(autojump_clock: Any) -> None:
    lm = SimulatedLM(first_token_delay=0.2, token_delay=0.05, words_per_field=3)
    send, receive = trio.open_memory_channel[Any](0)
    arrivals: list[float] = []
    start = trio.current_time()

    async def consume() -> None:
        async for _chunk in receive:
            arrivals.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        with dspy.context(send_stream=send):
            outputs = await lm.acall(messages=[{"role": "user", "content": "hi"}])
        await send.aclose()
    n = len(lm.tokens(outputs[0]))
    assert arrivals == pytest.approx([0.2 + i * 0.05 for i in range(n)])


async def test_streamed_chunks_concatenate_to_the_returned_text() -> None:
    lm = SimulatedLM(first_token_delay=0, token_delay=0)
    send, receive = trio.open_memory_channel[Any](1000)
    with dspy.context(send_stream=send):
        outputs = await lm.acall(messages=[{"role": "user", "content": "hi"}])
    send.close()
    chunks = [chunk.choices[0].delta.content async for chunk in receive]
    assert len(chunks) > 1
    assert "".join(chunks) == outputs[0]


async def test_usage_is_reported() -> None:
    lm = SimulatedLM(first_token_delay=0, token_delay=0, words_per_field=5)
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        await dspy.Predict("question -> answer").acall(question="q")
    usage = tracker.get_total_tokens()["simulated/lm"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 5


def test_the_sync_path_is_refused_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="async-only"):
        SimulatedLM().forward(messages=[])
