"""The contract with the pinned DSPy that the engine's LM backends rely on.

DSPy plans to change the LM interface (3.5 moves to Request/Response engines). When this file fails
after a DSPy upgrade, the backends in engine/lm/ need the same change. The second half pins the engine
path (``dspy_trio.engine._dspy.TrioEngine`` under ``dspy.LM(engine=...)``), what blocks it in stock DSPy under
Trio, and that it uses no deprecated DSPy API: docs/dspy-engines.md.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import dspy
import dspy.clients.execution
import pytest
import trio
import trio._core._run as trio_run
from dspy.signatures.signature import SignatureMeta
from dspy.streaming import StreamListener
from dspy.utils.exceptions import LMUnexpectedError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from dspy_trio import engine
from dspy_trio.engine import (
    DSPySettings,
    EngineConfig,
    FieldDelta,
    FinalEvent,
    LMConfig,
    ProgramSpec,
    SimulatedSettings,
    _dspy,
    open_engine,
)
from dspy_trio.engine._errors import UpstreamServerError
from dspy_trio.engine.lm import ChunkSink, OpenAICompatibleLM, SimulatedLM, TrioLM
from dspy_trio.engine.lm._base import Completion, Message
from dspy_trio.engine.testing import Behavior, FakeUpstream

from .helpers import FailingLM, first_request_closed_by_client


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
    assert _dspy._SIGNATURE_FIELDS[id(Typed)][0]() is Typed  # the cached runs did go through the cache


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


def test_cached_signature_fields_forget_a_class_once_it_is_gone_and_restore_dspys_own() -> None:
    """The cache is keyed by the class's id: a class that is gone leaves no entry behind (its id may be
    reused by a new class, which must get its own fields), and turning the cache off restores DSPy's
    own properties."""
    stock = (SignatureMeta.input_fields, SignatureMeta.output_fields, SignatureMeta._get_fields_with_type)
    try:
        _dspy.cache_signature_fields(True)
        passing = dspy.Signature("question, context -> answer")
        assert list(passing.input_fields) == ["question", "context"]
        key = id(passing)
        assert _dspy._SIGNATURE_FIELDS[key][0]() is passing
        del passing
        gc.collect()
        assert key not in _dspy._SIGNATURE_FIELDS
        for _ in range(50):  # new classes, some perhaps at the old id: each its own fields
            fresh = dspy.Signature("topic -> summary, title")
            assert (list(fresh.input_fields), list(fresh.output_fields)) == (["topic"], ["summary", "title"])
    finally:
        _dspy.cache_signature_fields(False)
    restored = (SignatureMeta.input_fields, SignatureMeta.output_fields, SignatureMeta._get_fields_with_type)
    assert restored == stock


# --- The engine path: a backend as a DSPy async engine (docs/dspy-engines.md) ----------------------


@pytest.fixture
def dspy_deprecations_are_errors() -> Iterator[None]:
    """Every DeprecationWarning is an error during the test. Not scoped to ``dspy.*`` by module: DSPy
    issues its migration warnings with a stacklevel that skips its own frames, so they are attributed
    to the first caller outside DSPy (the engine, the test) and ``error::DeprecationWarning:dspy.*``
    would never match them (``test_the_deprecation_guard_fails_on_a_deprecated_call`` shows it bites)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.fixture(autouse=True)
def dspy_execution_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_engine_lm`` installs the Trio-safe ``asyncio`` into DSPy's execution module for the rest of
    the process; each test here leaves the module as it found it."""
    monkeypatch.setattr(dspy.clients.execution, "asyncio", dspy.clients.execution.asyncio)


class BackendSpy(SimulatedLM):
    """The simulated LM (first token at 1 s, then one every 0.25 s), recording each call's messages,
    parameters and whether it streamed, and counting the calls that finished."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("first_token_delay", 1.0)
        kwargs.setdefault("token_delay", 0.25)
        kwargs.setdefault("words_per_field", 6)
        super().__init__(**kwargs)
        self.calls: list[tuple[list[Any], dict[str, Any], bool]] = []
        self.finished = 0

    @property
    def supported_params(self) -> set[str]:
        return {"response_format"}  # so that JSONAdapter sends one on both paths

    async def complete(self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any) -> Completion:
        self.calls.append((list(messages), dict(params), sink is not None))
        completion = await super().complete(messages, params, sink)
        self.finished += 1
        return completion


