"""OpenAI's chat completions as calls of a program: what a request means, and what its answer says.

::

    data = ChatRequest.model_validate(body)            # the body's shape (http.json_body does this)
    chat = ChatCall.of(data, info, settings)           # its meaning for the program ``data.model``
    engine.predict(info.name, chat.inputs, lm_params=chat.lm_params)
    chat_content(result.outputs, chat.json_object)     # what message.content says

The rules (docs/http-api.md states them for users):

- **Inputs.** A program with one input field takes the last message's text; with several (or none), that
  text is a JSON object of its input fields (the engine then names a missing or unknown one). The last
  message must be the user's. A content that is a list of parts takes their text, joined; an image, audio
  or file part is refused. A ``dspy.History`` input is not counted: it takes the earlier messages.
- **Earlier messages.** With a ``dspy.History`` input they become its turns: a user message is a turn's
  inputs (read as the last one is), the assistant's answer after it the turn's outputs (its text for one
  output field, else the JSON object of them). What the program cannot take (earlier messages without a
  history input; system and developer messages with one) is refused, unless the body says
  ``ignore_history: true``: then it is dropped.
- **Parameters.** ``temperature``, ``top_p``, ``max_tokens`` (``max_completion_tokens`` is the same cap),
  ``stop`` and ``seed`` go to every LM call the program makes. What would change the answer's meaning and
  cannot be honoured is refused, naming it: ``n > 1``, tools and functions, logprobs, penalties, logit
  bias, audio, predictions, web search, reasoning effort. Fields that change nothing here (``user``,
  ``metadata``, ``store``, ...) are accepted and ignored; any other field is refused.
- **Output.** One output field: ``content`` is its text (JSON for a value that is not text); several, or a
  ``response_format`` of ``json_object`` or ``json_schema``: the JSON object of the outputs. A
  ``json_schema``'s properties must be output fields of the program, and the outputs are checked against
  it before they are sent.

Every refusal is an :class:`HTTPError` 400 naming the field (``param``), as OpenAI's API answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import attrs
import pydantic

from dspy_trio.engine import ProgramError, ProgramInfo

from .encoding import dumps
from .errors import HTTPError
from .json_schema import first_error, schema_problem
from .limits import parse_json
from .models import INTEGRAL, Timeout
from .settings import ServiceSettings

# --- the body -------------------------------------------------------------------------------------------


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class StreamOptions(pydantic.BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool | None = pydantic.Field(default=None, strict=True)
    include_obfuscation: bool | None = pydantic.Field(default=None, strict=True)  # nothing to obfuscate


# A JSON number (never a string or a boolean coerced to one), finite.
Number = Annotated[float, pydantic.Field(allow_inf_nan=False, strict=True)]
Count = Annotated[int, pydantic.Field(ge=1), *INTEGRAL]
# A token count any upstream takes (they read it as a 32-bit integer).
TokenCount = Annotated[int, pydantic.Field(ge=1, le=2**31 - 1), *INTEGRAL]
# A stop sequence: never empty (an upstream stops at once, or refuses it).
StopSequence = Annotated[str, pydantic.Field(min_length=1)]


class ChatRequest(_Model):
    """``POST /v1/chat/completions``: OpenAI's request, ``model`` naming a served program.

    Besides OpenAI's fields, ``ignore_history`` (drop earlier messages the program cannot take) and
    ``timeout`` (seconds, as ``X-Request-Timeout``): the OpenAI SDKs send them with ``extra_body``.
    """

    model: str = pydantic.Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = pydantic.Field(min_length=1)
    stream: bool | None = pydantic.Field(default=None, strict=True)
    stream_options: StreamOptions | None = None
    temperature: Number | None = pydantic.Field(default=None, ge=0, le=2)
    top_p: Number | None = pydantic.Field(default=None, ge=0, le=1)
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    # At most four sequences (the bound is the list's: a string may be longer than four characters).
    stop: StopSequence | Annotated[list[StopSequence], pydantic.Field(min_length=1, max_length=4)] | None = (
        None
    )
    seed: Annotated[int, pydantic.Field(ge=-(2**63), le=2**63 - 1), *INTEGRAL] | None = None
    n: Count | None = None
    response_format: dict[str, Any] | None = None
    # Refused when they ask for something (see _UNSUPPORTED); their "off" values are accepted.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    # Accepted and ignored: they change nothing about the answer.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None
    # This service's own.
    ignore_history: bool = pydantic.Field(default=False, strict=True)
    timeout: Timeout = None


def _off(value: Any) -> bool:
    """Whether a field's value asks for nothing (absent, null, false, zero, empty, or ``"none"``)."""
    return value is None or value is False or value == 0 or value == "none" or value in ([], {}, ["text"])


