"""What the HTTP handlers share: JSON bodies within the limits, the engine after the input checks, and
responses (JSON, and streamed bodies that run a call: :class:`dspy_trio.web.sse.EventBody`).

A handler is ``async def handler(service, call, **path_parameters) -> Response``; :func:`json_body` adds the
validated body as ``data``::

    @json_body(ProgramRequest)
    async def program_predict(service: Service, call: Call, name: str, data: ProgramRequest) -> Response:
        result = await predict_answer(service, call, data.inputs, data.timeout_secs)
        return json_response(v1_json(result))
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pydantic
import trio
from quart import Response, request
from quart_schema import document_request
from werkzeug.exceptions import RequestTimeout

from dspy_trio.engine import Engine, PredictionResult

from .body import body_timeout, not_sent_as_json
from .call import Call
from .deadline import RequestDeadline
from .encoding import dumps
from .limits import check_content_encoding, check_inputs, parse_json
from .models import validate
from .runner import predict
from .service import Service
from .settings import ServiceSettings
from .sse import SSE_HEADERS, EventBody

M = TypeVar("M", bound=pydantic.BaseModel)


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(payload), status=status, headers=dict(headers or {}), mimetype="application/json")


async def read_json(model: type[M], settings: ServiceSettings, head: RequestDeadline | None = None) -> M:
    """The request body as ``model``: JSON within the size and nesting limits, then validated.

    Blocks until the body has arrived, at most until ``head``, the deadline the request's head names
    (:meth:`RequestDeadline.of_head`): Quart's own wait (``BODY_TIMEOUT``, 60 s) knows nothing of it.

    Raises:
        HTTPError: 415 when it is not sent as JSON, or sent compressed; 408 ``body_timeout`` when the
            body is not all there by the head's deadline; 400/413 from the limits; 422 invalid fields.
    """
    if request.mimetype != "application/json":
        raise not_sent_as_json()
    check_content_encoding(request.headers.get("content-encoding"))
    if head is not None:
        request.body_timeout = max(0.0, head.at - trio.current_time())  # type: ignore[assignment]  # int in Quart
    try:
        raw = await request.get_data(cache=False)
    except RequestTimeout:
        raise body_timeout(head) from None
    value = parse_json(raw, max_bytes=settings.max_body_bytes, max_depth=settings.max_json_depth)
    return validate(model, value)


def json_body(model: type[M]) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorate a handler to receive the body as ``data: model`` (and document it in the OpenAPI schema)."""

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def wrapper(service: Service, call: Call, **parameters: Any) -> Any:
            head = RequestDeadline.of_head(service.settings, arrived=call.arrived, header=call.timeout_header)
            data = await read_json(model, service.settings, head)
            return await handler(service, call, data=data, **parameters)

        return document_request(model)(wrapper)

    return decorate


def checked_engine(service: Service, inputs: Mapping[str, Any] | list[Any]) -> Engine:
    """The engine, after checking the inputs' size and text.

    Raises:
        HTTPError: 503 ``not_ready`` while starting or draining; 413 / 422 for the inputs.
    """
    engine = service.require_engine()
    check_inputs(inputs, max_chars=service.settings.max_input_chars)
    return engine


async def predict_answer(
    service: Service, call: Call, inputs: Mapping[str, Any], asked: float | None
) -> PredictionResult:
    """The call's prediction of its route's program, within its deadline, for a JSON answer.

    Raises:
        HTTPError: a bad timeout (422), not ready (503), inputs too large (413 / 422).
        EngineError: the call's outcome when it is an error.
    """
    until = call.deadline(service.settings, asked)
    engine = checked_engine(service, inputs)
    return await predict(engine, call, until, call.runs(), inputs)


def streamed_response(body: EventBody, content_type: str = "text/event-stream") -> Response:
    """A streamed response (SSE headers for ``text/event-stream``); no response timeout: the call's
    deadline ends it."""
    headers = SSE_HEADERS if content_type == "text/event-stream" else {"Content-Type": content_type}
    response = Response(body, status=200, headers=headers)
    response.timeout = None
    return response


__all__ = [
    "checked_engine",
    "json_body",
    "json_response",
    "predict_answer",
    "read_json",
    "streamed_response",
]