def engine_children(lm: Any) -> int:
    """Tasks alive in the engine LM's nursery (its stream producers)."""
    return len(lm._async_engine_spec.nursery.child_tasks)


async def stream_field(
    lm: Any, program: Any, field: str, adapter_name: str = "chat", **inputs: Any
) -> tuple[Any, list[tuple[float, str]]]:
    """Run ``program`` with a stream, reading ``field`` with a StreamListener as a user would: the
    prediction, and each streamed piece of the field with the virtual time it arrived."""
    send, receive = trio.open_memory_channel[Any](0)
    listener = StreamListener(field, predict=program)
    pieces: list[tuple[float, str]] = []

    async def consume() -> None:
        async for chunk in receive:
            if (response := listener.receive(chunk)) is not None:
                pieces.append((trio.current_time(), response.chunk))

    # The listener reads the adapter from DSPy's settings: the reader runs in the same context.
    with dspy.context(lm=lm, adapter=_dspy.adapter(adapter_name)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with dspy.context(send_stream=send):
                prediction = await program.acall(**inputs)
            await send.aclose()
    return prediction, pieces


@pytest.mark.usefixtures("dspy_deprecations_are_errors")
@pytest.mark.parametrize("adapter_name", ["chat", "json"])
@pytest.mark.parametrize("provider", ["simulated", "openai", "anthropic", "dspy"])
async def test_the_engine_predicts_and_streams_fields_with_no_deprecated_dspy_api(
    fake_upstream: FakeUpstream, provider: str, adapter_name: str
) -> None:
    """Today's path, every provider (the Trio-native backends' ``TrioLM.acall``, and a stock
    ``dspy.LM`` in worker threads): ``dspy_trio.engine.predict`` and a per-field ``dspy_trio.engine.stream``
    raise no DeprecationWarning, so the day they use an API DSPy deprecates, this fails."""
    lm = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))
    if provider != "simulated":
        model = "openai/fake-model" if provider == "dspy" else "fake-model"
        table = {"provider": provider, "model": model, "api_base": fake_upstream.url, "api_key": "sk-test"}
        lm = LMConfig.from_mapping(table)
    programs = {"qa": ProgramSpec("question -> answer", adapter=adapter_name)}
    async with open_engine(EngineConfig(lms={"default": lm}, programs=programs)) as engine:
        predicted = await engine.predict("qa", {"question": "Sky?"})
        async with engine.stream("qa", {"question": "Sky?"}) as events:
            streamed = [event async for event in events]
    final = streamed[-1]
    assert isinstance(final, FinalEvent)
    deltas = [event.text for event in streamed if isinstance(event, FieldDelta) and event.field == "answer"]
    assert len(deltas) > 1
    assert "".join(deltas) == final.result.outputs["answer"] == predicted.outputs["answer"]


@pytest.mark.usefixtures("dspy_deprecations_are_errors")
async def test_a_stock_lm_in_a_worker_thread_answers_an_lm15_request_plain_and_streamed(
    fake_upstream: FakeUpstream,
) -> None:
    """The route off ``lm(messages=...)`` (removed in 3.5) for the worker-thread backend already works
    in 3.4: a stock ``dspy.LM`` called with a ``Request`` from an anyio worker thread under Trio answers
    with a ``Response``, and streams its chunks to ``send_stream`` from the thread."""
    lm = LMConfig(model="openai/fake-model", settings=DSPySettings(api_base=fake_upstream.url, api_key="k"))
    inner = lm.build_lm().inner
    request = dspy.lm15.Request(
        model=inner.model,
        system="Your output fields are:\n1. `answer` (str):",
        messages=(dspy.lm15.Message.user("Sky?"),),
    )
    plain = await anyio.to_thread.run_sync(functools.partial(inner, request))
    send, receive = trio.open_memory_channel[Any](1000)
    with dspy.context(send_stream=send):
        streamed = await anyio.to_thread.run_sync(functools.partial(inner, request))
    send.close()
    inner.close()
    chunks = [chunk.choices[0].delta.content async for chunk in receive]
    assert isinstance(plain, dspy.lm15.Response)
    assert plain.text.startswith("[[ ## answer ## ]]")
    assert plain.usage.output_tokens
    assert "".join(chunk for chunk in chunks if chunk) == streamed.text == plain.text
    assert [record.stream for record in fake_upstream.records] == [False, True]


