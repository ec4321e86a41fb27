"""The front door: every HTTP request and WebSocket enters here, below the framework, and becomes one call.

::

    app.asgi_app = FrontDoor(app.asgi_app, service)   # dspy_trio.web.app.create_app does this

For each request the door, in ASGI, before Quart runs:

1. finds the route (:meth:`dspy_trio.web.routing.RouteTable.match`) and the program it runs;
2. authorizes it (:func:`dspy_trio.web.auth.authorize`: its key becomes the call's owner, and the key's
   tenant the call's tenant);
3. refuses an overload on a route that runs a program (:meth:`dspy_trio.engine.Engine.refuse_if_overloaded`,
   which counts the refusal), when the engine is serving; a batch is admitted item by item instead;
4. builds the :class:`dspy_trio.web.call.Call` (a fresh server id, the client's label, the owner, the
   head's arrival) and hands it to the app in the ASGI scope (``scope["dspy_trio.call"]``), where the app
   passes it to the handler as an argument;
5. hands a route whose handler speaks ASGI itself (``/mcp``) its call and the request, without Quart,
   and so a route's ``lean`` handler (the JSON predictions, :mod:`dspy_trio.web.lean`) unless CORS is
   configured; any other to the app;
6. writes the call's response headers, ``X-Server-Request-ID``, ``X-Request-ID`` (the client's label when
   valid, else the server's id) and ``Server-Timing``, on whatever answer starts: the app's, its own, a
   WebSocket handshake's (accepted or refused); and one log line for a refusal by the web layer.

A refusal (401, 403, 429) is answered here directly, without Quart's request and app contexts, routing,
error handlers (it costs about a third of an answered request): the same status, JSON body and headers
the app would send. With CORS configured the app answers it instead (quart-cors shapes every answer),
from the call's ``refusal``. Before answering, the door reads (never parses) the request body, so the
keep-alive connection can serve the next request (:mod:`dspy_trio.web.keepalive`, which wraps the door);
a body declared too large, larger than the limit, or not all there within the keep-alive timeout gets
``Connection: close`` instead.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from dspy_trio.engine import EngineError, OverloadedError

from .auth import authorize
from .cache_control import cache_switches
from .call import Call, label_of, new_request_id
from .encoding import dumps
from .errors import HTTPError, engine_error_response, http_error_response
from .keepalive import drain_body
from .routing import Route
from .service import Service

CALL = "dspy_trio.call"  # the key of the call in the ASGI scope

access_log = logging.getLogger("dspy_trio.web.requests")

# The request headers the door reads; the others are left to the framework (and never decoded here).
_READ = frozenset(
    {
        b"x-request-id",
        b"x-request-timeout",
        b"authorization",
        b"origin",
        b"host",
        b"access-control-request-method",
        b"cache-control",
    }
)
_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})
_NO_PARAMETERS: dict[str, str] = {}


def _head(raw: Any) -> dict[str, str]:
    """The headers the door reads, by lower-case name; of a repeated header, its first value (as
    werkzeug's ``Headers.get`` reads it, so the door and the app never disagree)."""
    head: dict[str, str] = {}
    for name, value in raw:
        key = name.lower()
        if key in _READ:
            head.setdefault(key.decode("latin-1"), value.decode("latin-1"))
    return head


def _query(scope: Any) -> dict[str, str]:
    """A WebSocket's query arguments (``?api_key=``), the first value of each."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        query.setdefault(name, value)
    return query


def _wrong_transport(route: Route, websocket: bool, sockets: str) -> HTTPError:
    """The refusal of a WebSocket handshake to an HTTP route (``sockets``: the WebSocket routes), or of a
    plain request to a WebSocket route."""
    if websocket:
        return HTTPError(
            400,
            f"{route.template} is not a WebSocket endpoint (the WebSocket endpoints: {sockets})",
            type="invalid_request_error",
            code="not_a_websocket_endpoint",
        )
    return HTTPError(
        426,
        f"{route.template} is a WebSocket endpoint: open it with a WebSocket handshake (Upgrade: websocket)",
        type="invalid_request_error",
        code="websocket_required",
        headers={"Upgrade": "websocket"},
    )


def call_in(scope: Any) -> Call:
    """The call the door built for the request whose ASGI scope this is (Quart's ``request.scope``)."""
    call: Call = scope[CALL]
    return call


def call_headers(call: Call, now: float) -> list[tuple[bytes, bytes]]:
    """The headers every answer of ``call`` carries: its ids and ``Server-Timing`` (the time from the
    head's arrival to ``now``, and the engine's queue and LM times when a prediction ran), and a
    prediction's ``Cache-Status``."""
    server_id = call.request_id.encode()
    timing = f"total;dur={(now - call.arrived) * 1000:.3f}"
    if (timings := call.notes.timings) is not None:
        timing += f", queue;dur={timings.queued * 1000:.3f}, lm;dur={timings.lm * 1000:.3f}"
        if call.notes.lms:  # the LMs that answered (a fallback's name when the first one failed)
            timing += f";desc={_quoted(' '.join(call.notes.lms))}"
    headers = [
        (b"x-server-request-id", server_id),
        (b"x-request-id", call.label.encode() if call.label is not None else server_id),
        (b"server-timing", timing.encode()),
    ]
    if call.notes.cache_status is not None:
        headers.append((b"cache-status", call.notes.cache_status.encode()))
    return headers


def _quoted(text: str) -> str:
    """``text`` as an HTTP quoted-string (RFC 9110): printable ASCII only, ``"`` and ``\\`` escaped.
    (An LM's name is a TOML key, which may hold anything, a newline included.)"""
    kept = "".join(c for c in text if " " <= c <= "~")
    return '"' + kept.replace("\\", "\\\\").replace('"', '\\"') + '"'


def refusal_answer(error: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers of a refusal the door makes (an auth or overload error)."""
    if isinstance(error, EngineError):
        return engine_error_response(error)
    assert isinstance(error, HTTPError), error
    return http_error_response(error)


class FrontDoor:
    """Wrap the app (its ``asgi_app``) so that every request is one call, built here.

    Args:
        app: The framework's ASGI callable (Quart's ``asgi_app``).
        service: The service (settings, route table, engine).
    """

    # Whether the door answers its refusals itself; otherwise (and always with CORS configured) it
    # hands them to the app in the call. Tests compare the two answers.
    answers_refusals: ClassVar[bool] = True
    # Whether a route with a ``lean`` handler is answered by it (below Quart); otherwise by the app.
    # Tests compare the two answers.
    answers_below_quart: ClassVar[bool] = True

    def __init__(self, app: ASGIFramework, service: Service) -> None:
        self.app = app
        self.service = service
        self._sockets = ", ".join(route.template for route in service.routes if route.websocket)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)  # the lifespan
            return
        call = self.call_of(scope)
        if call.refusal is not None and self.answers_refusals and not self._app_shapes(scope):
            await self._refuse(call, scope, receive, send, call.refusal)
            return
        scope[CALL] = call  # type: ignore[literal-required]  # ASGI scopes are open to extensions

        async def send_answer(message: Any) -> None:
            if message["type"] in _STARTS:
                self._started(call, scope, message)
            await send(message)

        route = call.route
        if route is not None and kind == "http":
            if route.asgi and route.handler is not None:
                await route.handler(self.service, call, scope, receive, send_answer)
                return
            if (
                route.lean is not None
                and self.answers_below_quart
                and call.refusal is None
                and scope.get("method") in route.methods
                and not self._app_shapes(scope)
            ):
                await route.lean(self.service, call, scope, receive, send_answer)
                return
        await self.app(scope, receive, send_answer)

    def call_of(self, scope: Any) -> Call:
        """The call a request's head makes: route, owner (or the refusal), program, ids, arrival."""
        arrived = trio.current_time()
        service = self.service
        websocket = scope["type"] == "websocket"
        method = "GET" if websocket else scope["method"]
        head = _head(scope["headers"])
        found = service.routes.match(scope["path"])
        route, parameters = found if found is not None else (None, _NO_PARAMETERS)
        program = route.program_of(parameters) if route is not None else None
        owner, tenant = "", None
        refusal: Exception | None = None
        try:
            owner, tenant = authorize(
                service.settings,
                route,
                method=method,
                headers=head,
                query=_query(scope) if websocket else None,
                websocket=websocket,
            )
        except HTTPError as error:
            # Kept without its traceback: the traceback holds this frame, whose ``refusal`` holds the
            # error, a cycle only the garbage collector frees (measured: +47 objects and ~0.06 ms of
            # collection per refusal).
            refusal = error.with_traceback(None)
        else:
            engine = service.engine
            if route is not None and route.websocket != websocket:
                refusal = _wrong_transport(route, websocket, self._sockets)
            elif (
                route is not None
                and program is not None
                and route.refused_at_the_door
                and method in route.methods
                and engine is not None
                and not service.draining
            ):
                try:
                    engine.refuse_if_overloaded(program, tenant=tenant)  # counts the refusal
                except OverloadedError as error:
                    refusal = error.with_traceback(None)  # as above
        no_cache, no_store = cache_switches(head.get("cache-control"))
        return Call(
            new_request_id(),
            label_of(head.get("x-request-id")),
            owner,
            arrived,
            route,
            program,
            head.get("x-request-timeout"),
            refusal,
            no_cache=no_cache,
            no_store=no_store,
            tenant=tenant,
        )

    def _app_shapes(self, scope: Any) -> bool:
        """Whether the app must answer a refusal itself: quart-cors adds its headers (``Vary: Origin``
        even without an Origin) to every HTTP answer once CORS is configured."""
        return scope["type"] == "http" and bool(self.service.settings.cors_origins)

    def _started(self, call: Call, scope: Any, message: Any) -> None:
        """An answer starts: add the call's headers; count it; log it if the web layer refused it."""
        message["headers"] = [*message.get("headers", ()), *call_headers(call, trio.current_time())]
        status = 101 if message["type"] == "websocket.accept" else message["status"]
        self._count(call, status)
        if call.notes.refused is not None and access_log.isEnabledFor(logging.INFO):
            self._log_refusal(call, scope, status)

    def _count(self, call: Call, status: int) -> None:
        route = call.route
        self.service.http_metrics.count(route.endpoint if route is not None else "unmatched", status)

    def _log_refusal(self, call: Call, scope: Any, status: int) -> None:
        """One JSON line, shaped like the engine's request lines, for a call the web layer refused
        before the engine saw it (401, 403, 404, 405, 413, 415, 422, ...)."""
        line = {
            "event": "request",
            "request_id": call.request_id,
            "label": call.label,
            "kind": scope["type"],
            "tenant": call.tenant,
            "method": scope.get("method", "GET"),
            "path": scope["path"],
            "status": status,
            "outcome": "rejected" if status in (401, 403) else "invalid",
            "error": call.notes.refused,
            "total_ms": round((trio.current_time() - call.arrived) * 1000, 3),
        }
        access_log.info(dumps(line))

    async def _refuse(
        self, call: Call, scope: Any, receive: ASGIReceiveCallable, send: ASGISendCallable, error: Exception
    ) -> None:
        """Answer the door's refusal itself, as the app would."""
        now = trio.current_time()  # Server-Timing: the time to the answer, not the wait for the body
        status, body, extra = refusal_answer(error)
        if isinstance(error, HTTPError):
            call.notes.refused = error.code
        payload = dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in extra.items()),
            *call_headers(call, now),
        ]
        self._count(call, status)
        if call.notes.refused is not None and access_log.isEnabledFor(logging.INFO):
            self._log_refusal(call, scope, status)
        if scope["type"] == "websocket":  # refused before the handshake is accepted: an HTTP answer
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": payload, "more_body": False})
            return
        settings = self.service.settings
        complete = await drain_body(
            scope, receive, max_bytes=settings.max_body_bytes, max_wait=settings.keep_alive_timeout
        )
        if complete is None:
            return  # the client left: nobody to answer
        if not complete:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers, "trailers": False})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


__all__ = ["CALL", "FrontDoor", "call_headers", "call_in"]
