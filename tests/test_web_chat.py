"""What a chat completion request means for a program (web/chat.py), and how its answer is written
(ChatChunks, chat_json in web/formats.py): no server, the engine's own values."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import dspy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_trio.engine import (
    DeadlineExceededError,
    FieldDelta,
    FinalEvent,
    PredictionResult,
    ProgramError,
    ProgramSpec,
    StatusEvent,
    Timings,
    Usage,
)
from dspy_trio.engine._programs import build_program
from dspy_trio.web.chat import ChatCall, ChatRequest, check_schema
from dspy_trio.web.errors import HTTPError
from dspy_trio.web.formats import ChatAnswer, ChatChunks, chat_json
from dspy_trio.web.settings import ServiceSettings

SETTINGS = ServiceSettings(port=0)


class Conversation(dspy.Signature):
    """Answer in the conversation."""

    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


ONE = build_program("one", ProgramSpec("question -> answer")).info
TWO = build_program("two", ProgramSpec("topic, style -> title, count: int")).info
TALK = build_program("talk", ProgramSpec(Conversation)).info
COT = build_program("cot", ProgramSpec("question -> answer", module="chain_of_thought")).info


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def call(info: Any = ONE, **body: Any) -> ChatCall:
    body.setdefault("messages", [user("What is Trio?")])
    return ChatCall.of(ChatRequest.model_validate({"model": info.name, **body}), info, SETTINGS)


def refusal(info: Any = ONE, **body: Any) -> HTTPError:
    with pytest.raises(HTTPError) as caught:
        call(info, **body)
    assert caught.value.status == 400
    return caught.value


def test_one_input_takes_the_last_user_text_and_several_take_its_json_object() -> None:
    assert call().inputs == {"question": "What is Trio?"}
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "Trio?"}]
    assert call(messages=[user(parts)]).inputs == {"question": "What is Trio?"}
    two = call(TWO, messages=[user('{"topic": "trio", "style": "terse"}')])
    assert two.inputs == {"topic": "trio", "style": "terse"}
    assert two.json_object  # several outputs: content is their JSON object
    error = refusal(TWO, messages=[user("trio, terse")])
    assert error.param == "messages[0].content"
    assert "JSON object of the input fields (topic, style)" in error.message


def test_history_takes_the_earlier_turns_and_refuses_what_it_cannot_hold() -> None:
    messages = [user("a?"), {"role": "assistant", "content": "A."}, user("b?")]
    assert call(TALK, messages=messages).inputs == {
        "question": "b?",
        "history": {"messages": [{"question": "a?", "answer": "A."}]},
    }
    assert call(TALK).inputs["history"] == {"messages": []}
    system = [{"role": "system", "content": "be brief"}, *messages]
    assert refusal(TALK, messages=system).code == "history_not_supported"
    assert call(TALK, messages=system, ignore_history=True).inputs["history"]["messages"] == [
        {"question": "a?", "answer": "A."}
    ]
    error = refusal(ONE, messages=messages)
    assert error.code == "history_not_supported"
    assert "2 earlier messages" in error.message
    assert call(ONE, messages=messages, ignore_history=True).inputs == {"question": "b?"}


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([user([{"type": "image_url", "image_url": {"url": "data:,"}}])], "messages[0].content[0]", "images"),
        ([user([{"type": "input_audio", "input_audio": {}}])], "messages[0].content[0]", "audio"),
        ([user([{"type": "text", "text": 5}])], "messages[0].content[0]", "a text part"),
        ([user([5])], "messages[0].content[0]", "a text part"),
        ([user(5)], "messages[0].content", "not int"),
        ([user(None)], "messages[0].content", "not null"),
        ([user({"text": "hi"})], "messages[0].content", "not dict"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role", "'wizard' is not one of"),
        ([{"role": 7, "content": "hi"}], "messages[0].role", "must be a string"),
        ([{"content": "hi"}], "messages[0].role", "must be a string"),
        ([{"role": "tool", "content": "hi", "tool_call_id": "x"}], "messages[0].role", "no tools"),
        ([user("hi"), {"role": "assistant", "content": "yo"}], "messages[1].role", "must be the user's"),
        ([{"role": "user", "content": "hi", "secret": 1}], "messages[0].secret", "unknown field"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}, user("hi")],
            "messages[0].tool_calls",
            "tool calls",
        ),
    ],
)
def test_messages_it_cannot_take_are_refused_naming_the_place(
    messages: list[Any], param: str, says: str
) -> None:
    error = refusal(messages=messages, ignore_history=True)
    assert error.param == param
    assert says in error.message


def test_an_echoed_assistant_message_is_taken() -> None:
    """The SDKs send an answer back as they got it: refusal, annotations, audio, tool calls all empty."""
    echoed = {
        "role": "assistant",
        "content": "A.",
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "tool_calls": None,
    }
    assert call(TALK, messages=[user("a?"), echoed, user("b?")]).inputs["history"]["messages"] == [
        {"question": "a?", "answer": "A."}
    ]


def test_parameters_go_to_the_lm_calls_and_what_cannot_be_honoured_is_refused() -> None:
    params = call(temperature=0.2, top_p=0.9, max_completion_tokens=50, stop="\n", seed=3).lm_params
    assert params == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "stop": "\n", "seed": 3}
    assert call(max_tokens=7).lm_params == {"max_tokens": 7}
    harmless = call(
        n=1, tool_choice="none", tools=[], logprobs=False, frequency_penalty=0, user="u", store=False
    )
    assert harmless.lm_params == {}
    for field, value in [
        ("n", 2),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("logprobs", True),
        ("frequency_penalty", 0.5),
        ("logit_bias", {"1": 2}),
        ("modalities", ["text", "audio"]),
        ("reasoning_effort", "high"),
    ]:
        error = refusal(**{field: value})
        assert (error.param, error.code) == (field, "unsupported_parameter"), field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"model": ""}, "model"),
        ({"timeout": -1}, "timeout"),
        ({"ignore_history": "yes"}, "ignore_history"),
    ],
)
def test_the_body_is_checked_field_by_field(body: dict[str, Any], param: str) -> None:
    import pydantic

    full = {"model": "one", "messages": [user("hi")], **body}
    with pytest.raises(pydantic.ValidationError) as caught:
        ChatRequest.model_validate(full)
    assert str(caught.value.errors()[0]["loc"][0]) == param


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "seed", "n"])
def test_an_integer_field_takes_an_integer_written_with_a_fraction_of_zero(field: str) -> None:
    # JSON Schema's "integer" (the document's) counts 1.0 as an integer; 1.5 is not one.
    request = ChatRequest.model_validate({"model": "one", "messages": [user("hi")], field: 1.0})
    assert getattr(request, field) == 1
    assert type(getattr(request, field)) is int
    import pydantic

    with pytest.raises(pydantic.ValidationError):
        ChatRequest.model_validate({"model": "one", "messages": [user("hi")], field: 1.5})


def test_response_format_json_schema_names_outputs_only() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    ok = call(TWO, messages=[user('{"topic": "t", "style": "s"}')], response_format=_schema(schema))
    assert ok.schema == schema
    assert call(response_format={"type": "json_object"}).json_object
    assert not call(response_format={"type": "text"}).json_object
    wrong = {"type": "object", "properties": {"nope": {"type": "string"}}}
    assert "'nope' is not an output" in refusal(response_format=_schema(wrong)).message
    assert "not a JSON Schema" in refusal(response_format=_schema({"type": 5})).message
    assert refusal(response_format={"type": "xml"}).param == "response_format.type"


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


# --- the answer -----------------------------------------------------------------------------------------


def result(outputs: dict[str, Any], *, truncated: bool = False) -> PredictionResult:
    return PredictionResult("r", "p", outputs, Usage(10, 5), Timings(0, 0, 0), truncated=truncated)


def contents(chunks: list[bytes]) -> tuple[str, list[dict[str, Any]]]:
    """The content the chunks spell, and every chunk's JSON (the last data must be [DONE])."""
    events = [line[len("data: ") :] for chunk in chunks for line in chunk.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(event) for event in events[:-1]]
    text = "".join(
        choice["delta"].get("content") or "" for chunk in parsed for choice in chunk.get("choices", [])
    )
    return text, parsed


