"""JSON and Server-Sent Events encodings of the engine's values."""

from __future__ import annotations

import json
from typing import Any, assert_never

import attrs

from dspy_trio.engine import (
    BatchItem,
    EngineError,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    PredictionResult,
    StatusEvent,
    StreamEvent,
)

from .errors import engine_error_response


def _default(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if attrs.has(type(value)):
        return attrs.asdict(value)
    return str(value)


def dumps(value: Any) -> str:
    """Compact JSON; values JSON cannot hold (pydantic models, DSPy types) as their JSON form or text."""
    return json.dumps(value, default=_default, separators=(",", ":"), ensure_ascii=False)


def result_json(result: PredictionResult) -> dict[str, Any]:
    """A result's JSON; ``usage.by_lm`` and ``timings.lm_calls`` name the LM that answered each LM call
    (a fallback's, when the first LM failed: ``skipped`` says which and why). What the response cache and
    single-flight did is there only when they did something: ``usage.saved_tokens``, ``timings.cached``
    (every LM call answered from the cache), ``timings.cached_calls`` and ``timings.shared_calls``."""
    usage, timings = result.usage, result.timings
    by_lm: dict[str, dict[str, int]] = {}
    for call in result.lm_calls:
        tokens = by_lm.setdefault(call.lm, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        tokens["calls"] += 1
        tokens["prompt_tokens"] += call.prompt_tokens
        tokens["completion_tokens"] += call.completion_tokens
    encoded: dict[str, Any] = {
        "request_id": result.request_id,
        "program": result.program,
        "outputs": dict(result.outputs),
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "by_lm": by_lm,
        },
        "timings": {
            "queued_ms": round(timings.queued * 1000, 3),
            "lm_ms": round(timings.lm * 1000, 3),
            "total_ms": round(timings.total * 1000, 3),
            "lm_calls": [
                {
                    "lm": call.lm,
                    "model": call.model,
                    "ms": round(call.seconds * 1000, 3),
                    "skipped": [{"lm": s.lm, "reason": s.reason} for s in call.skipped],
                }
                for call in result.lm_calls
            ],
        },
    }
    if usage.saved_tokens:
        encoded["usage"]["saved_tokens"] = usage.saved_tokens
    if timings.cached_calls or timings.shared_calls:
        encoded["timings"].update(
            cached=timings.cached, cached_calls=timings.cached_calls, shared_calls=timings.shared_calls
        )
    return encoded


def batch_item_json(item: BatchItem) -> dict[str, Any]:
    """One batch outcome: ``{"index", "ok": true, ...result}`` or ``{"index", "ok": false, "error"}``."""
    if item.result is not None:
        return {"index": item.index, "ok": True, **result_json(item.result)}
    assert item.error is not None
    return {"index": item.index, "ok": False, **error_json(item.error)}


def error_json(error: EngineError) -> dict[str, Any]:
    return engine_error_response(error)[1]


def event_json(event: StreamEvent) -> tuple[str, dict[str, Any]]:
    """The SSE event name and JSON payload of a stream event."""
    match event:
        case FieldDelta():
            delta: dict[str, str | int] = {
                "predictor": event.predictor,
                "field": event.field,
                "text": event.text,
            }
            if event.call:  # a predictor's second (third, ...) LM call within the request
                delta["call"] = event.call
            return "delta", delta
        case StatusEvent():
            return "status", {"stage": event.stage, "queued_ms": round(event.queued * 1000, 3)}
        case FinalEvent():
            return "final", {
                **result_json(event.result),
                "dropped": event.dropped,
                "coalesced": event.coalesced,
            }
        case ErrorEvent():
            return "error", error_json(event.error)
        case _:
            assert_never(event)


def sse(data: str, event: str | None = None) -> bytes:
    """One Server-Sent Event; multi-line data becomes several ``data:`` lines, as the format requires."""
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


SSE_KEEPALIVE = b": keep-alive\n\n"
SSE_DONE = b"data: [DONE]\n\n"
