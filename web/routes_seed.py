"""The seed's HTTP endpoints: ``POST /predict`` and its SSE forms ``/predict/stream`` and ``/stream``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from quart import Blueprint, Response, g, request

from dspy_trio.engine import EventStream

from .cache_control import cache_switches
from .http import checked_engine, deadline, json_body, json_response, predict, sse_response, state
from .models import SeedRequest
from .sse import general_encoder, seed_answer, seed_encoder, stream_body

seed = Blueprint("seed", __name__)


@seed.post("/predict")
@json_body(SeedRequest)
async def seed_predict(data: SeedRequest) -> Response:
    """The seed's endpoint: answer a question with the default program."""
    result = await predict("default", {"question": data.question}, deadline(data.timeout_secs))
    return json_response(
        {
            "answer": seed_answer(result.outputs),
            "duration_ms": round(result.timings.total * 1000, 3),
            "request_id": result.request_id,
        }
    )


@seed.post("/predict/stream")
@json_body(SeedRequest)
async def seed_predict_stream(data: SeedRequest) -> Response:
    """The seed's SSE: ``data: <token>`` per token, then ``data: [DONE]``."""
    return stream_response("default", {"question": data.question}, data.timeout_secs, seed=True)


@seed.post("/stream")
@json_body(SeedRequest)
async def seed_stream(data: SeedRequest) -> Response:
    """The seed's SSE (as ``/predict/stream``)."""
    return stream_response("default", {"question": data.question}, data.timeout_secs, seed=True)


def stream_response(program: str, inputs: dict[str, object], asked: float | None, *, seed: bool) -> Response:
    """An SSE response streaming one run; bad input and overload are answered with a status first."""
    until = deadline(asked)
    engine = checked_engine(inputs)
    engine.precheck(program, inputs)  # so that bad input and overload get a status, not an event
    request_id, owner, service = g.request_id, g.owner, state()
    no_cache, no_store = cache_switches(request.headers)

    @asynccontextmanager
    async def open_stream() -> AsyncIterator[EventStream]:
        async with engine.stream(
            program, inputs, request_id=request_id, owner=owner, no_cache=no_cache, no_store=no_store
        ) as events:
            yield events

    encode = seed_encoder() if seed else general_encoder
    return sse_response(
        stream_body(open_stream, deadline=until, keepalive=service.settings.sse_keepalive, encode=encode)
    )