# The fields whose value, unless _off, asks for what the service cannot do: why, in a few words.
_UNSUPPORTED = {
    "tools": "tools are not supported: a program answers with its output fields",
    "tool_choice": "tools are not supported: a program answers with its output fields",
    "functions": "functions are not supported: a program answers with its output fields",
    "function_call": "functions are not supported: a program answers with its output fields",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "frequency_penalty": "frequency_penalty is not supported",
    "presence_penalty": "presence_penalty is not supported",
    "logit_bias": "logit_bias is not supported",
    "modalities": "only text is supported",
    "audio": "audio is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning_effort is not supported: a program sets its own LM",
    "verbosity": "verbosity is not supported",
}


def refused(message: str, param: str | None, code: str = "invalid_value") -> HTTPError:
    """A 400 in OpenAI's words, naming the field at fault."""
    return HTTPError(400, message, type="invalid_request_error", code=code, param=param)


# --- the request's meaning ------------------------------------------------------------------------------

_ROLES = frozenset({"system", "developer", "user", "assistant"})
_TOOL_ROLES = frozenset({"tool", "function"})
# The fields a message may carry besides role and content (an assistant message as the SDKs echo it back).
_MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "refusal", "annotations", "audio", "tool_calls", "function_call"}
)
_UNSUPPORTED_PARTS = {
    "image_url": "images",
    "input_image": "images",
    "input_audio": "audio",
    "file": "files",
    "input_file": "files",
}


@attrs.frozen
class ChatCall:
    """A chat completion request as a call of one program.

    Attributes:
        inputs: The program's input fields, from the messages.
        lm_params: Parameters of every LM call (``temperature``, ``max_tokens``, ``stop``, ``seed``,
            ``top_p``).
        stream: Answer as ``chat.completion.chunk`` events.
        include_usage: A stream ends with a chunk of the usage.
        json_object: ``content`` is the JSON object of the outputs (several outputs, or asked for).
        schema: A ``json_schema`` response format's schema, which the outputs must satisfy.
    """

    inputs: dict[str, Any]
    lm_params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    json_object: bool = False
    schema: dict[str, Any] | None = None

    @classmethod
    def of(cls, data: ChatRequest, info: ProgramInfo, settings: ServiceSettings) -> ChatCall:
        """What ``data`` asks of the program ``info`` describes.

        Raises:
            HTTPError: 400 naming what the program cannot take.
        """
        for name, why in _UNSUPPORTED.items():
            if not _off(getattr(data, name)):
                raise refused(why, name, "unsupported_parameter")
        if data.n is not None and data.n > 1:
            raise refused("n must be 1: a program gives one answer per request", "n", "unsupported_parameter")
        if data.stream_options is not None and not data.stream:
            raise refused("stream_options is only allowed when stream is true", "stream_options")
        json_object, schema = _response_format(data.response_format, info)
        messages = [_message(index, message) for index, message in enumerate(data.messages)]
        *earlier, (last_role, last_text) = messages
        if last_role != "user":
            raise refused(
                f"the last message must be the user's, not the {last_role}'s",
                f"messages[{len(messages) - 1}].role",
            )
        inputs = _inputs(last_text, info, f"messages[{len(messages) - 1}].content", settings)
        history = info.history
        if history is not None:
            inputs[history.name] = {"messages": _turns(earlier, info, data.ignore_history, settings)}
        elif earlier and not data.ignore_history:
            raise refused(
                f"program {info.name!r} takes no conversation history (it has no dspy.History input): "
                f"send only the user's message, or set ignore_history: true to drop the "
                f"{len(earlier)} earlier message{'s' if len(earlier) > 1 else ''}",
                "messages",
                "history_not_supported",
            )
        params: dict[str, Any] = {}
        cap = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
        for name, value in (
            ("temperature", data.temperature),
            ("top_p", data.top_p),
            ("max_tokens", cap),
            ("stop", data.stop),
            ("seed", data.seed),
        ):
            if value is not None:
                params[name] = value
        options = data.stream_options
        return cls(
            inputs,
            params,
            stream=bool(data.stream),
            include_usage=bool(options and options.include_usage),
            json_object=json_object or len(info.outputs) != 1,
            schema=schema,
        )


def _message(index: int, message: Mapping[str, Any]) -> tuple[str, str]:
    """A message's role and its text."""
    where = f"messages[{index}]"
    role = message.get("role")
    if not isinstance(role, str):
        raise refused(f"{where}.role must be a string", f"{where}.role")
    if role in _TOOL_ROLES:
        raise refused(f"{where}: {role} messages are not supported (no tools)", f"{where}.role")
    if role not in _ROLES:
        raise refused(
            f"{where}.role {role[:40]!r} is not one of system, developer, user, assistant", f"{where}.role"
        )
    for key in message:
        if key not in _MESSAGE_FIELDS:
            raise refused(f"{where}.{key[:40]}: unknown field of a message", f"{where}.{key[:40]}")
    for key in ("tool_calls", "function_call"):
        if not _off(message.get(key)):
            raise refused(f"{where}.{key}: tool calls are not supported", f"{where}.{key}")
    return role, _text(message.get("content"), f"{where}.content")


