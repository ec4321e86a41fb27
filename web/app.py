"""The Quart-Trio application: parse, call the engine, format. No scheduling logic lives here.

The engine is opened by the app's lifespan (``while_serving``) and drained by :func:`web.server.serve`
before Hypercorn closes connections. Every response carries ``X-Request-ID`` and ``Server-Timing``;
errors are JSON in OpenAI's shape with one status per error (see :mod:`web.errors`).
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pydantic
import trio
from quart import Response, g, request
from quart_schema import QuartSchema, RequestSchemaValidationError, validate_request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from engine import (
    BatchItem,
    DeadlineExceededError,
    Engine,
    EngineError,
    PredictionResult,
    UnknownProgramError,
    open_engine,
)
from engine.lm import TrioLM

from .encoding import batch_item_json, dumps, result_json
from .errors import HTTPError, engine_error_response, error_body, http_error_response
from .metrics import metrics_json, metrics_text
from .settings import ServiceSettings
from .sse import SSE_HEADERS, batch_body, general_encoder, seed_encoder, stream_body
from .workers import instance_metrics_json, instance_metrics_text, workers_dir

logger = logging.getLogger("web")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_OPEN_PATHS = frozenset({"/health", "/ready", "/"})
_STATIC = Path(__file__).parent / "static"


class SeedRequest(pydantic.BaseModel):
    """The seed's body: a question for the default program."""

    model_config = pydantic.ConfigDict(extra="forbid")
    question: str
    timeout_secs: float | None = pydantic.Field(default=None, gt=0)


class BatchRequest(pydantic.BaseModel):
    """A batch for a named program: one inputs object per item."""

    model_config = pydantic.ConfigDict(extra="forbid")
    items: list[dict[str, Any]] = pydantic.Field(min_length=1, max_length=10_000)
    concurrency: int = pydantic.Field(default=8, ge=1, le=256)
    fail_fast: bool = False
    timeout_secs: float | None = pydantic.Field(default=None, gt=0)


class ProgramRequest(pydantic.BaseModel):
    """A request to a named program: its input fields."""

    model_config = pydantic.ConfigDict(extra="forbid")
    inputs: dict[str, Any]
    timeout_secs: float | None = pydantic.Field(default=None, gt=0)


@attrs.define
class ServiceState:
    """What the handlers share: the settings, the engine while serving, and whether to take traffic."""

    settings: ServiceSettings
    engine: Engine | None = None
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining and not self.engine.closing

    def require_engine(self) -> Engine:
        if self.engine is None or self.draining:
            raise HTTPError(
                503, "the service is not ready", type="service_unavailable_error", code="not_ready"
            )
        return self.engine


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(payload), status=status, headers=dict(headers or {}), mimetype="application/json")


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_size(k) + _text_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_size(v) for v in value)
    return 0


