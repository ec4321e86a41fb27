"""The wire formats of a call's outcome: one encoder each, the plain token stream written once.

The route table names each route's formats (:class:`dspy_trio.web.routing.Wire`); the runner
(:mod:`dspy_trio.web.runner`) hands out a call's outcomes as engine values; these turn them into bytes or
frames:

============  ==========================  ====================================================================
``JSON``      :func:`seed_json`, ``v1``   one object (an error becomes the HTTP status, :mod:`.app`)
``V1_SSE``    :func:`v1_sse`              ``event: status | delta | final | error``
``SEED_SSE``  :func:`seed_sse`            ``data: <token>`` ..., ``data: [DONE]``       (:class:`SeedTokens`)
``SEED_WS``   :func:`seed_ws`             a text frame per token, then ``[DONE]``       (:class:`SeedTokens`)
``WS_FRAMES`` :func:`ws_frame`            ``{"id", "type": result | status | delta | final | error |
                                          cancelled, ...}``
``BATCH_SSE`` :func:`batch_sse`           ``event: item`` per outcome, then ``event: done``
``NDJSON``    :func:`batch_ndjson`        a JSON line per outcome, then ``{"done": true, "count": n}``
``CHAT``      :func:`chat_json`           OpenAI's ``chat.completion`` (an error becomes the HTTP status)
``CHAT_SSE``  :class:`ChatChunks`         ``chat.completion.chunk`` per token, the finish, the usage,
                                          ``data: [DONE]``
============  ==========================  ====================================================================

A stream event's JSON (``event_json``) and a result's (``result_json``) are written once, in
:mod:`dspy_trio.web.encoding`; a new event type is encoded there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, assert_never

import attrs

from dspy_trio.engine import (
    BatchItem,
    EngineError,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    PredictionResult,
    ProgramInfo,
    RequestCancelledError,
    StatusEvent,
    StreamEvent,
)

from .chat import chat_content, check_schema
from .encoding import SSE_DONE, batch_item_json, dumps, error_json, event_json, result_json, sse
from .errors import HTTPError, error_body

# What a call hands out, in order: a stream's events, then one last outcome (PredictionResult,
# FinalEvent or ErrorEvent).
Outcome = PredictionResult | StreamEvent


# --- JSON --------------------------------------------------------------------------------------------


def seed_answer(outputs: Mapping[str, Any]) -> Any:
    """The plain endpoints' answer among a program's outputs: ``answer``, else the first output."""
    return outputs["answer"] if "answer" in outputs else next(iter(outputs.values()), None)


def seed_json(result: PredictionResult) -> dict[str, Any]:
    """The plain ``/predict`` answer: ``{"answer", "duration_ms", "request_id"}``."""
    return {
        "answer": seed_answer(result.outputs),
        "duration_ms": round(result.timings.total * 1000, 3),
        "request_id": result.request_id,
    }


v1_json = result_json  # ``{"request_id", "program", "outputs", "usage", "timings"}``


# --- Server-Sent Events of /v1/programs/{name}/stream -------------------------------------------------


def v1_sse(event: StreamEvent) -> bytes:
    """``event: status|delta|final|error`` with the event's JSON."""
    name, payload = event_json(event)
    return sse(dumps(payload), event=name)


# --- the plain token stream: /predict/stream, /stream and /ws -----------------------------------------

Piece = tuple[Literal["token"], str] | tuple[Literal["error"], dict[str, Any]] | tuple[Literal["done"], None]
_DONE: Piece = ("done", None)


class SeedTokens:
    """The plain token stream, whatever carries it: each delta's text as a token; at the end
    ``[DONE]``, after one error payload (``{"error": {...}}``) when the stream failed. When the answer
    came without any delta (a backend that does not stream), the answer goes out as one token before
    ``[DONE]``, so it is never lost. One per stream: it remembers whether a delta went out."""

    def __init__(self) -> None:
        self._sent_delta = False

    def pieces(self, event: Outcome) -> list[Piece]:
        """What the plain format says for ``event`` (nothing for a status event; a prediction's result
        is said as a stream's final event that followed no delta)."""
        match event:
            case FieldDelta():
                self._sent_delta = True
                return [("token", event.text)]
            case PredictionResult():
                answer = seed_answer(event.outputs)
                return [_DONE] if answer is None else [("token", str(answer)), _DONE]
            case FinalEvent():
                answer = seed_answer(event.result.outputs)
                if self._sent_delta or answer is None:
                    return [_DONE]
                return [("token", str(answer)), _DONE]
            case ErrorEvent():
                return [("error", error_json(event.error)), _DONE]
            case StatusEvent():
                return []
            case _:
                assert_never(event)

    @staticmethod
    def refused(error: HTTPError) -> list[Piece]:
        """A question refused before it ran (a bad ``/ws`` frame): its error, then ``[DONE]``."""
        body = error_body(error.message, type=error.type, code=error.code, param=error.param)
        return [("error", body), _DONE]


def _sse_piece(piece: Piece) -> bytes:
    match piece:
        case ("token", text):
            return sse(text)
        case ("error", payload):
            return sse(dumps(payload), event="error")
        case _:
            return SSE_DONE


