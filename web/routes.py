"""The service's route table: every endpoint, once.

The app registers each handler from here (:func:`dspy_trio.web.app.create_app`), the front door reads
which routes are open and which run a program (:mod:`dspy_trio.web.door`), and /openapi.json reads what
each answers and refuses (:mod:`dspy_trio.web.openapi`). Adding an endpoint is a row here and its
handler; nothing else.

What a row says is explained on :class:`dspy_trio.web.routing.Route`. The refusals listed are those the
OpenAPI document shows; 401 is added to every route that is not ``open``.
"""

from __future__ import annotations

from .lean import below_quart
from .models import ProgramRequest, SeedRequest
from .openapi import swagger_ui_asset
from .routes_mcp import mcp_endpoint
from .routes_openai import chat_completions, get_model, list_models
from .routes_ops import cancel_request, health, metrics, playground, ready, tenant
from .routes_programs import list_programs, program_batch, program_predict, program_stream, v1_prediction
from .routes_seed import seed_answer, seed_predict, seed_predict_stream, seed_stream
from .routing import Route, Wire
from .websockets import multiplexed_ws, seed_ws

_BODY = {400, 413, 415, 422, 503}  # anything that reads a JSON body
_PREDICTION = _BODY | {404, 429, 499, 502, 504}
_STREAM = _BODY | {404, 429}  # once the stream has begun, errors are events
_BATCH = _BODY | {404}  # items fail one by one, in the results
_SEED_SSE = "SSE: `data: <token>` ..., then `data: [DONE]`."
# OpenAI's statuses: bad input is 400 (never 422); 408 when the body does not arrive in time.
_CHAT = {400, 404, 408, 413, 415, 429, 499, 502, 503, 504}

ROUTES: tuple[Route, ...] = (
    # Operations.
    Route("/", "GET", playground, open=True, formats=(Wire.HTML,), answer="The playground (HTML)."),
    Route("/health", "GET", health, open=True, formats=(Wire.TEXT,), answer="`OK` (text)."),
    Route(
        "/ready",
        "GET",
        ready,
        open=True,
        answer=(
            '`{"status": "ready"}`, with `breakers` (each circuit breaker\'s state) when LMs have one and '
            "`cluster` when Redis is configured."
        ),
        refusals={503},
    ),
    Route(
        "/metrics",
        "GET",
        metrics,
        formats=(Wire.PROMETHEUS, Wire.JSON),
        answer="Prometheus text, or JSON with `Accept: application/json`.",
        refusals={503},
    ),
    Route(
        "/v1/tenant",
        "GET",
        tenant,
        answer='`{"tenant", "weight", "max_in_flight", "max_queued", "rate_limit", "budget", "usage"}`: '
        "the tenant of the caller's key (its name, never the key).",
        refusals={503},
    ),
    Route(
        "/v1/requests/{request_id}",
        "DELETE",
        cancel_request,
        answer='`{"cancelled": id}`; 404 `unknown_request` for an id not in flight for this key.',
        refusals={404, 503},
    ),
    # The plain endpoints: the default program, a question, an answer.
    Route(
        "/predict",
        "POST",
        seed_predict,
        program="default",
        lean=below_quart(SeedRequest, seed_answer),
        answer='`{"answer", "duration_ms", "request_id"}`.',
        refusals=_PREDICTION,
    ),
    Route(
        "/predict/stream",
        "POST",
        seed_predict_stream,
        program="default",
        formats=(Wire.SEED_SSE,),
        answer=_SEED_SSE,
        refusals=_STREAM,
    ),
    Route(
        "/stream",
        "POST",
        seed_stream,
        program="default",
        formats=(Wire.SEED_SSE,),
        answer=_SEED_SSE,
        refusals=_STREAM,
    ),
    Route(
        "/ws", "GET", seed_ws, program="default", websocket=True, formats=(Wire.SEED_WS,), answer="WebSocket."
    ),
    # The programs API.
    Route(
        "/v1/programs",
        "GET",
        list_programs,
        answer='`{"programs": [...]}`: names, input and output fields.',
        refusals={503},
    ),
    Route(
        "/v1/programs/{name}/predict",
        "POST",
        program_predict,
        program="{name}",
        lean=below_quart(ProgramRequest, v1_prediction),
        answer='`{"request_id", "program", "outputs", "usage", "timings"}`.',
        refusals=_PREDICTION,
    ),
    Route(
        "/v1/programs/{name}/stream",
        "POST",
        program_stream,
        program="{name}",
        formats=(Wire.V1_SSE,),
        answer="SSE: `status`, `delta` ..., then one `final` or `error` event.",
        refusals=_STREAM,
    ),
    Route(
        "/v1/programs/{name}/batch",
        "POST",
        program_batch,
        program="{name}",
        per_item=True,
        formats=(Wire.JSON, Wire.BATCH_SSE, Wire.NDJSON),
        answer='`{"results": [...]}` in input order, or SSE / NDJSON as items complete (`Accept`).',
        refusals=_BATCH,
    ),
    Route("/v1/ws", "GET", multiplexed_ws, websocket=True, formats=(Wire.WS_FRAMES,), answer="WebSocket."),
    # OpenAI's API: each program a model.
    Route(
        "/v1/models",
        "GET",
        list_models,
        openai=True,
        answer='`{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}`.',
        refusals={503},
    ),
    Route(
        "/v1/models/{model}",
        "GET",
        get_model,
        openai=True,
        answer='`{"id", "object": "model", "created", "owned_by"}`.',
        refusals={404, 503},
    ),
    Route(
        "/v1/chat/completions",
        "POST",
        chat_completions,
        openai=True,
        formats=(Wire.CHAT, Wire.CHAT_SSE),
        answer="OpenAI's `chat.completion`; with `stream: true`, SSE: `chat.completion.chunk` events, "
        "then `data: [DONE]`.",
        refusals=_CHAT,
    ),
    # MCP: each program a tool (the SDK's Streamable HTTP transport, served below Quart).
    Route(
        "/mcp",
        ("POST", "DELETE"),
        mcp_endpoint,
        asgi=True,
        formats=(Wire.MCP,),
        answer="A JSON-RPC answer, or SSE of its progress notifications and its result (MCP Streamable "
        "HTTP).",
        refusals={400, 403, 404, 406, 408, 413, 415, 503},
    ),
    # The API's description (quart-schema serves it) and the static files (Quart serves them).
    Route("/docs", "GET", None, open=True, formats=(Wire.HTML,), answer="Swagger UI."),
    Route("/openapi.json", "GET", None, open=True, answer="This document."),
    Route("/static/{filename:path}", "GET", None, open=True, formats=(), answer="A static file."),
    Route("/static/swagger-ui/{name}", "GET", swagger_ui_asset, open=True, formats=(), answer="A file."),
)

__all__ = ["ROUTES"]
