"""JSON routes answered below Quart: read the body, call the engine, write the JSON answer, in plain ASGI.

::

    Route("/v1/programs/{name}/predict", "POST", program_predict,
          lean=below_quart(ProgramRequest, v1_prediction))       # a row of dspy_trio.web.routes

A prediction answered from the cache costs the engine about 0.08 ms; Quart's request and app contexts,
its routing, its body reader and its response object cost the server more than that again on every
request. For the routes that answer one JSON object, the front door (:mod:`dspy_trio.web.door`) calls
the route's ``lean`` handler instead of the app: the same parsing, the same engine call and the same
answer, every status, body and header included (tests/test_web_lean.py sends each request both ways
and compares). The route's Quart handler still serves it when CORS is configured (quart-cors shapes
every answer) or when the door hands a refusal to the app.

What Quart did for these routes, done here in the same order:

- ``Content-Type`` must be JSON (415) and the body uncompressed (415), before the body is read;
- the body within ``max_body_bytes``: a ``Content-Length`` above it is a 413 at once, a body that grows
  past it a 413 when it does (werkzeug's ``RequestEntityTooLarge``, as Quart raised it), and the body
  must have arrived by the head's deadline (408 ``body_timeout``) (:func:`dspy_trio.web.body.read_body`);
- while the handler runs, a client that leaves (``http.disconnect``) cancels it, as Quart-Trio's
  message task did: the prediction ends and its upstream call is closed;
- an error becomes the app's JSON answer (:func:`dspy_trio.web.errors.error_answer`); an unexpected one
  is logged and answered 500 ``internal_error``.

The keep-alive guard around the door (:mod:`dspy_trio.web.keepalive`) sees these answers as it sees
the app's: an answer before the whole body arrived waits for it or closes the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pydantic
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from werkzeug.http import parse_options_header

from .body import not_sent_as_json, read_body
from .call import Call
from .deadline import RequestDeadline
from .encoding import dumps
from .errors import HTTPError, error_answer, error_body
from .keepalive import drain_body
from .limits import check_content_encoding, parse_json
from .models import validate
from .protocol import LEAVING
from .service import Service

logger = logging.getLogger("dspy_trio.web")

M = TypeVar("M", bound=pydantic.BaseModel)
LeanHandler = Callable[[Service, Call, Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

_LEFT: Any = object()  # the client left while its answer was being made


def below_quart(model: type[M], answer: Callable[[Service, Call, M], Awaitable[Any]]) -> LeanHandler:
    """The ASGI handler of a route whose answer is ``await answer(service, call, data)`` as JSON, with
    the body validated as ``model`` (the route's Quart handler does the same through ``json_body``).
    The handler blocks until the answer is sent, or until the client leaves."""

    async def handler(
        service: Service, call: Call, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        request: Any = scope
        settings = service.settings
        method, path = request["method"], request["path"]
        status, headers = 200, dict[str, str]()
        closing = False
        try:
            head = RequestDeadline.of_head(settings, arrived=call.arrived, header=call.timeout_header)
            try:
                _check_head(request)
            except HTTPError:  # refused before the body was read: read it, so the connection serves on
                complete = await drain_body(
                    request, receive, max_bytes=settings.max_body_bytes, max_wait=settings.keep_alive_timeout
                )
                if complete is None:
                    return  # the client left
                closing = not complete
                raise
            raw = await read_body(request, receive, settings, head)
            if raw is None:
                return  # the client left: nobody to answer
            value = parse_json(raw, max_bytes=settings.max_body_bytes, max_depth=settings.max_json_depth)
            payload = await _unless_the_client_leaves(
                request, receive, answer, service, call, validate(model, value)
            )
            if payload is _LEFT:
                return  # the client left while it ran: it was cancelled
        except Exception as error:
            try:
                status, payload, headers = error_answer(call, error, settings, method, path)
            except Exception:
                logger.exception("unhandled error in %s %s", method, path)
                status, headers = 500, {}
                payload = error_body("internal error", type="server_error", code="internal_error")
        body = dumps(payload).encode()
        head_fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        head_fields += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        if closing:
            head_fields.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": head_fields})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return handler


def _header(scope: Any, name: bytes) -> str | None:
    """The first value of a request header (as werkzeug's ``Headers.get`` reads it)."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _check_head(scope: Any) -> None:
    """Refuse a body that is not sent as JSON, or sent compressed, before reading it.

    Raises:
        HTTPError: 415 ``unsupported_media_type`` or ``unsupported_content_encoding``.
    """
    mimetype, _ = parse_options_header(_header(scope, b"content-type") or "")
    if mimetype.lower() != "application/json":
        raise not_sent_as_json()
    check_content_encoding(_header(scope, b"content-encoding"))


async def _unless_the_client_leaves(
    request: Any,
    receive: ASGIReceiveCallable,
    answer: Callable[[Service, Call, M], Awaitable[Any]],
    service: Service,
    call: Call,
    data: M,
) -> Any:
    """``await answer(service, call, data)``, cancelled if the client leaves first (then ``_LEFT``).
    Blocks for the answer.

    The service's connections tell it through the ``LEAVING`` extension (:mod:`dspy_trio.web.protocol`);
    under another server, or when the client left before this looked (the stream took the extension
    away), a task waits for the ``http.disconnect`` (the body has been read: the next message is the
    client's leaving), as Quart-Trio's does.

    Raises:
        Exception: what ``answer`` raised.
    """
    leaving: list[trio.CancelScope] | None = request.get("extensions", {}).get(LEAVING)
    if leaving is not None:
        with trio.CancelScope() as scope:
            leaving.append(scope)
            try:
                return await answer(service, call, data)
            finally:
                leaving.remove(scope)
        return _LEFT  # only a cancel by the connection ends the block without returning
    payload: Any = _LEFT
    failure: Exception | None = None

    async def watch(cancel_scope: trio.CancelScope) -> None:
        while True:
            message: Any = await receive()
            if message["type"] == "http.disconnect":
                cancel_scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            payload = await answer(service, call, data)
        except Exception as error:  # raised below, not from the nursery (which would group it)
            failure = error
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return payload


__all__ = ["LeanHandler", "below_quart"]
