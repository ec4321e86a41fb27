"""The programs API: list, predict, stream (SSE) and batch (JSON, SSE or NDJSON)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from quart import Blueprint, Response, g, request

from dspy_trio.engine import BatchItem, UnknownProgramError

from .cache_control import cache_switches
from .encoding import batch_item_json, result_json
from .errors import HTTPError
from .http import checked_engine, deadline, json_body, json_response, predict, sse_response, state
from .models import BatchRequest, ProgramRequest
from .routes_seed import stream_response
from .sse import batch_body, missing_outcomes

programs = Blueprint("programs", __name__)


@programs.get("/v1/programs")
async def list_programs() -> Response:
    """Every served program with its input and output fields."""
    listing = [
        {
            "name": info.name,
            "kind": info.kind,
            "lm": info.lm,
            "inputs": [{"name": f.name, "type": f.type, "required": f.required} for f in info.inputs],
            "outputs": list(info.outputs),
        }
        for info in state().require_engine().programs()
    ]
    return json_response({"programs": listing})


@programs.post("/v1/programs/<name>/predict")
@json_body(ProgramRequest)
async def program_predict(name: str, data: ProgramRequest) -> Response:
    """One prediction: outputs, usage and timings."""
    return json_response(result_json(await predict(name, data.inputs, deadline(data.timeout_secs))))


@programs.post("/v1/programs/<name>/stream")
@json_body(ProgramRequest)
async def program_stream(name: str, data: ProgramRequest) -> Response:
    """SSE: status, deltas, then one final or error event."""
    return stream_response(name, data.inputs, data.timeout_secs, seed=False)


@programs.post("/v1/programs/<name>/batch")
@json_body(BatchRequest)
async def program_batch(name: str, data: BatchRequest) -> Response:
    """Every item's outcome: JSON in input order, or as they complete over SSE or NDJSON
    (``Accept: text/event-stream`` or ``application/x-ndjson``)."""
    limits = state().settings
    until = deadline(data.timeout_secs)
    if len(data.items) > limits.max_batch_items:
        raise HTTPError(
            413,
            f"at most {limits.max_batch_items} items per batch",
            type="invalid_request_error",
            code="batch_too_large",
        )
    engine = checked_engine(data.items)
    known = [info.name for info in engine.programs()]
    if name not in known:  # the batch's own error; bad items get an outcome each instead
        raise UnknownProgramError(name, known)
    concurrency = min(data.concurrency, limits.max_batch_concurrency)
    request_id, owner = g.request_id, g.owner
    no_cache, no_store = cache_switches(request.headers)

    @asynccontextmanager
    async def open_batch() -> AsyncIterator[trio.MemoryReceiveChannel[BatchItem]]:
        async with engine.batch_stream(
            name,
            data.items,
            concurrency=concurrency,
            fail_fast=data.fail_fast,
            request_id=request_id,
            owner=owner,
            no_cache=no_cache,
            no_store=no_store,
        ) as outcomes:
            yield outcomes

    accept = request.accept_mimetypes.best_match(
        ["application/json", "text/event-stream", "application/x-ndjson"]
    )
    if accept in ("text/event-stream", "application/x-ndjson"):
        body = batch_body(
            open_batch,
            count=len(data.items),
            deadline=until,
            keepalive=limits.sse_keepalive,
            ndjson=accept != "text/event-stream",
        )
        return sse_response(body, accept)
    outcomes: dict[int, dict[str, Any]] = {}
    with until.scope() as scope:
        async with open_batch() as stream:
            async for item in stream:
                outcomes[item.index] = batch_item_json(item)
    reason = until.error() if scope.cancelled_caught else None
    for item in missing_outcomes(len(data.items), set(outcomes), reason):
        outcomes[item.index] = batch_item_json(item)
    return json_response({"results": [outcomes[i] for i in range(len(data.items))]})