def stream(info: Any, json_object: bool, events: list[Any], *, usage: bool = False) -> list[bytes]:
    encode = ChatChunks(ChatAnswer("chatcmpl-x", 1, info.name, json_object), info, include_usage=usage)
    return [chunk for event in events if (chunk := encode(event)) is not None]


def test_a_stream_spells_what_the_answer_says_with_the_finish_and_usage_last() -> None:
    outputs = {"answer": "Trio is a library."}
    deltas = [FieldDelta("self", "answer", piece) for piece in ("Trio ", "is a ", "library.")]
    chunks = stream(ONE, False, [StatusEvent("running"), *deltas, FinalEvent(result(outputs))], usage=True)
    text, parsed = contents(chunks)
    whole = chat_json(ChatAnswer("chatcmpl-x", 1, "one"), result(outputs))
    assert text == whole["choices"][0]["message"]["content"] == "Trio is a library."
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-x" for chunk in parsed)
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert parsed[-1] == {
        **parsed[-1],
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    assert all(chunk["usage"] is None for chunk in parsed[:-1])


def test_a_truncated_answer_finishes_with_length() -> None:
    chunks = stream(ONE, False, [FinalEvent(result({"answer": "Tri"}, truncated=True))])
    text, parsed = contents(chunks)
    assert text == "Tri"
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert (
        chat_json(ChatAnswer("i", 1, "one"), result({"answer": "x"}, truncated=True))["choices"][0][
            "finish_reason"
        ]
        == "length"
    )


def test_an_error_ends_the_stream_in_openais_shape_then_done() -> None:
    chunks = stream(ONE, False, [FieldDelta("self", "answer", "Tr"), _error()])
    last = chunks[-1].decode().split("\n\n")
    assert json.loads(last[0][len("data: ") :])["error"]["code"] == "deadline_exceeded"
    assert last[1] == "data: [DONE]"


def _error() -> Any:
    from dspy_trio.engine import ErrorEvent

    return ErrorEvent(DeadlineExceededError("too late"))


def test_other_predictors_and_fields_do_not_leak_into_the_content() -> None:
    events = [
        FieldDelta("predict", "reasoning", "thinking..."),
        FieldDelta("draft", "answer", "a draft"),
        FieldDelta("self", "answer", "Fin"),
        FinalEvent(result({"answer": "Final."})),
    ]
    assert contents(stream(ONE, False, events))[0] == "Final."


# Outputs of TWO and COT: text fields stream as they form; others come whole at the end.
texts = st.text(max_size=30)


@given(
    title=texts,
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=4),
    count=st.integers(),
    streamed=st.booleans(),
)
def test_a_json_object_stream_is_the_same_object_as_the_answer(
    title: str, cuts: list[int], count: int, streamed: bool
) -> None:
    outputs = {"title": title, "count": count}
    bounds = sorted({0, len(title), *(min(cut, len(title)) for cut in cuts)})
    pieces = [title[a:b] for a, b in itertools.pairwise(bounds)]
    deltas = [FieldDelta("self", "title", piece) for piece in pieces] if streamed else []
    deltas.append(FieldDelta("self", "count", str(count)))  # not text: said whole at the end
    text, _ = contents(stream(TWO, True, [*deltas, FinalEvent(result(outputs))]))
    assert (
        json.loads(text)
        == outputs
        == json.loads(
            chat_json(ChatAnswer("i", 1, "two", True), result(outputs))["choices"][0]["message"]["content"]
        )
    )


