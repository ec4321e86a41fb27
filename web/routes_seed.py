"""The plain HTTP endpoints: ``POST /predict`` and its SSE forms ``/predict/stream`` and ``/stream``.

Each runs its route's program (``default``, named in the route table) on ``{"question": ...}``.
"""

from __future__ import annotations

from typing import Any

from quart import Response

from .call import Call
from .formats import seed_json, seed_sse
from .http import json_body, json_response, predict_answer
from .models import SeedRequest
from .routes_programs import stream_response
from .service import Service


@json_body(SeedRequest)
async def seed_predict(service: Service, call: Call, data: SeedRequest) -> Response:
    """Answer a question with the default program."""
    return json_response(await seed_answer(service, call, data))


async def seed_answer(service: Service, call: Call, data: SeedRequest) -> dict[str, Any]:
    """The JSON answer of ``seed_predict`` (which :func:`dspy_trio.web.lean.below_quart` serves too)."""
    result = await predict_answer(service, call, {"question": data.question}, data.timeout_secs)
    return seed_json(result)


@json_body(SeedRequest)
async def seed_predict_stream(service: Service, call: Call, data: SeedRequest) -> Response:
    """The answer's tokens over SSE: ``data: <token>`` per token, then ``data: [DONE]``."""
    return stream_response(service, call, {"question": data.question}, data.timeout_secs, seed_sse())


@json_body(SeedRequest)
async def seed_stream(service: Service, call: Call, data: SeedRequest) -> Response:
    """The answer's tokens over SSE (as ``/predict/stream``)."""
    return stream_response(service, call, {"question": data.question}, data.timeout_secs, seed_sse())