def _ws_piece(piece: Piece) -> str:
    match piece:
        case ("token", text):
            return text
        case ("error", payload):
            return dumps(payload)
        case _:
            return "[DONE]"


def seed_sse() -> Callable[[Outcome], bytes | None]:
    """An encoder of one stream in the plain SSE: ``data: <token>`` ..., then ``data: [DONE]``."""
    tokens = SeedTokens()

    def encode(event: Outcome) -> bytes | None:
        return b"".join(_sse_piece(piece) for piece in tokens.pieces(event)) or None

    return encode


def seed_frames() -> Callable[[Outcome], list[str]]:
    """An encoder of one question's stream in the plain ``/ws``: a text frame per token, ``[DONE]``."""
    tokens = SeedTokens()
    return lambda event: [_ws_piece(piece) for piece in tokens.pieces(event)]


def seed_frames_refused(error: HTTPError) -> list[str]:
    """The ``/ws`` frames of a question refused before it ran."""
    return [_ws_piece(piece) for piece in SeedTokens.refused(error)]


# --- /v1/ws frames -------------------------------------------------------------------------------------


def ws_frame(label: str | None, outcome: Outcome) -> str:
    """One ``/v1/ws`` frame for the request the client labelled ``label``: its result, an event, its
    error, or ``cancelled`` (a cancel by id, or the cancel frame)."""
    if isinstance(outcome, PredictionResult):
        return dumps({"id": label, "type": "result", **result_json(outcome)})
    if isinstance(outcome, ErrorEvent) and isinstance(outcome.error, RequestCancelledError):
        return ws_cancelled(label)
    name, payload = event_json(outcome)
    return dumps({"id": label, "type": name, **payload})


def ws_cancelled(label: str | None) -> str:
    """The last frame of a request that was cancelled."""
    return dumps({"id": label, "type": "cancelled"})


def ws_refused(label: str | None, error: HTTPError | EngineError) -> str:
    """The ``error`` frame of a frame refused before it ran (with its label, when it had one)."""
    if isinstance(error, HTTPError):
        body = error_body(error.message, type=error.type, code=error.code, param=error.param)
    else:
        body = error_json(error)
    return dumps({"id": label, "type": "error", **body})


# --- batches: as-completed SSE and NDJSON ---------------------------------------------------------------


@attrs.frozen
class BatchDone:
    """The end of a batch's as-completed answer: every one of its ``count`` items had its outcome."""

    count: int


def batch_sse(value: BatchItem | BatchDone) -> bytes:
    """``event: item`` with one outcome, or ``event: done`` with the count."""
    if isinstance(value, BatchDone):
        return sse(dumps({"count": value.count}), event="done")
    return sse(dumps(batch_item_json(value)), event="item")


def batch_ndjson(value: BatchItem | BatchDone) -> bytes:
    """One JSON line: an outcome, or ``{"done": true, "count": n}``."""
    if isinstance(value, BatchDone):
        return (dumps({"done": True, "count": value.count}) + "\n").encode()
    return (dumps(batch_item_json(value)) + "\n").encode()


# --- OpenAI's chat completions: /v1/chat/completions -------------------------------------------------------


@attrs.frozen
class ChatAnswer:
    """What every piece of one chat completion's answer says alike.

    Attributes:
        id: ``chatcmpl-`` and the call's server id (``X-Server-Request-ID``; it cancels the call).
        created: When it was made (Unix seconds).
        model: The program's name.
        json_object: ``content`` is the JSON object of the outputs (else the one output's text).
        schema: A ``json_schema`` response format the outputs must satisfy.
    """

    id: str
    created: int
    model: str
    json_object: bool = False
    schema: Mapping[str, Any] | None = None

    def content(self, result: PredictionResult) -> str:
        """``message.content`` of the result (checked against the schema).

        Raises:
            ProgramError: the outputs do not satisfy the schema.
        """
        check_schema(result.outputs, self.schema, self.model)
        return chat_content(result.outputs, self.json_object)


def chat_usage(result: PredictionResult) -> dict[str, int]:
    usage = result.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def finish_reason(result: PredictionResult) -> str:
    """``length`` when an LM call stopped at its token limit, else ``stop``."""
    return "length" if result.truncated else "stop"


def chat_json(answer: ChatAnswer, result: PredictionResult) -> dict[str, Any]:
    """A ``chat.completion``: one choice with the outputs, the usage summed over every LM call.

    Raises:
        ProgramError: the outputs do not satisfy the response format's schema.
    """
    return {
        "id": answer.id,
        "object": "chat.completion",
        "created": answer.created,
        "model": answer.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.content(result), "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": chat_usage(result),
    }