def test_reasoning_and_answer_stream_in_order_as_one_object() -> None:
    events = [
        FieldDelta("predict", "reasoning", 'Say "hi"\n'),
        FieldDelta("predict", "answer", "hi"),
        FinalEvent(result({"reasoning": 'Say "hi"\n', "answer": "hi"})),
    ]
    text, parsed = contents(stream(COT, True, events))
    assert text == '{"reasoning":"Say \\"hi\\"\\n","answer":"hi"}'
    assert len(parsed) == 5  # role, reasoning, answer, the closing brace, the finish


def test_outputs_that_break_the_schema_end_the_stream_with_an_error() -> None:
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 100}}}
    answer = ChatAnswer("i", 1, "two", True, schema)
    encode = ChatChunks(answer, TWO, include_usage=False)
    final = encode(FinalEvent(result({"title": "t", "count": 42})))
    assert final is not None
    assert json.loads(final.decode().split("\n\n")[0][6:])["error"]["code"] == "output_schema_mismatch"


# --- what a careless or hostile client sends ------------------------------------------------------------


@pytest.mark.parametrize("kind", [["text"], {"type": "text"}, 5, None, "video", "refusal"])
def test_a_content_part_of_any_other_type_is_refused_naming_it(kind: Any) -> None:
    """A part's ``type`` that is a list or an object (unhashable) was looked up in a dict: a 500."""
    error = refusal(messages=[user([{"type": kind, "text": "hi"}])])
    assert (error.param, error.code) == ("messages[0].content[0]", "invalid_value")


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/nope"},
        {"properties": {"answer": {"$ref": "#/$defs/missing"}}},
        {"$ref": "http://127.0.0.1:9/schema.json"},
        {"properties": {"answer": {"$ref": "file:///etc/passwd"}}},
        {"$dynamicRef": "https://evil.example/schema#meta"},
    ],
)
def test_a_schema_reference_that_does_not_resolve_in_the_schema_is_refused(schema: dict[str, Any]) -> None:
    """References were resolved only when the outputs were checked, after the program ran: a local one
    that named nothing was a 500, and a remote one made the server fetch the URL (jsonschema's default
    retrieval) - a request forgery. Only references within the schema itself are followed."""
    error = refusal(response_format=_schema(schema))
    assert (error.param, error.code) == ("response_format.json_schema", "invalid_value")
    assert "$ref" in error.message or "reference" in error.message


