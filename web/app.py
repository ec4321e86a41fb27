"""The Quart-Trio application: the route table's handlers, each called with its call; errors as JSON.

::

    app = create_app(settings)      # a ServiceApp: app.service is its Service, its ASGI entry the front door

- Every request enters through the front door (:mod:`dspy_trio.web.door`), which builds its
  :class:`dspy_trio.web.call.Call` before Quart runs; :class:`ServiceApp` passes that call to the handler
  as an argument (``handler(service, call, **path_parameters)``). There are no before- or after-request
  hooks, and nothing about a request lives in ``quart.g``.
- The routes are the route table's (:data:`dspy_trio.web.routes.ROUTES`), registered here, one rule per
  row; Quart serves the static files and quart-schema ``/openapi.json`` and ``/docs``, rows of the table
  too.
- A refusal the door handed over (a 401 or 429 while CORS is configured) is raised before routing, so it
  comes before a 404 or 405, as the door's own refusals do.
- Every error becomes one JSON answer in OpenAI's shape (:func:`answer_error`; the engine's errors through
  :mod:`dspy_trio.web.errors`), never a stack trace; a refusal by the web layer is noted on the call for
  the door's log line.
- CORS by quart-cors (off unless ``cors_origins`` is set); the OpenAPI document by quart-schema
  (:mod:`dspy_trio.web.openapi`).
- The app's start-up opens the engine and its shutdown closes it (:class:`dspy_trio.web.service.Service`);
  :func:`dspy_trio.web.server.serve` drains it before Hypercorn closes connections.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, has_request_context, request, websocket
from quart.ctx import RequestContext, WebsocketContext
from quart.globals import request_ctx, websocket_ctx
from quart.typing import ResponseReturnValue
from quart_cors import cors
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, NotFound

from dspy_trio.engine.lm import TrioLM

from .call import Call
from .door import FrontDoor, call_in
from .errors import error_answer, error_body
from .http import json_response
from .openapi import SWAGGER_CSS_URL, SWAGGER_JS_URL, ServiceOpenAPI
from .routes import ROUTES
from .routing import Route, RouteTable
from .service import Service
from .settings import ServiceSettings

logger = logging.getLogger("dspy_trio.web")

_STATIC = Path(__file__).parent / "static"
_CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout", "Cache-Control"]
_CORS_EXPOSE = ["X-Request-ID", "X-Server-Request-ID", "Server-Timing", "Retry-After", "Cache-Status"]
_CORS_METHODS = ["GET", "POST", "DELETE", "OPTIONS"]


def answer_error(call: Call, error: Exception, settings: ServiceSettings, method: str, path: str) -> Response:
    """The JSON answer to an error raised while answering ``call``
    (:func:`dspy_trio.web.errors.error_answer`).

    Raises:
        Exception: ``error`` itself when it is not one the service answers (a redirect of the router,
            a bug): Quart handles it (a bug becomes a logged 500 with a JSON body).
    """
    status, body, headers = error_answer(call, error, settings, method, path)
    return json_response(body, status, headers)


class ServiceApp(QuartTrio):
    """Quart-Trio that enters through the front door and hands each handler its call.

    Args:
        service: The service the app serves (its route table, settings, engine).
    """

    def __init__(self, service: Service) -> None:
        super().__init__(__name__, static_folder=str(_STATIC), static_url_path="/static")
        self.service = service
        self.door = FrontDoor(super().asgi_app, service)
        self._handlers: dict[str, Route] = {}
        for route in service.routes:
            if route.handler is None:
                continue  # served by Quart (static files) or quart-schema (/docs, /openapi.json)
            self._handlers[route.endpoint] = route
            if route.websocket:
                self.add_websocket(route.quart_rule, route.endpoint, route.handler)
            else:
                self.add_url_rule(
                    route.quart_rule, route.endpoint, route.handler, methods=sorted(route.methods)
                )

    async def asgi_app(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        """Every request enters through the front door (which then calls Quart's own ``asgi_app``)."""
        await self.door(scope, receive, send)

    async def dispatch_request(self, request_context: RequestContext | None = None) -> ResponseReturnValue:
        request_ = (request_context or request_ctx).request
        call = call_in(request_.scope)
        try:
            if call.refusal is not None:
                raise call.refusal
            if request_.routing_exception is not None:
                raise request_.routing_exception
            rule = request_.url_rule
            assert rule is not None
            if request_.method == "OPTIONS" and rule.provide_automatic_options:
                return await self.make_default_options_response()
            view: Any = self.view_functions[rule.endpoint]
            parameters = request_.view_args or {}
            if rule.endpoint in self._handlers:
                if call.route is not self._handlers[rule.endpoint]:
                    # werkzeug matched a path the door did not (it strips leading slashes): the call
                    # has no route, no program, no overload check. The door's routing decides.
                    raise NotFound()
                answer: ResponseReturnValue = await view(self.service, call, **parameters)
                return answer
            answer = await self.ensure_async(view)(**parameters)
            return answer
        except Exception as error:
            return answer_error(call, error, self.service.settings, request_.method, request_.path)

    async def dispatch_websocket(
        self, websocket_context: WebsocketContext | None = None
    ) -> ResponseReturnValue | None:
        websocket_ = (websocket_context or websocket_ctx).websocket
        call = call_in(websocket_.scope)
        try:
            if call.refusal is not None:
                raise call.refusal
            if websocket_.routing_exception is not None:
                raise websocket_.routing_exception
            rule = websocket_.url_rule
            assert rule is not None
            view: Any = self.view_functions[rule.endpoint]
            await view(self.service, call, **(websocket_.view_args or {}))
            return None
        except Exception as error:
            return answer_error(call, error, self.service.settings, "GET", websocket_.path)


def create_app(
    settings: ServiceSettings | None = None,
    *,
    lms: Mapping[str, TrioLM] | None = None,
    routes: Sequence[Route] | None = None,
) -> ServiceApp:
    """Build the application. The engine opens when serving starts and closes when it ends.

    Args:
        settings: Service and engine settings; ``ServiceSettings.from_env()`` when omitted.
        lms: LM instances to use instead of those in the engine config (tests, embedding).
        routes: The route table; the service's (:data:`dspy_trio.web.routes.ROUTES`) when omitted.
    """
    settings = settings or ServiceSettings.from_env()
    service = Service(settings, RouteTable(ROUTES if routes is None else routes), lms)
    app = ServiceApp(service)
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
    app.extensions["dspy_trio"] = service

    @app.before_serving
    async def start_engine() -> None:
        await service.start(app.nursery)

    @app.after_serving
    async def stop_engine() -> None:
        await service.stop()

    if settings.cors_origins:
        cors(
            app,
            allow_origin=list(settings.cors_origins),
            allow_methods=_CORS_METHODS,
            allow_headers=_CORS_HEADERS,
            expose_headers=_CORS_EXPOSE,
            max_age=600,
        )

    @app.errorhandler(HTTPException)
    async def on_http_exception(error: HTTPException) -> Response:
        """An HTTP error raised outside a handler (by an extension's hook), answered as the handlers' are."""
        connection = request if has_request_context() else websocket
        method = request.method if has_request_context() else "GET"
        return answer_error(call_in(connection.scope), error, settings, method, connection.path)

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        if has_request_context():
            logger.exception("unhandled error in %s %s", request.method, request.path)
        else:  # a WebSocket handler
            logger.exception("unhandled error in WebSocket %s", websocket.path)
        return json_response(error_body("internal error", type="server_error", code="internal_error"), 500)

    return app


__all__ = ["ServiceApp", "answer_error", "create_app"]