def create_app(
    settings: ServiceSettings | None = None, *, lms: Mapping[str, TrioLM] | None = None
) -> QuartTrio:
    """Build the application. The engine opens when serving starts and closes when it ends.

    Args:
        settings: Service and engine settings; ``ServiceSettings.from_env()`` when omitted.
        lms: LM instances to use instead of those in the engine config (tests, embedding).
    """
    settings = settings or ServiceSettings.from_env()
    app = QuartTrio("dspy_trio", static_folder=str(_STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams are bounded by each request's own deadline
    QuartSchema(app, info={"title": "dspy-trio", "version": "0.1.0"})
    state = ServiceState(settings)
    app.extensions["dspy_trio"] = state

    @app.while_serving  # type: ignore[type-var]
    async def lifespan() -> AsyncIterator[None]:
        async with open_engine(settings.engine, lms=lms) as engine:
            state.engine = engine
            yield
            state.draining = True

    def deadline() -> float:
        """The request's deadline: ``timeout_secs`` in the body or ``X-Request-Timeout``, capped."""
        asked = g.get("timeout_secs")
        header = request.headers.get("X-Request-Timeout")
        if asked is None and header is not None:
            try:
                asked = float(header)
            except ValueError:
                asked = math.nan
            if not asked > 0 or not math.isfinite(asked):
                raise HTTPError(
                    422,
                    "X-Request-Timeout must be a positive number of seconds",
                    type="invalid_request_error",
                    code="invalid_timeout",
                    param="X-Request-Timeout",
                )
        timeout = settings.timeout_for(asked)
        g.timeout = timeout
        return trio.current_time() + timeout

    def check_inputs(inputs: Mapping[str, Any]) -> None:
        if _text_size(inputs) > settings.max_input_chars:
            raise HTTPError(
                413,
                f"inputs are longer than {settings.max_input_chars} characters",
                type="invalid_request_error",
                code="input_too_large",
            )

    async def predict(program: str, inputs: Mapping[str, Any]) -> PredictionResult:
        engine = state.require_engine()
        check_inputs(inputs)
        with trio.move_on_at(deadline()) as scope:
            result = await engine.predict(program, inputs, request_id=g.request_id)
            g.timings = result.timings
            return result
        assert scope.cancelled_caught
        raise DeadlineExceededError(f"the request ran past its timeout of {g.timeout:g}s")

    def stream_response(program: str, inputs: Mapping[str, Any], *, seed: bool) -> Response:
        engine = state.require_engine()
        check_inputs(inputs)
        engine.precheck(program, inputs)  # so that bad input and overload get a status, not an event
        body = stream_body(
            engine,
            program,
            inputs,
            request_id=g.request_id,
            deadline=deadline(),
            keepalive=settings.sse_keepalive,
            encode=seed_encoder if seed else general_encoder,
        )
        response = Response(body, status=200, headers=SSE_HEADERS)
        response.timeout = None
        return response

    @app.before_request
    async def identify_and_authenticate() -> None:
        g.started = trio.current_time()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        public = request.path in _OPEN_PATHS or request.path.startswith("/static/")
        if settings.api_keys and not public:
            authorization = request.headers.get("Authorization", "")
            scheme, _, key = authorization.partition(" ")
            matches = [hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys]
            if scheme.lower() != "bearer" or not any(matches):
                raise HTTPError(
                    401,
                    "a valid API key is required (Authorization: Bearer KEY)",
                    type="authentication_error",
                    code="invalid_api_key",
                )

    @app.after_request
    async def decorate(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        timing = [f"total;dur={(trio.current_time() - g.get('started', trio.current_time())) * 1000:.3f}"]
        if (timings := g.get("timings")) is not None:
            timing += [f"queue;dur={timings.queued * 1000:.3f}", f"lm;dur={timings.lm * 1000:.3f}"]
        response.headers["Server-Timing"] = ", ".join(timing)
        origin = request.headers.get("Origin")
        if origin and origin in settings.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, X-Request-ID, X-Request-Timeout"
            )
            response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Server-Timing, Retry-After"
        return response

    @app.errorhandler(EngineError)
    async def on_engine_error(error: EngineError) -> Response:
        status, body, headers = engine_error_response(error)
        return _json(body, status, headers)

    @app.errorhandler(HTTPError)
    async def on_http_error(error: HTTPError) -> Response:
        status, body = http_error_response(error)
        return _json(body, status)

    @app.errorhandler(RequestSchemaValidationError)
    async def on_schema_error(error: RequestSchemaValidationError) -> Response:
        problem = error.validation_error
        if isinstance(problem, pydantic.ValidationError) and problem.errors():
            first = problem.errors()[0]
            field = ".".join(str(part) for part in first.get("loc", ()))
            message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
        else:
            field, message = "", f"invalid request body: {problem}"
        return _json(
            error_body(message, type="invalid_request_error", code="invalid_body", param=field or None), 422
        )

    @app.errorhandler(HTTPException)
    async def on_werkzeug_error(error: HTTPException) -> Response:
        status = error.code or 500
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        message = {
            400: "the request body must be valid JSON",
            413: f"the request body is larger than {settings.max_body_bytes} bytes",
        }.get(status, error.description or error.name)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _json(error_body(message, type=kind, code=codes.get(status, "http_error")), status)

    @app.errorhandler(UnicodeDecodeError)
    async def on_undecodable_body(error: UnicodeDecodeError) -> Response:
        message = "the request body must be UTF-8 JSON"
        return _json(error_body(message, type="invalid_request_error", code="bad_request"), 400)

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return _json(error_body("internal error", type="server_error", code="internal_error"), 500)

    @app.get("/")
    async def playground() -> Response:
        """The browser playground (static files shipped in the package)."""
        return await app.send_static_file("index.html")

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process answers."""
        return Response("OK", mimetype="text/plain")

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 503 while starting or draining."""
        if state.ready:
            return _json({"status": "ready"})
        return _json(error_body("not ready", type="service_unavailable_error", code="not_ready"), 503)

    @app.post("/predict")
    @validate_request(SeedRequest)
    async def seed_predict(data: SeedRequest) -> Response:
        """The seed's endpoint: answer a question with the default program."""
        g.timeout_secs = data.timeout_secs
        result = await predict("default", {"question": data.question})
        outputs = result.outputs
        answer = outputs["answer"] if "answer" in outputs else next(iter(outputs.values()), None)
        return _json(
            {
                "answer": answer,
                "duration_ms": round(result.timings.total * 1000, 3),
                "request_id": result.request_id,
            }
        )

    async def seed_stream(data: SeedRequest) -> Response:
        g.timeout_secs = data.timeout_secs
        return stream_response("default", {"question": data.question}, seed=True)

    app.post("/predict/stream")(validate_request(SeedRequest)(seed_stream))
    app.add_url_rule("/stream", "stream", validate_request(SeedRequest)(seed_stream), methods=["POST"])

    @app.get("/v1/programs")
    async def programs() -> Response:
        """Every served program with its input and output fields."""
        engine = state.require_engine()
        return _json(
            {
                "programs": [
                    {
                        "name": info.name,
                        "kind": info.kind,
                        "lm": info.lm,
                        "inputs": [
                            {"name": f.name, "type": f.type, "required": f.required} for f in info.inputs
                        ],
                        "outputs": list(info.outputs),
                    }
                    for info in engine.programs()
                ]
            }
        )

    @app.post("/v1/programs/<name>/predict")
    @validate_request(ProgramRequest)
    async def program_predict(name: str, data: ProgramRequest) -> Response:
        g.timeout_secs = data.timeout_secs
        return _json(result_json(await predict(name, data.inputs)))

    @app.post("/v1/programs/<name>/stream")
    @validate_request(ProgramRequest)
    async def program_stream(name: str, data: ProgramRequest) -> Response:
        g.timeout_secs = data.timeout_secs
        return stream_response(name, data.inputs, seed=False)

    @app.post("/v1/programs/<name>/batch")
    @validate_request(BatchRequest)
    async def program_batch(name: str, data: BatchRequest) -> Response:
        """Every item's outcome: JSON in input order, or as they complete over SSE or NDJSON
        (``Accept: text/event-stream`` or ``application/x-ndjson``)."""
        engine = state.require_engine()
        g.timeout_secs = data.timeout_secs
        if len(data.items) > settings.max_batch_items:
            raise HTTPError(
                413,
                f"at most {settings.max_batch_items} items per batch",
                type="invalid_request_error",
                code="batch_too_large",
            )
        check_inputs({"items": data.items})
        known = [info.name for info in engine.programs()]
        if name not in known:  # the batch's own error; bad items get an outcome each instead
            raise UnknownProgramError(name, known)
        until = deadline()
        concurrency = min(data.concurrency, settings.max_batch_concurrency)

        request_id = g.request_id  # the body runs after the handler, outside the request context

        def open_batch() -> Any:
            return engine.batch_stream(
                name, data.items, concurrency=concurrency, fail_fast=data.fail_fast, request_id=request_id
            )

        accept = request.accept_mimetypes.best_match(
            ["application/json", "text/event-stream", "application/x-ndjson"]
        )
        if accept in ("text/event-stream", "application/x-ndjson"):
            body = batch_body(
                open_batch,
                deadline=until,
                keepalive=settings.sse_keepalive,
                ndjson=accept != "text/event-stream",
            )
            response = Response(
                body,
                status=200,
                headers=SSE_HEADERS
                if accept == "text/event-stream"
                else {"Content-Type": "application/x-ndjson"},
            )
            response.timeout = None
            return response
        outcomes: list[dict[str, Any] | None] = [None] * len(data.items)
        with trio.move_on_at(until):
            async with open_batch() as stream:
                async for item in stream:
                    outcomes[item.index] = batch_item_json(item)
        late = DeadlineExceededError("the batch ran past its timeout")
        return _json(
            {"results": [o or batch_item_json(BatchItem(i, error=late)) for i, o in enumerate(outcomes)]}
        )

    @app.delete("/v1/requests/<request_id>")
    async def cancel_request(request_id: str) -> Response:
        """Cancel an in-flight request by its ``X-Request-ID``, from any connection (and, with a cluster,
        from any worker or replica)."""
        if not await state.require_engine().cancel_anywhere(request_id):
            raise HTTPError(
                404, f"no request {request_id!r} is in flight", type="not_found_error", code="unknown_request"
            )
        return _json({"cancelled": request_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text, or the seed's JSON fields with ``Accept: application/json``."""
        engine = state.require_engine()
        directory = workers_dir()  # several workers: the whole instance
        if request.accept_mimetypes.best_match(["text/plain", "application/json"]) == "application/json":
            if directory is not None:
                return _json(instance_metrics_json(directory, engine))
            return _json(metrics_json(engine.statistics()))
        if directory is not None:
            body, content_type = instance_metrics_text(directory, engine)
        else:
            body, content_type = metrics_text(engine)
        return Response(body, content_type=content_type)

    from .websockets import register_websockets

    register_websockets(app, state)
    return app