def test_a_local_reference_is_followed() -> None:
    schema = {
        "$defs": {"text": {"type": "string", "minLength": 1}},
        "type": "object",
        "properties": {"answer": {"$ref": "#/$defs/text"}},
    }
    chat = call(response_format=_schema(schema))
    check_schema({"answer": "Trio"}, chat.schema, "one")
    with pytest.raises(ProgramError):
        check_schema({"answer": ""}, chat.schema, "one")


def test_a_pattern_that_backtracks_forever_cannot_stall_the_server() -> None:
    """``pattern`` is matched in the event loop's thread: ``(a|a)*$`` against 40 a's and a b would hold
    the process (every request of it) for ever. A match that takes longer than its budget fails the
    outputs' check instead."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "pattern": "^(a|a)*$"}}}
    chat = call(response_format=_schema(schema))
    started = time.monotonic()
    with pytest.raises(ProgramError) as caught:
        check_schema({"answer": "a" * 40 + "b"}, chat.schema, "one")
    assert time.monotonic() - started < 5  # the property: bounded (it was unbounded: ~2^40 steps)
    assert caught.value.code == "output_schema_mismatch"
    assert "pattern" in caught.value.message
    check_schema({"answer": "aaa"}, chat.schema, "one")  # a pattern that matches still passes


def test_a_stop_string_may_be_longer_than_four_characters() -> None:
    """``max_length=4`` bounds the stop *list*; on the union it bounded a stop string to 4 characters."""
    assert call(stop="\n\nQuestion:").lm_params == {"stop": "\n\nQuestion:"}
    assert call(stop=["END OF ANSWER"]).lm_params == {"stop": ["END OF ANSWER"]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", "1"),
        ("top_p", False),
        ("max_tokens", 2**63),
        ("max_completion_tokens", 10**30),
        ("seed", 2**64),
        ("stop", [""]),
        ("stop", ""),
    ],
)
def test_a_parameter_of_the_wrong_type_or_out_of_range_is_refused(field: str, value: Any) -> None:
    """Strings and booleans were coerced to numbers (``"0.5"``, ``true`` as 1.0), and integers no upstream
    takes went out as they were (a 2^63 ``max_tokens`` is an error of the upstream's, after the wait)."""
    import pydantic

    with pytest.raises(pydantic.ValidationError) as caught:
        ChatRequest.model_validate({"model": "one", "messages": [user("hi")], field: value})
    assert str(caught.value.errors()[0]["loc"][0]) == field


def test_stream_options_without_a_stream_are_refused_as_openai_does() -> None:
    error = refusal(stream_options={"include_usage": True})
    assert error.param == "stream_options"
    assert "only allowed when stream is true" in error.message
    assert call(stream=True, stream_options={"include_usage": True}).include_usage
