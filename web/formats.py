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
    RequestCancelledError,
    StatusEvent,
    StreamEvent,
)

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


__all__ = [
    "BatchDone",
    "Outcome",
    "SeedTokens",
    "batch_ndjson",
    "batch_sse",
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
