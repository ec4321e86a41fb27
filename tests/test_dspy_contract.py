"""The contract with the pinned DSPy that the engine's LM backends rely on.

DSPy plans to change the LM interface (3.5 moves to Request/Response engines). When this file fails
after a DSPy upgrade, the backends in engine/lm/ need the same change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import dspy
import pytest
import trio
from dspy.streaming import StreamListener

import engine
from engine import _dspy
from engine.lm import ChunkSink, TrioLM
from engine.lm._base import Completion


def test_dspy_version_is_the_pinned_one() -> None:
    assert dspy.__version__ == "3.4.1"


class RecordingLM(TrioLM):
    def __init__(self, answer: str) -> None:
        super().__init__("contract/lm", temperature=0.0)
        self.answer = answer
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    async def acall(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.calls.append((messages, kwargs))
        return await super().acall(prompt, messages, **kwargs)

    async def complete(self, messages: Any, params: Any, sink: ChunkSink | None) -> Completion:
        await trio.lowlevel.checkpoint()
        return Completion([self.answer], {"prompt_tokens": 3, "completion_tokens": 4})


async def test_adapters_await_acall_with_chat_messages_and_parse_a_list_of_strings() -> None:
    lm = RecordingLM("[[ ## answer ## ]]\nBlue.\n\n[[ ## completed ## ]]")
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = await dspy.Predict("question -> answer").acall(question="Sky colour?")
    assert prediction.answer == "Blue."
    [(messages, kwargs)] = lm.calls
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(isinstance(m["content"], str) for m in messages)
    assert "[[ ## answer ## ]]" in messages[0]["content"]
    assert "Sky colour?" in messages[1]["content"]
    assert kwargs == {}


async def test_usage_reported_by_acall_reaches_dspys_usage_tracker() -> None:
    lm = RecordingLM("[[ ## answer ## ]]\nBlue.\n\n[[ ## completed ## ]]")
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        await dspy.Predict("question -> answer").acall(question="Sky colour?")
    assert tracker.get_total_tokens() == {"contract/lm": {"prompt_tokens": 3, "completion_tokens": 4}}


async def test_predict_sets_send_stream_and_caller_predict_for_the_lm() -> None:
    seen: dict[str, Any] = {}

    class Spy(RecordingLM):
        async def complete(self, messages: Any, params: Any, sink: ChunkSink | None) -> Completion:
            seen["sink"] = sink
            return await super().complete(messages, params, sink)

    send, _receive = trio.open_memory_channel[Any](10)
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=Spy("[[ ## answer ## ]]\nx\n\n[[ ## completed ## ]]"), send_stream=send):
        await program.acall(question="q")
    assert seen["sink"] is not None
    assert seen["sink"].predict_id == id(program)


async def test_stream_listener_understands_the_chunks_the_backends_send() -> None:
    program = dspy.Predict("question -> answer")
    listener = StreamListener("answer", predict=program)
    send, receive = trio.open_memory_channel[Any](1)
    sink = ChunkSink(send, "m", id(program))
    pieces = ["[[ ", "## answer ## ]]\n", "Blue ", "sky ", "today.", "\n\n[[ ## completed ## ]]"]
    out = []
    with dspy.context(adapter=dspy.ChatAdapter()):
        for piece in pieces:
            await sink.send(piece)
            chunk = receive.receive_nowait()
            assert chunk.predict_id == id(program)
            if response := listener.receive(chunk):
                out.append(response.chunk)
        if final := listener.finalize():
            out.append(final.chunk)
    assert "".join(out) == "Blue sky today."


@pytest.mark.parametrize(
    ("name", "adapter_type", "answer"),
    [
        (
            "chat",
            dspy.ChatAdapter,
            "[[ ## reasoning ## ]]\nDay.\n\n[[ ## answer ## ]]\nBlue.\n\n[[ ## completed ## ]]",
        ),
        ("json", dspy.JSONAdapter, '{"reasoning": "Day.", "answer": "Blue."}'),
    ],
)
async def test_the_engines_program_context_sends_byte_identical_prompts(
    name: str, adapter_type: type[Any], answer: str
) -> None:
    """The seam's shared adapters and single settings context change nothing DSPy sends."""
    stock, ours = RecordingLM(answer), RecordingLM(answer)
    program = dspy.ChainOfThought("question, context: list[str] -> answer")
    inputs = {"question": "Sky colour?", "context": ["It is day.", "No clouds."]}
    for _ in range(2):  # the second call runs on the cached adapter
        with dspy.context(lm=stock, adapter=adapter_type()), dspy.track_usage():
            await program.acall(**inputs)
        with _dspy.program_context(ours, name, None):
            await program.acall(**inputs)
    assert ours.calls == stock.calls
    assert json.dumps(ours.calls[1], sort_keys=True) == json.dumps(stock.calls[1], sort_keys=True)


def test_only_the_seam_and_the_lm_base_classes_import_dspy() -> None:
    """Every DSPy touchpoint of engine/ is in engine/_dspy.py; the LM backends subclass dspy.BaseLM
    (lm/_base.py) and wrap a stock dspy.LM (lm/threaded.py)."""
    root = Path(engine.__file__).parent
    importers = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"^\s*(import dspy|from dspy[ .])", path.read_text(), re.MULTILINE)
    }
    assert importers <= {"_dspy.py", "lm/_base.py", "lm/threaded.py"}
    assert "_dspy.py" in importers


