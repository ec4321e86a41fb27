"""The programs API: list, predict, stream (SSE) and batch (JSON, SSE or NDJSON)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from quart import Response, request

from dspy_trio.engine import BatchItem, StreamEvent, UnknownProgramError

from .call import Call
from .encoding import batch_item_json
from .errors import HTTPError
from .formats import BatchDone, batch_ndjson, batch_sse, v1_json, v1_sse
from .http import checked_engine, json_body, json_response, predict_answer, streamed_response
from .models import BatchRequest, ProgramRequest
from .routing import Wire
from .runner import Emit, run, run_batch
from .service import Service
from .sse import EventBody


async def list_programs(service: Service, call: Call) -> Response:
    """Every served program with its input and output fields."""
    listing = [
        {
            "name": info.name,
            "kind": info.kind,
            "lm": info.lm,
            "inputs": [{"name": f.name, "type": f.type, "required": f.required} for f in info.inputs],
            "outputs": list(info.outputs),
        }
        for info in service.require_engine().programs()
    ]
    return json_response({"programs": listing})


@json_body(ProgramRequest)
async def program_predict(service: Service, call: Call, name: str, data: ProgramRequest) -> Response:
    """One prediction: outputs, usage and timings."""
    return json_response(await v1_prediction(service, call, data))


async def v1_prediction(service: Service, call: Call, data: ProgramRequest) -> dict[str, Any]:
    """The JSON answer of ``program_predict`` (which :func:`dspy_trio.web.lean.below_quart` serves too)."""
    return v1_json(await predict_answer(service, call, data.inputs, data.timeout_secs))


@json_body(ProgramRequest)
async def program_stream(service: Service, call: Call, name: str, data: ProgramRequest) -> Response:
    """SSE: status, deltas, then one final or error event."""
    return stream_response(service, call, data.inputs, data.timeout_secs, v1_sse)


def stream_response(
    service: Service,
    call: Call,
    inputs: Mapping[str, Any],
    asked: float | None,
    encode: Callable[[StreamEvent], bytes | None],
) -> Response:
    """An SSE response streaming the call's run of its route's program; bad input and overload are
    answered with a status first (:meth:`dspy_trio.engine.Engine.precheck`), the rest as events."""
    until = call.deadline(service.settings, asked)
    engine = checked_engine(service, inputs)
    program = call.runs()
    engine.precheck(program, inputs, tenant=call.tenant)  # bad input and overload get a status, not an event

    async def produce(emit: Emit) -> None:
        await run(engine, call, until, program, inputs, stream=True, emit=emit)

    return streamed_response(EventBody(produce, keepalive=service.settings.sse_keepalive, encode=encode))


@json_body(BatchRequest)
async def program_batch(service: Service, call: Call, name: str, data: BatchRequest) -> Response:
    """Every item's outcome: JSON in input order, or as they complete over SSE or NDJSON
    (``Accept: text/event-stream`` or ``application/x-ndjson``)."""
    limits = service.settings
    until = call.deadline(limits, data.timeout_secs)
    if len(data.items) > limits.max_batch_items:
        raise HTTPError(
            413,
            f"at most {limits.max_batch_items} items per batch",
            type="invalid_request_error",
            code="batch_too_large",
        )
    engine = checked_engine(service, data.items)
    program = call.runs()
    known = [info.name for info in engine.programs()]
    if program not in known:  # the batch's own error; bad items get an outcome each instead
        raise UnknownProgramError(program, known)
    concurrency = min(data.concurrency, limits.max_batch_concurrency)
    formats = call.route.formats if call.route is not None else (Wire.JSON,)
    wire = _negotiate(formats)

    async def produce(emit: Callable[[BatchItem | BatchDone], Any]) -> None:
        await run_batch(
            engine,
            call,
            until,
            program,
            data.items,
            concurrency=concurrency,
            fail_fast=data.fail_fast,
            emit=emit,
        )
        await emit(BatchDone(len(data.items)))

    if wire is Wire.BATCH_SSE:
        return streamed_response(EventBody(produce, keepalive=limits.sse_keepalive, encode=batch_sse))
    if wire is Wire.NDJSON:
        body = EventBody(produce, keepalive=limits.sse_keepalive, encode=batch_ndjson, idle=b"\n")
        return streamed_response(body, wire.media_type)
    outcomes: dict[int, dict[str, Any]] = {}

    async def keep(item: BatchItem) -> None:
        outcomes[item.index] = batch_item_json(item)

    await run_batch(
        engine, call, until, program, data.items, concurrency=concurrency, fail_fast=data.fail_fast, emit=keep
    )
    return json_response({"results": [outcomes[i] for i in range(len(data.items))]})


def _negotiate(formats: tuple[Wire, ...]) -> Wire:
    """The route's format the client's ``Accept`` prefers (the route's first when it names none)."""
    best = request.accept_mimetypes.best_match([wire.media_type for wire in formats])
    return next((wire for wire in formats if wire.media_type == best), formats[0])