class ChatChunks:
    """One chat completion's stream: an encoder of the call's outcomes as ``chat.completion.chunk``
    events.

    The first chunk carries the role; then the output's text as the program's last predictor writes it,
    a chunk per delta (one output field: its text; a JSON object: the JSON text as it forms, text fields
    as they stream, the others when the prediction is complete); then what the deltas did not say of the
    outputs, a chunk with ``finish_reason``, the usage chunk when asked (``include_usage``), and
    ``data: [DONE]``. An error ends it as OpenAI's streams do, ``data: {"error": {...}}``, then
    ``[DONE]``.

    Args:
        answer: The completion's id, model and format.
        info: The program (its outputs and their types, its last predictor).
        include_usage: End with a chunk of the usage (``stream_options.include_usage``).
    """

    def __init__(self, answer: ChatAnswer, info: ProgramInfo, *, include_usage: bool) -> None:
        self._answer = answer
        self._include_usage = include_usage
        self._predictor = info.predictor
        self._text_fields = {field.name for field in info.output_fields if field.type == "str"}
        if not answer.json_object:
            self._text_fields &= set(info.outputs[:1])
        head = {"id": answer.id, "object": "chat.completion.chunk", "created": answer.created}
        head |= {"model": answer.model, "system_fingerprint": None}
        usage = ',"usage":null' if include_usage else ""
        # Every content chunk is this prefix, the JSON of its text, this suffix: one dumps per token.
        self._prefix = ("data: " + dumps(head)[:-1] + ',"choices":[{"index":0,"delta":{"content":').encode()
        self._suffix = ('},"logprobs":null,"finish_reason":null}]' + usage + "}\n\n").encode()
        self._head = head
        self._started = False
        self._streamed: dict[str, list[str]] = {}  # text per field, in the order the fields began
        self._open: str | None = None  # the field whose JSON string is open

    def __call__(self, outcome: Outcome) -> bytes | None:
        match outcome:
            case FieldDelta():
                text = self._delta(outcome)
                return self._content(text) if text else None
            case StatusEvent():
                return None
            case FinalEvent():
                return self._final(outcome.result)
            case PredictionResult():
                return self._final(outcome)
            case ErrorEvent():
                return sse(dumps(error_json(outcome.error))) + SSE_DONE
            case _:
                assert_never(outcome)

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = {**self._head, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return sse(dumps(chunk))

    def _content(self, text: str) -> bytes:
        first = b""
        if not self._started:
            self._started = True
            first = self._chunk({"role": "assistant", "content": ""}, None)
        return first + self._prefix + dumps(text).encode() + self._suffix

    def _delta(self, delta: FieldDelta) -> str:
        """The content a delta adds (nothing for another predictor's, or a field streamed at the end)."""
        if delta.predictor != self._predictor or delta.field not in self._text_fields:
            return ""
        if delta.field not in self._streamed:
            if self._streamed and not self._answer.json_object:
                return ""  # one output's text only
            self._streamed[delta.field] = []
            start = self._close_open()
            self._open = delta.field
            if self._answer.json_object:
                start += ("{" if len(self._streamed) == 1 else ",") + dumps(delta.field) + ':"'
        elif delta.field != self._open:
            return ""  # a field that began again after another: its first text stands
        else:
            start = ""
        self._streamed[delta.field].append(delta.text)
        return start + (dumps(delta.text)[1:-1] if self._answer.json_object else delta.text)

    def _close_open(self) -> str:
        if self._open is None or not self._answer.json_object:
            return ""
        self._open = None
        return '"'

    def _rest(self, outputs: Mapping[str, Any]) -> str:
        """What the outputs say beyond what was streamed: the open field's remaining text, then (in a JSON
        object) every field not streamed, and the closing brace."""
        rest = ""
        if self._open is not None:
            final, sent = outputs.get(self._open), "".join(self._streamed[self._open])
            if isinstance(final, str) and final.startswith(sent):
                tail = final[len(sent) :]
                rest = dumps(tail)[1:-1] if self._answer.json_object else tail
        if not self._answer.json_object:
            return rest if self._streamed else chat_content(outputs, False)
        rest += self._close_open()
        for name, value in outputs.items():
            if name not in self._streamed:
                rest += ("{" if not self._streamed else ",") + dumps(name) + ":" + dumps(value)
                self._streamed[name] = []
        return rest + ("}" if self._streamed else "{}")

    def _final(self, result: PredictionResult) -> bytes:
        try:
            check_schema(result.outputs, self._answer.schema, self._answer.model)
        except EngineError as error:
            return sse(dumps(error_json(error))) + SSE_DONE
        rest = self._rest(result.outputs)
        out = self._content(rest) if rest or not self._started else b""
        out += self._chunk({}, finish_reason(result))
        if self._include_usage:
            out += sse(dumps({**self._head, "choices": [], "usage": chat_usage(result)}))
        return out + SSE_DONE


__all__ = [
    "BatchDone",
    "ChatAnswer",
    "ChatChunks",
    "Outcome",
    "SeedTokens",
    "batch_ndjson",
    "batch_sse",
    "chat_json",
    "chat_usage",
    "finish_reason",
    "seed_answer",
    "seed_frames",
    "seed_frames_refused",
    "seed_json",
    "seed_sse",
    "v1_json",
    "v1_sse",
    "ws_cancelled",
    "ws_frame",
    "ws_refused",
]