TYPED_ANSWERS = [
    (
        dspy.ChatAdapter,
        '[[ ## answer ## ]]\nBlue.\n\n[[ ## score ## ]]\n7\n\n[[ ## tags ## ]]\n["x", "y"]\n\n'
        "[[ ## kind ## ]]\nb\n\n[[ ## completed ## ]]",
    ),
    (dspy.JSONAdapter, '{"answer": "Blue.", "score": "7", "tags": ["x", "y"], "kind": "b"}'),
]


class Typed(dspy.Signature):
    """Answer with care."""

    question: str = dspy.InputField()
    context: list[str] = dspy.InputField()
    facts: dict[str, int] = dspy.InputField()
    when: int | str = dspy.InputField()
    answer: str = dspy.OutputField()
    score: int = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    kind: Literal["a", "b"] = dspy.OutputField()


@pytest.mark.parametrize(("adapter_type", "answer"), TYPED_ANSWERS)
async def test_cached_type_adapters_change_no_prompt_and_no_parse(
    adapter_type: type[Any], answer: str
) -> None:
    """``_dspy.cache_type_adapters`` (one pydantic TypeAdapter per type): byte-identical messages and
    equal outputs, for typed inputs and outputs, on both adapters."""
    inputs = {"question": "Sky?", "context": ["day", "clear"], "facts": {"a": 1}, "when": 3}
    runs: list[tuple[str, dict[str, Any]]] = []
    try:
        for enabled in (False, True, True):
            _dspy.cache_type_adapters(enabled)
            lm = RecordingLM(answer)
            with dspy.context(lm=lm, adapter=adapter_type()):
                prediction = await dspy.Predict(Typed).acall(**inputs)
            runs.append((json.dumps(lm.calls, sort_keys=True), dict(prediction.items())))
    finally:
        _dspy.cache_type_adapters(False)
    assert runs[0] == runs[1] == runs[2]
    assert (int, "<class 'int'>") in _dspy._TYPE_ADAPTERS  # the cached runs did go through the cache
    assert runs[0][1] == {"answer": "Blue.", "score": 7, "tags": ["x", "y"], "kind": "b"}


@pytest.mark.parametrize(("adapter_type", "answer"), TYPED_ANSWERS)
async def test_cached_signature_fields_change_no_prompt_and_no_parse(
    adapter_type: type[Any], answer: str
) -> None:
    """``_dspy.cache_signature_fields`` (a signature's fields split once per class): byte-identical
    messages and equal outputs, for a typed signature and a ChainOfThought's extended one."""
    inputs = {"question": "Sky?", "context": ["day", "clear"], "facts": {"a": 1}, "when": 3}
    runs: list[tuple[str, dict[str, Any]]] = []
    try:
        for enabled in (False, True, True):
            _dspy.cache_signature_fields(enabled)
            lm = RecordingLM(answer)
            with dspy.context(lm=lm, adapter=adapter_type()):
                prediction = await dspy.Predict(Typed).acall(**inputs)
            runs.append((json.dumps(lm.calls, sort_keys=True), dict(prediction.items())))
    finally:
        _dspy.cache_signature_fields(False)
    assert runs[0] == runs[1] == runs[2]
    assert Typed in _dspy._SIGNATURE_FIELDS  # the cached runs did go through the cache


def test_cached_signature_fields_follow_every_way_dspy_derives_or_edits_a_signature() -> None:
    """New classes from ``append``/``prepend``/``delete``/``with_updated_fields``/``with_instructions``
    get their own fields; an edited field's prefix is seen; the returned dicts are the caller's own."""
    try:
        _dspy.cache_signature_fields(True)
        base = dspy.Signature("question -> answer")
        assert list(base.input_fields) == ["question"]
        assert list(base.output_fields) == ["answer"]
        grown = base.append("context", dspy.InputField(), type_=str).prepend(
            "reasoning", dspy.OutputField(), type_=str
        )
        assert list(grown.input_fields) == ["question", "context"]
        assert list(grown.output_fields) == ["reasoning", "answer"]
        assert list(grown.fields) == ["question", "context", "reasoning", "answer"]
        assert list(grown.delete("context").input_fields) == ["question"]
        assert list(base.input_fields) == ["question"]  # the base is unchanged
        renamed = base.with_updated_fields("answer", prefix="Final:")
        assert renamed.output_fields["answer"].json_schema_extra["prefix"] == "Final:"
        assert base.with_instructions("Be brief.").input_fields.keys() == base.input_fields.keys()
        mine = base.input_fields
        mine.clear()  # a caller that edits what it got
        assert list(base.input_fields) == ["question"]
        cot = dspy.ChainOfThought("question -> answer").predict.signature
        _dspy.cache_signature_fields(False)
        stock = (list(cot.input_fields), list(cot.output_fields))
        _dspy.cache_signature_fields(True)
        assert (list(cot.input_fields), list(cot.output_fields)) == stock
    finally:
        _dspy.cache_signature_fields(False)
