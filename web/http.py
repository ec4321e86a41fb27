"""What the HTTP route modules share: the state, JSON bodies within the limits, deadlines, responses."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pydantic
import trio
from quart import Response, current_app, g, request
from quart_schema import document_request
from werkzeug.exceptions import RequestTimeout

from dspy_trio.engine import Engine, PredictionResult

from .deadline import RequestDeadline
from .encoding import dumps
from .errors import HTTPError
from .limits import check_inputs, parse_json
from .models import validate
from .settings import ServiceSettings
from .sse import SSE_HEADERS
from .state import ServiceState

M = TypeVar("M", bound=pydantic.BaseModel)


def state() -> ServiceState:
    """The service state of the running app."""
    service: ServiceState = current_app.extensions["dspy_trio"]
    return service


def settings() -> ServiceSettings:
    return state().settings


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(payload), status=status, headers=dict(headers or {}), mimetype="application/json")


async def read_json(model: type[M]) -> M:
    """The request body as ``model``: JSON within the size and nesting limits, then validated.

    Blocks until the body has arrived, at most until the deadline the request's head names
    (:meth:`RequestDeadline.of_head`): Quart's own wait (``BODY_TIMEOUT``, 60 s) knows nothing of it.

    Raises:
        HTTPError: 415 when it is not sent as JSON; 408 ``body_timeout`` when the body is not all there
            by the head's deadline; 400/413 from the limits; 422 invalid fields.
    """
    if request.mimetype != "application/json":
        raise HTTPError(
            415,
            "send the body as JSON with Content-Type: application/json",
            type="invalid_request_error",
            code="unsupported_media_type",
        )
    limits = settings()
    head = RequestDeadline.of_head(limits, arrived=g.arrived, header=request.headers.get("X-Request-Timeout"))
    request.body_timeout = max(0.0, head.at - trio.current_time())  # type: ignore[assignment]  # int in Quart
    try:
        raw = await request.get_data(cache=False)
    except RequestTimeout:
        raise HTTPError(
            408,
            f"the request body did not arrive within the request's timeout of {head.timeout:g}s",
            type="timeout_error",
            code="body_timeout",
        ) from None
    value = parse_json(raw, max_bytes=limits.max_body_bytes, max_depth=limits.max_json_depth)
    return validate(model, value)


def json_body(model: type[M]) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorate a handler to receive the body as ``data: model`` (and document it in the OpenAPI schema)."""

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await handler(*args, data=await read_json(model), **kwargs)

        return document_request(model)(wrapper)

    return decorate


def deadline(asked: float | None) -> RequestDeadline:
    """The request's deadline from ``timeout_secs`` or ``X-Request-Timeout``, counted from its arrival."""
    found = RequestDeadline.start(
        settings(), arrived=g.arrived, asked=asked, header=request.headers.get("X-Request-Timeout")
    )
    g.timeout = found.timeout
    return found


def checked_engine(inputs: Mapping[str, Any] | list[Any]) -> Engine:
    """The engine, after checking the inputs' size and text (413 / 422)."""
    engine = state().require_engine()
    check_inputs(inputs, max_chars=settings().max_input_chars)
    return engine


async def predict(program: str, inputs: Mapping[str, Any], until: RequestDeadline) -> PredictionResult:
    """One prediction within the request's deadline, cancellable by its owner.

    Raises:
        EngineError: as the engine raises it; DeadlineExceededError past ``until``.
    """
    engine = checked_engine(inputs)
    with until.scope():
        result = await engine.predict(program, inputs, request_id=g.request_id, owner=g.owner)
        g.timings = result.timings
        g.lms = result.lms
        return result
    raise until.error()


def sse_response(body: Any, content_type: str = "text/event-stream") -> Response:
    """A streamed response with the SSE headers (no response timeout: the request's deadline ends it)."""
    headers = SSE_HEADERS if content_type == "text/event-stream" else {"Content-Type": content_type}
    response = Response(body, status=200, headers=headers)
    response.timeout = None
    return response