@pytest.mark.usefixtures("dspy_deprecations_are_errors")
@pytest.mark.parametrize("adapter_name", ["chat", "json"])
async def test_the_engine_path_predicts_and_streams_a_field_under_trio_with_no_deprecated_dspy_api(
    autojump_clock: Any, adapter_name: str
) -> None:
    """A prediction runs through ``TrioEngine.complete`` and a streamed one through ``TrioEngine.stream``;
    the field arrives piece by piece, the same pieces at the same instants as through ``TrioLM.acall``;
    usage reaches DSPy's tracker; and no DeprecationWarning is raised anywhere on the way."""
    backend = BackendSpy()
    program = dspy.Predict("question -> answer")
    started = trio.current_time()
    _, acall_pieces = await stream_field(backend, program, "answer", adapter_name, question="Sky?")
    acall_pieces = [(at - started, piece) for at, piece in acall_pieces]

    async with _dspy.open_engine_lm(backend) as lm:
        started = trio.current_time()
        with dspy.context(lm=lm, adapter=_dspy.adapter(adapter_name)), dspy.track_usage() as tracker:
            plain = await program.acall(question="Sky?")
        text = backend.render(backend.calls[0][0])
        duration = backend.duration(len(backend.tokens(text)))
        assert trio.current_time() - started == duration  # the backend's pace, nothing else on the clock

        started = trio.current_time()
        with dspy.track_usage() as stream_tracker:
            streamed, pieces = await stream_field(lm, program, "answer", adapter_name, question="Sky?")
        assert trio.current_time() - started == duration
        assert engine_children(lm) == 0

    assert [streaming for _, _, streaming in backend.calls] == [True, False, True]
    assert plain.answer
    assert streamed.answer == plain.answer
    assert [(at - started, piece) for at, piece in pieces] == acall_pieces
    assert len(pieces) > 2
    assert pieces[0][0] - started < duration - 1.0  # live: seconds before the last token
    prompt = sum(len(m["content"]) for m in backend.calls[0][0])
    usage = {"prompt_tokens": -(-prompt // 4), "completion_tokens": len(backend.tokens(text))}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    for got in (tracker.get_total_tokens(), stream_tracker.get_total_tokens()):
        assert {k: v for k, v in got["simulated/lm"].items() if v is not None} == usage


@pytest.mark.usefixtures("dspy_deprecations_are_errors")
async def test_the_deprecation_guard_fails_on_a_deprecated_call() -> None:
    """OpenAI-style ``messages=`` outside an adapter is deprecated (removed in 3.5): under the guard the
    warning is an error, raised before the engine runs."""
    backend = BackendSpy()
    async with _dspy.open_engine_lm(backend) as lm:
        with pytest.raises(DeprecationWarning, match=r"removal in DSPy 3\.5"):
            await lm.acall(messages=[{"role": "user", "content": "hi"}])
    assert backend.calls == []


@pytest.mark.parametrize(
    ("adapter_name", "signature"),
    [("chat", "question, context: list[str] -> answer"), ("json", "question -> answer, score: int")],
)
async def test_the_engine_path_hands_the_backend_what_the_acall_path_does(
    adapter_name: str, signature: str
) -> None:
    """The same messages, byte for byte, and the same request parameters (the LM's defaults and the
    adapter's ``response_format``) reach the backend through the engine as through ``TrioLM.acall``."""
    backend = BackendSpy(first_token_delay=0, token_delay=0, temperature=0.5, max_tokens=200)
    program = dspy.ChainOfThought(signature)
    inputs = {"question": "Sky?", "context": ["day"]} if adapter_name == "chat" else {"question": "Sky?"}
    with dspy.context(lm=backend, adapter=_dspy.adapter(adapter_name)):
        await program.acall(**inputs)
    async with _dspy.open_engine_lm(backend) as lm:
        with dspy.context(lm=lm, adapter=_dspy.adapter(adapter_name)):
            await program.acall(**inputs)
    via_acall, via_engine = backend.calls
    assert json.dumps(via_engine, sort_keys=True) == json.dumps(via_acall, sort_keys=True)
    assert via_engine[1]["temperature"] == 0.5
    assert via_engine[1]["max_tokens"] == 200
    if adapter_name == "json":
        assert via_engine[1]["response_format"] == {"type": "json_object"}


def test_a_request_becomes_the_backends_messages_and_wire_parameters() -> None:
    """lm15's canonical ``Request`` back to what the backends send: system first, a schema
    ``response_format`` nested as the OpenAI wire nests it, ``stop`` as a list, ``logprobs`` as the
    flag and the count, provider extensions passed through."""
    lm15 = dspy.lm15
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    request = lm15.Request(
        model="m",
        system="Be brief.",
        messages=(lm15.Message.user("Sky?"), lm15.Message.assistant("Blue."), lm15.Message.user("Why?")),
        config=lm15.Config(
            max_tokens=50,
            temperature=0.0,
            stop=("\n\n",),
            logprobs=2,
            response_format={"type": "json_schema", "name": "A", "schema": schema, "strict": True},
            extensions={"repetition_penalty": 1.1},
        ),
    )
    messages, params = _dspy.request_to_call(request)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Why?"},
    ]
    assert params == {
        "max_tokens": 50,
        "temperature": 0.0,
        "stop": ["\n\n"],
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "A", "schema": schema, "strict": True},
        },
        "repetition_penalty": 1.1,
    }


