"""The Quart-Trio application: parse, call the engine, format. No scheduling logic lives here.

The routes live in Blueprints by concern (:mod:`dspy_trio.web.routes_seed`,
:mod:`dspy_trio.web.routes_programs`,
:mod:`dspy_trio.web.routes_ops`, :mod:`dspy_trio.web.websockets`); this module wires them with what every
request shares:

- a server-generated request id (``uuid4`` hex), the only id used for routing and cancelling; a client's
  ``X-Request-ID`` is kept as a correlation label (echoed back, logged);
- the arrival time of the request's head, from which its deadline counts (:mod:`dspy_trio.web.deadline`);
- one :func:`dspy_trio.web.auth.authorize` for HTTP and WebSocket, whose key becomes the request's owner;
- CORS by quart-cors (off unless ``cors_origins`` is set);
- one log line per answered HTTP request, refusals included; errors as JSON (:mod:`dspy_trio.web.errors`).

The engine is opened by the app's lifespan (``while_serving``) and drained by
:func:`dspy_trio.web.server.serve` before Hypercorn closes connections.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from quart import Response, g, has_request_context, request, websocket
from quart_cors import cors
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from dspy_trio.engine import EngineError, open_engine
from dspy_trio.engine.lm import TrioLM

from .auth import authorize
from .encoding import dumps
from .errors import HTTPError, engine_error_response, error_body, http_error_response
from .http import json_response
from .http import settings as _settings
from .http import state as _state
from .openapi import SWAGGER_CSS_URL, SWAGGER_JS_URL, ServiceOpenAPI, swagger_ui
from .routes_ops import ops
from .routes_programs import programs
from .routes_seed import seed
from .settings import ServiceSettings
from .state import ServiceState
from .websockets import websockets

logger = logging.getLogger("dspy_trio.web")
access_log = logging.getLogger("dspy_trio.web.requests")

_LABEL = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STATIC = Path(__file__).parent / "static"
_CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout"]
_CORS_EXPOSE = ["X-Request-ID", "X-Server-Request-ID", "Server-Timing", "Retry-After"]
_CORS_METHODS = ["GET", "POST", "DELETE", "OPTIONS"]
_WERKZEUG_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def create_app(
    settings: ServiceSettings | None = None, *, lms: Mapping[str, TrioLM] | None = None
) -> QuartTrio:
    """Build the application. The engine opens when serving starts and closes when it ends.

    Args:
        settings: Service and engine settings; ``ServiceSettings.from_env()`` when omitted.
        lms: LM instances to use instead of those in the engine config (tests, embedding).
    """
    settings = settings or ServiceSettings.from_env()
    app = QuartTrio(__name__, static_folder=str(_STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams are bounded by each request's own deadline
    app.config["QUART_SCHEMA_SWAGGER_JS_URL"] = SWAGGER_JS_URL  # served from the package: /docs works offline
    app.config["QUART_SCHEMA_SWAGGER_CSS_URL"] = SWAGGER_CSS_URL
    QuartSchema(
        app,
        info={"title": "dspy-trio", "version": "0.1.0"},
        openapi_provider_class=ServiceOpenAPI,
        redoc_ui_path=None,  # both load their scripts from CDNs: blank pages offline
        scalar_ui_path=None,
    )
    state = ServiceState(settings)
    app.extensions["dspy_trio"] = state

    # The engine lives in a task of the lifespan's nursery (``app.nursery``), not in an async generator
    # (``while_serving``): its nursery must never be suspended across a ``yield``, or a cancelled
    # lifespan corrupts Trio's nursery stack.
    engine_stop, engine_closed = trio.Event(), trio.Event()

    async def own_engine(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            async with open_engine(settings.engine, lms=lms) as engine:
                state.engine = engine
                task_status.started()
                started = True
                await engine_stop.wait()
                state.draining = True
        except Exception as exc:
            # Hypercorn would log a failed lifespan and serve on without an engine: instead the service
            # stops and ``serve`` ends with this error (a supervisor then restarts the process).
            state.fail(exc)
            if not started:
                raise
        finally:
            engine_closed.set()

    @app.before_serving
    async def start_engine() -> None:
        await app.nursery.start(own_engine)

    @app.after_serving
    async def stop_engine() -> None:
        engine_stop.set()
        await engine_closed.wait()

    app.before_request(identify_and_authorize)
    app.before_request(refuse_when_overloaded)
    app.after_request(decorate)
    for blueprint in (ops, seed, programs, websockets, swagger_ui):
        app.register_blueprint(blueprint)
    if settings.cors_origins:
        cors(
            app,
            allow_origin=list(settings.cors_origins),
            allow_methods=_CORS_METHODS,
            allow_headers=_CORS_HEADERS,
            expose_headers=_CORS_EXPOSE,
            max_age=600,
        )
    register_error_handlers(app)
    return app


async def identify_and_authorize() -> None:
    """Before every HTTP request: its arrival time, its ids, and its owner (or 401)."""
    g.arrived = trio.current_time()
    g.request_id = uuid.uuid4().hex
    label = request.headers.get("X-Request-ID", "")
    g.label = label if _LABEL.match(label) else None
    g.owner = ""
    g.owner = authorize(_settings(), method=request.method, path=request.path, headers=request.headers)


# Endpoints that refuse an overload before their body is read (a batch is admitted item by item).
_OVERLOAD_CHECKED = {
    "programs.program_predict": None,
    "programs.program_stream": None,
    "seed.seed_predict": "default",
    "seed.seed_predict_stream": "default",
    "seed.seed_stream": "default",
}


async def refuse_when_overloaded() -> None:
    """Before a prediction or stream: a 429 at once when the engine is overloaded, before the body is
    parsed and validated, so refusals stay cheap when the server is saturated."""
    if request.method != "POST" or request.endpoint not in _OVERLOAD_CHECKED:
        return  # e.g. a CORS preflight (OPTIONS) of the same route: never refused, never counted
    if (engine := _state().engine) is None:
        return
    program = _OVERLOAD_CHECKED[request.endpoint] or (request.view_args or {}).get("name", "")
    engine.refuse_if_overloaded(str(program))


async def decorate(response: Response) -> Response:
    """After every HTTP request: ids, ``Server-Timing``, ``Allow`` on 405, and one access log line."""
    request_id = g.get("request_id", "")
    response.headers["X-Server-Request-ID"] = request_id
    response.headers["X-Request-ID"] = g.get("label") or request_id
    arrived = g.get("arrived", trio.current_time())
    total = (trio.current_time() - arrived) * 1000
    timing = [f"total;dur={total:.3f}"]
    if (timings := g.get("timings")) is not None:
        lm = f"lm;dur={timings.lm * 1000:.3f}"
        if lms := g.get("lms"):  # the LMs that answered (a fallback's name when the first one failed)
            lm += f";desc={_quoted(' '.join(lms))}"
        timing += [f"queue;dur={timings.queued * 1000:.3f}", lm]
    response.headers["Server-Timing"] = ", ".join(timing)
    if (refused := g.get("refused")) is not None and access_log.isEnabledFor(logging.INFO):
        log_refusal(refused, response.status_code, total)
    return response


def _quoted(text: str) -> str:
    """``text`` as an HTTP quoted-string (RFC 9110): printable ASCII only, ``"`` and ``\\`` escaped.
    (An LM's name is a TOML key, which may hold anything, a newline included.)"""
    kept = "".join(c for c in text if " " <= c <= "~")
    return '"' + kept.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_refusal(code: str, status: int, total_ms: float) -> None:
    """One JSON line, shaped like the engine's request lines, for a request the web layer refused before
    the engine saw it (401, 404, 405, 413, 415, 422, ...)."""
    line = {
        "event": "request",
        "request_id": g.get("request_id"),
        "label": g.get("label"),
        "kind": "http",
        "method": request.method,
        "path": request.path,
        "status": status,
        "outcome": "rejected" if status in (401, 403) else "invalid",
        "error": code,
        "total_ms": round(total_ms, 3),
    }
    access_log.info(dumps(line))


def register_error_handlers(app: QuartTrio) -> None:
    """Every error as JSON in OpenAI's shape; never a stack trace."""

    @app.errorhandler(EngineError)
    async def on_engine_error(error: EngineError) -> Response:
        status, body, headers = engine_error_response(error)
        return json_response(body, status, headers)

    @app.errorhandler(HTTPError)
    async def on_http_error(error: HTTPError) -> Response:
        status, body, headers = http_error_response(error)
        g.refused = error.code
        return json_response(body, status, headers)

    @app.errorhandler(HTTPException)
    async def on_werkzeug_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = f"the request body is larger than {_settings().max_body_bytes} bytes"
        elif message == type(error).description:  # werkzeug's generic text: say what is known
            message = f"{error.name.lower()}: {request.method} {request.path}"
        kind = "invalid_request_error" if status < 500 else "server_error"
        headers: dict[str, Any] = {}
        if status == 405 and (valid := getattr(error, "valid_methods", None)):
            headers["Allow"] = ", ".join(sorted(valid))
        body = error_body(message, type=kind, code=_WERKZEUG_CODES.get(status, "http_error"))
        g.refused = body["error"]["code"]
        return json_response(body, status, headers)

    @app.errorhandler(UnicodeDecodeError)
    async def on_undecodable_body(error: UnicodeDecodeError) -> Response:
        message = "the request body must be UTF-8 JSON"
        g.refused = "bad_request"
        return json_response(error_body(message, type="invalid_request_error", code="bad_request"), 400)

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        if has_request_context():
            logger.exception("unhandled error in %s %s", request.method, request.path)
        else:  # a WebSocket handler
            logger.exception("unhandled error in WebSocket %s", websocket.path)
        return json_response(error_body("internal error", type="server_error", code="internal_error"), 500)


__all__ = ["ServiceState", "create_app"]