def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        given = "null" if content is None else type(content).__name__
        raise refused(f"{where} must be a string or a list of text parts, not {given}", where)
    texts: list[str] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind in _UNSUPPORTED_PARTS:
            raise refused(f"{at}: {_UNSUPPORTED_PARTS[kind]} are not supported, only text", at)
        if kind != "text" or not isinstance(part.get("text"), str):
            raise refused(f'{at} must be a text part: {{"type": "text", "text": "..."}}', at)
        texts.append(part["text"])
    return "".join(texts)


def _fields_of(text: str, names: Sequence[str], what: str, where: str, settings: ServiceSettings) -> Any:
    """The fields a message gives: ``{name: text}`` for one field, else the text read as a JSON object."""
    if len(names) == 1:
        return {names[0]: text}
    try:
        value = parse_json(
            text.encode("utf-8", "surrogatepass"),
            max_bytes=settings.max_body_bytes,
            max_depth=settings.max_json_depth,
            what="message",
        )
    except HTTPError as error:
        raise refused(
            f"{where} must be a JSON object of the {what} ({', '.join(names)}): {error}", where
        ) from None
    if not isinstance(value, dict):
        raise refused(f"{where} must be a JSON object of the {what} ({', '.join(names)})", where)
    return value


def _inputs(text: str, info: ProgramInfo, where: str, settings: ServiceSettings) -> dict[str, Any]:
    names = [field.name for field in info.inputs if not field.history]
    fields: dict[str, Any] = _fields_of(text, names, "input fields", where, settings)
    return fields


def _turns(
    earlier: Sequence[tuple[str, str]], info: ProgramInfo, ignore: bool, settings: ServiceSettings
) -> list[dict[str, Any]]:
    """The earlier messages as a ``dspy.History``'s turns: a user message's inputs, and the outputs of
    the assistant's answer to it."""
    turns: list[dict[str, Any]] = []
    answered = True  # whether the last turn already has its outputs
    for index, (role, text) in enumerate(earlier):
        where = f"messages[{index}].content"
        if role == "user":
            turns.append(_inputs(text, info, where, settings))
            answered = False
        elif role == "assistant":
            outputs = _fields_of(text, list(info.outputs), "output fields", where, settings)
            if answered:
                turns.append(outputs)  # an answer with no question before it
            else:
                turns[-1].update(outputs)
            answered = True
        elif not ignore:
            raise refused(
                f"messages[{index}]: a {role} message cannot go to program {info.name!r}'s history (its "
                "turns are user and assistant messages); set ignore_history: true to drop it",
                f"messages[{index}].role",
                "history_not_supported",
            )
    return turns


def _response_format(
    value: Mapping[str, Any] | None, info: ProgramInfo
) -> tuple[bool, dict[str, Any] | None]:
    """Whether the answer is the JSON object of the outputs, and the schema it must satisfy."""
    if value is None:
        return False, None
    kind = value.get("type")
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind != "json_schema":
        raise refused("response_format.type must be text, json_object or json_schema", "response_format.type")
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise refused("response_format.json_schema.schema must be an object", "response_format.json_schema")
    problem = schema_problem(schema)
    if problem is not None:
        raise refused(f"response_format.json_schema.schema: {problem}", "response_format.json_schema")
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name in properties:
            if name not in info.outputs:
                raise refused(
                    f"response_format.json_schema: {name!r} is not an output of program {info.name!r} "
                    f"(it gives {', '.join(info.outputs)})",
                    "response_format.json_schema",
                )
    return True, schema


# --- the answer -----------------------------------------------------------------------------------------


def chat_content(outputs: Mapping[str, Any], json_object: bool) -> str:
    """``message.content``: the one output's text, or the JSON object of the outputs."""
    if json_object:
        return dumps(dict(outputs))
    value = next(iter(outputs.values()), "")
    return value if isinstance(value, str) else dumps(value)


def check_schema(outputs: Mapping[str, Any], schema: Mapping[str, Any] | None, program: str) -> None:
    """Check the outputs against a ``json_schema`` response format.

    Raises:
        ProgramError: they do not satisfy it (502, as an answer that did not parse).
    """
    if schema is None:
        return
    value = json.loads(dumps(dict(outputs)))
    error = first_error(schema, value)
    if error is not None:
        place = "/".join(str(part) for part in error.absolute_path) or "the object"
        mismatch = ProgramError(
            f"program {program!r}'s outputs do not satisfy response_format's schema at {place}: "
            f"{error.message[:200]}"
        )
        mismatch.code = "output_schema_mismatch"
        raise mismatch


__all__ = ["ChatCall", "ChatRequest", "chat_content", "check_schema", "refused"]