@pytest.mark.parametrize(
    ("change", "feature"),
    [
        ({"tools": (dspy.lm15.FunctionTool("f"),)}, "tools"),
        (
            {"messages": (dspy.lm15.Message.user([dspy.lm15.ImagePart(url="http://x.test/a.png")]),)},
            "messages[0]",
        ),
        ({"config": dspy.lm15.Config(reasoning=dspy.lm15.Reasoning(effort="high"))}, "config.reasoning"),
    ],
)
def test_a_request_the_backends_cannot_send_is_refused_by_name(change: dict[str, Any], feature: str) -> None:
    """Nothing is dropped silently: DSPy turns the refusal into ``LMUnsupportedFeatureError``."""
    fields: dict[str, Any] = {"model": "m", "messages": (dspy.lm15.Message.user("hi"),), **change}
    with pytest.raises(dspy.lm15.UnsupportedFeatureError) as refused:
        _dspy.request_to_call(dspy.lm15.Request(**fields))
    assert refused.value.feature == feature


async def test_a_stock_dspy_lm_over_an_async_engine_fails_under_trio_before_the_engine_runs() -> None:
    """What blocks stock DSPy: ``BaseLM.acall`` prepares every call in ``asyncio.to_thread``, which
    needs asyncio's running loop. When this test fails, DSPy's own ``acall`` runs under Trio and
    ``EngineLM.acall`` (the override that prepares inline) can go."""
    backend = BackendSpy(first_token_delay=0, token_delay=0)
    async with trio.open_nursery() as nursery:
        lm = dspy.LM(
            backend.model,
            engine=_dspy._AsyncOnlyEngine(backend),
            async_engine=_dspy.TrioEngine(backend, nursery),
            cache=False,
            num_retries=0,
        )
        with dspy.context(lm=lm), pytest.raises(RuntimeError, match="no running event loop"):
            await dspy.Predict("question -> answer").acall(question="q")
    assert backend.calls == []


async def test_dspys_execution_fails_under_trio_after_the_engine_ran_unless_made_trio_safe() -> None:
    """The second blocker: ``aexecute`` prices every canonical engine call in ``asyncio.to_thread``
    (and reads and writes the response cache and sleeps between retries with asyncio). Without
    ``trio_safe_execution`` the call fails after the provider answered; with it, it succeeds."""
    backend = BackendSpy(first_token_delay=0, token_delay=0)
    async with _dspy.open_engine_lm(backend) as lm:
        _dspy.trio_safe_execution(False)
        with dspy.context(lm=lm), pytest.raises(RuntimeError, match="no running event loop"):
            await dspy.Predict("question -> answer").acall(question="q")
        assert backend.finished == 1
        _dspy.trio_safe_execution(True)
        with dspy.context(lm=lm):
            assert (await dspy.Predict("question -> answer").acall(question="q")).answer
    assert backend.finished == 2


def test_the_trio_safe_asyncio_covers_every_asyncio_name_dspys_execution_uses() -> None:
    """``_TrioSafeAsyncio`` replaces ``to_thread`` and ``sleep``; ``get_running_loop`` (DSPy's native
    engines only, asyncio-only anyway) passes through. A new name here needs a decision."""
    used = set(re.findall(r"\basyncio\.(\w+)", inspect.getsource(dspy.clients.execution)))
    assert used == {"to_thread", "sleep", "get_running_loop"}


async def test_dspy_owns_the_cache_and_history_on_the_engine_path() -> None:
    """Through the engine, DSPy's response cache answers a repeated call (its lookups run in worker
    threads under Trio) and DSPy records history unless ``disable_history``: bookkeeping ``TrioLM.acall``
    does itself today."""
    backend = BackendSpy(first_token_delay=0, token_delay=0)
    question = f"cached? {uuid.uuid4()}"  # DSPy's cache may persist on disk across runs
    async with _dspy.open_engine_lm(backend, cache=True) as lm:
        with dspy.context(lm=lm, disable_history=False, max_history_size=10):
            first = await dspy.Predict("question -> answer").acall(question=question)
            again = await dspy.Predict("question -> answer").acall(question=question)
        with dspy.context(lm=lm, disable_history=True):
            await dspy.Predict("question -> answer").acall(question=f"not recorded {uuid.uuid4()}")
    assert first.answer == again.answer
    assert len(backend.calls) == 2  # the repeat came from DSPy's cache
    assert len(lm.history) == 2
    assert lm.history[0]["model"] == "simulated/lm"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_backend_error_reaches_the_caller_wrapped_in_dspys_lm_error(stream: bool) -> None:
    """DSPy's error boundary wraps whatever an engine raises that is not an lm15 error in
    ``LMUnexpectedError``, the backend's typed error as its cause; a stream's failure is raised in the
    caller's task and leaves no producer behind."""
    backend = FailingLM(UpstreamServerError("boom", model="m", status=500), delay=0.5)
    async with _dspy.open_engine_lm(backend) as lm:
        send, _receive = trio.open_memory_channel[Any](100)
        context = dspy.context(lm=lm, send_stream=send if stream else None)
        with context, pytest.raises(LMUnexpectedError) as raised:
            await dspy.Predict("question -> answer").acall(question="q")
        assert engine_children(lm) == 0
    assert isinstance(raised.value.__cause__, UpstreamServerError)


async def test_a_consumer_that_leaves_mid_stream_stops_the_backend(autojump_clock: Any) -> None:
    """The user's stream closes after the first chunk: the call fails, the backend call is cancelled
    (it never finishes) and no producer is left."""
    backend = BackendSpy()
    async with _dspy.open_engine_lm(backend) as lm:
        send, receive = trio.open_memory_channel[Any](0)

        async def read_one_then_leave() -> None:
            await receive.receive()
            await receive.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_one_then_leave)
            with dspy.context(lm=lm, send_stream=send), pytest.raises(LMUnexpectedError):
                await dspy.Predict("question -> answer").acall(question="q")
        assert engine_children(lm) == 0
        assert trio.current_time() == 1.25  # the second token's send found the consumer gone
    assert (len(backend.calls), backend.finished) == (1, 0)


async def test_concurrent_streams_through_one_engine_lm_each_get_their_own_answer(
    autojump_clock: Any,
) -> None:
    """Twenty streamed predictions at once through one ``EngineLM``: each caller's channel carries its
    own answer and nothing else, all on the backend's pace, and no producer is left."""
    backend = BackendSpy()
    program = dspy.Predict("question -> answer")
    results: dict[int, tuple[Any, list[tuple[float, str]]]] = {}
    async with _dspy.open_engine_lm(backend) as lm:

        async def one(i: int) -> None:
            results[i] = await stream_field(lm, program, "answer", question=f"question {i}")

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert engine_children(lm) == 0
    assert len({prediction.answer for prediction, _ in results.values()}) > 1
    for prediction, pieces in results.values():
        assert "".join(piece for _, piece in pieces).strip() == prediction.answer
    assert backend.finished == 20


async def test_leaving_the_engine_lm_block_ends_a_running_stream_with_an_error(autojump_clock: Any) -> None:
    """A stream still running when its ``open_engine_lm`` block ends fails at once with DSPy's stream
    error (no end event came); it neither hangs nor completes."""
    backend = BackendSpy()
    failures: list[BaseException] = []
    async with trio.open_nursery() as outer:
        async with _dspy.open_engine_lm(backend) as lm:

            async def caller() -> None:
                send, _receive = trio.open_memory_channel[Any](100)
                with (
                    dspy.context(lm=lm, send_stream=send),
                    pytest.raises(dspy.utils.exceptions.LMError) as raised,
                ):
                    await dspy.Predict("question -> answer").acall(question="q")
                failures.append(raised.value)

            outer.start_soon(caller)
            await trio.sleep(2.0)
        left_at = trio.current_time()
    assert trio.current_time() == left_at == 2.0
    assert "without a completion event" in str(failures[0])
    assert backend.finished == 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_cancel_on_the_engine_path_closes_the_upstream_connection_within_50ms(
    fake_upstream: FakeUpstream, stream: bool
) -> None:
    fake_upstream.behavior = Behavior(latency=30, first_token_delay=0.0, token_delay=0.5)
    backend = OpenAICompatibleLM("openai/fake-model", api_base=fake_upstream.url)
    async with _dspy.open_engine_lm(backend) as lm:
        send, _receive = trio.open_memory_channel[Any](10_000)
        started = trio.current_time()
        with trio.move_on_after(0.3), dspy.context(lm=lm, send_stream=send if stream else None):
            await dspy.Predict("question -> answer").acall(question="q")
        cancelled_at = trio.current_time()
        assert cancelled_at - started < 0.35  # the call itself ended at the cancel
        record = await first_request_closed_by_client(fake_upstream, cancelled_at, within=0.05)
        assert record.stream is stream
        assert fake_upstream.active_requests == 0
        assert engine_children(lm) == 0
    await backend.aclose()


CANCEL_EXAMPLES = 40


async def cancel_once(cancel_at: float, stream: bool, read_delay: float) -> None:
    """One call cancelled ``cancel_at`` seconds in; the user reads each chunk ``read_delay`` late."""
    backend = BackendSpy()
    program = dspy.Predict("question -> answer")
    async with _dspy.open_engine_lm(backend) as lm:
        send, receive = trio.open_memory_channel[Any](0)

        async def slow_reader() -> None:
            async for _chunk in receive:
                await trio.sleep(read_delay)

        prediction = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            start = trio.current_time()
            with (
                trio.move_on_after(cancel_at) as scope,
                dspy.context(lm=lm, send_stream=send if stream else None),
            ):
                prediction = await program.acall(question="q")
            ended = trio.current_time()
            await send.aclose()
        assert engine_children(lm) == 0  # no producer outlives its call
        if scope.cancelled_caught:
            assert prediction is None
            assert ended - start == cancel_at  # the cancel took effect at once
            assert backend.finished == 0  # and reached the backend
        else:
            assert prediction is not None
            assert prediction.answer
            assert backend.finished == 1
    assert len(backend.calls) <= 1  # none when cancelled before the call began


@given(
    cancel_at=st.floats(min_value=0.0, max_value=8.0, allow_nan=False).map(lambda t: round(t, 3)),
    stream=st.booleans(),
    read_delay=st.sampled_from([0.0, 0.1, 0.6]),
    scheduler_seed=st.integers(0, 2**32 - 1),
)
@settings(
    max_examples=CANCEL_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_a_cancel_at_any_instant_ends_the_call_at_once_and_leaves_nothing_running(
    cancel_at: float, stream: bool, read_delay: float, scheduler_seed: int
) -> None:
    trio_run._r.seed(scheduler_seed)
    trio.run(cancel_once, cancel_at, stream, read_delay, clock=MockClock(autojump_threshold=0))
