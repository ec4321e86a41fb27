"""The MCP endpoint (``/mcp``): each served program is a tool, over the official SDK's Streamable HTTP.

::

    endpoint = MCPEndpoint(service)          # the Service builds it; its start-up runs it
    await nursery.start(endpoint.run)        # the SDK's session manager, until endpoint.stop()
    await endpoint(call, scope, receive, send)   # the door hands it /mcp (raw ASGI)

The transport is the ``mcp`` SDK's (``StreamableHTTPSessionManager``, anyio: it runs on Trio), both
protocol eras: the current revision's single-exchange requests (``server/discover``, every request on its
own, a client cancels by closing the response stream) and the handshake era's sessions (``initialize``,
``Mcp-Session-Id``, ``notifications/cancelled``). This module adds what the service needs around it:

- **Tools**: ``tools/list`` lists every program (its name; its signature's docstring as the description;
  ``inputSchema`` and ``outputSchema`` from its fields); ``tools/call`` runs it through the engine under
  the call the front door built for the POST (its server id, so ``DELETE /v1/requests/{id}`` cancels it;
  its owner; its deadline, ``X-Request-Timeout`` or the default). The result is the outputs' text (one
  output's text, else their JSON object) and ``structuredContent`` (the object). A failure is a tool
  error (``isError``) naming its code; an unknown tool is a protocol error.
- **Progress**: when the call asks for it (a ``progressToken``), ``notifications/progress`` when the
  program gets its slot, then one per text delta of its output (``progress`` counts them, ``message`` is
  the text).
- **Cancel**: a ``notifications/cancelled`` (handshake era) or a closed response stream (current era)
  cancels the prediction and closes its upstream connection.
- **Keys and limits**: the door checks the Bearer key (the route needs one); a session belongs to the key
  that opened it (the SDK refuses it to another, as a 404), and one key holds at most
  ``MAX_SESSIONS_PER_KEY`` of them (then its ``initialize`` is a 429 ``too_many_sessions``). The body is
  read here within the body size limit, the JSON nesting limit and the request's deadline, as every
  other route's (400, 408, 413), and a browser's ``Origin`` must be the server's own or a configured
  CORS origin (403), and a POST must be sent as ``Content-Type: application/json`` (415) and accept JSON
  and SSE (406), refused in the service's JSON shape (the SDK answers them in plain text or with no
  body). ``GET`` (a stream for server-initiated messages, which this server never sends) answers 405,
  as the transport allows.
- **Life**: the sessions live in the service's nursery; a drain closes them after the engine's in-flight
  calls ended. With several workers (``--workers``) a handshake-era session would live in one process
  only, so the handshake era is served without sessions there (no ``notifications/cancelled``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import mcp_types as types
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from dspy_trio.engine import (
    EngineError,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    PredictionResult,
    ProgramInfo,
    StatusEvent,
)

from .auth import origin_refusal
from .body import read_body
from .call import Call
from .chat import chat_content
from .deadline import RequestDeadline
from .door import call_in
from .encoding import dumps
from .errors import HTTPError, http_error_response
from .formats import Outcome
from .keepalive import drain_body
from .limits import check_content_encoding, check_inputs, json_depth
from .runner import run
from .service import not_ready

if TYPE_CHECKING:
    from .service import Service

logger = logging.getLogger("dspy_trio.web.mcp")

_NAME = "dspy-trio"
_VERSION = "0.1.0"
# Handshake-era sessions: how many at once, and how long one may sit idle before it is closed.
MAX_SESSIONS = 1024
SESSION_IDLE_TIMEOUT = 600.0
# How many of them one API key may hold, so that a key that opens sessions and never ends them cannot
# take every place from the others (without keys every client is one: only MAX_SESSIONS bounds them).
MAX_SESSIONS_PER_KEY = 32


class MCPEndpoint:
    """The MCP server of one service: its tools are the engine's programs.

    Args:
        service: The service (settings, engine, life).
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.server: Server[Any] = Server(
            _NAME,
            version=_VERSION,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        settings = service.settings
        self.manager = StreamableHTTPSessionManager(
            self.server,
            stateless=settings.workers > 1,
            # The service checks Host (DNS rebinding) and Origin itself, for every route alike.
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            session_idle_timeout=SESSION_IDLE_TIMEOUT,
            max_request_body_size=settings.max_body_bytes,
            max_sessions=MAX_SESSIONS,
        )
        self._max_sessions_per_key = MAX_SESSIONS_PER_KEY
        self._stop = trio.Event()
        self._running = False

    # -- life --------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the SDK's session manager until :meth:`stop` (its sessions live in this task's scope)."""
        async with self.manager.run():
            self._running = True
            task_status.started()
            try:
                await self._stop.wait()
            finally:
                self._running = False

    def stop(self) -> None:
        """Close every session (their server tasks end). Returns at once."""
        self._stop.set()

    # -- the route ---------------------------------------------------------------------------------------

    async def __call__(
        self, call: Call, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Answer one request to ``/mcp``. Blocks for the whole exchange (a tool call included)."""
        service = self.service
        try:
            if not self._running or service.draining:
                raise not_ready()
            method = scope.get("method", "GET")
            if method not in ("POST", "DELETE"):
                raise HTTPError(
                    405,
                    f"method not allowed: {method} /mcp (POST a JSON-RPC message; DELETE ends a session)",
                    type="invalid_request_error",
                    code="method_not_allowed",
                    headers={"Allow": "POST, DELETE"},
                )
            raw: Any = scope.get("headers", ())
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
            if (refusal := origin_refusal(service.settings, headers)) is not None:
                raise refusal
            if method == "POST":
                _check_post_headers(headers)
        except HTTPError as error:  # refused before its body was read: read it, so the connection serves on
            call.notes.refused = error.code
            settings = self.service.settings
            read = await drain_body(
                scope, receive, max_bytes=settings.max_body_bytes, max_wait=settings.keep_alive_timeout
            )
            if read is not None:
                await answer_refusal(send, error, close=not read)
            return
        try:
            body = await self._read_body(call, scope, receive)
        except HTTPError as error:
            call.notes.refused = error.code
            await answer_refusal(send, error, close=error.status != 400)  # the rest of a body is unread
            return
        if body is None:
            return  # the client left
        principal = _principal(call.owner)
        if call.owner and "mcp-session-id" not in headers and _opens_session(body):
            held = self._sessions_of(principal)
            if held >= self._max_sessions_per_key:
                call.notes.refused = "too_many_sessions"
                await answer_refusal(
                    send,
                    HTTPError(
                        429,
                        f"this API key has {held} open MCP sessions, the most one key may hold: end one "
                        "(DELETE /mcp with its Mcp-Session-Id) or let one idle out",
                        type="rate_limit_error",
                        code="too_many_sessions",
                        headers={"Retry-After": str(int(SESSION_IDLE_TIMEOUT))},
                    ),
                )
                return
        scope["user"] = principal  # type: ignore[typeddict-unknown-key]  # the SDK reads it
        replayed = False

        async def replay() -> ASGIReceiveEvent:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.manager.handle_request(scope, replay, send)  # type: ignore[arg-type]

    def _sessions_of(self, principal: AuthenticatedUser) -> int:
        """How many handshake-era sessions ``principal`` holds (the SDK's own record of their owners)."""
        owner = authorization_context(principal)
        owners: dict[str, Any] = getattr(self.manager, "_session_owners", {})
        return sum(1 for held in owners.values() if held == owner)

    async def _read_body(self, call: Call, scope: Scope, receive: ASGIReceiveCallable) -> bytes | None:
        """The request body within the size limit and the head's deadline, and JSON no deeper than the
        limit (None if the client left).

        Raises:
            HTTPError: 413 ``body_too_large``; 408 ``body_timeout``; 400 ``too_deeply_nested``.
        """
        settings = self.service.settings
        head = RequestDeadline.of_head(settings, arrived=call.arrived, header=call.timeout_header)
        body = await read_body(scope, receive, settings, head)
        if body is not None and json_depth(body, settings.max_json_depth) > settings.max_json_depth:
            raise HTTPError(
                400,
                f"the JSON is nested deeper than {settings.max_json_depth} levels",
                type="invalid_request_error",
                code="too_deeply_nested",
            )
        return body

    # -- the tools ---------------------------------------------------------------------------------------

    async def _list_tools(self, ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
        engine = self.service.require_engine()
        return types.ListToolsResult(tools=[_tool(info) for info in engine.programs()])

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        service = self.service
        engine = service.require_engine()
        info = next((info for info in engine.programs() if info.name == params.name), None)
        if info is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name[:256]!r}")
        request = ctx.request
        call = call_in(request.scope) if request is not None else None
        if call is None:  # pragma: no cover - the SDK hands every HTTP message its request
            raise MCPError(types.INTERNAL_ERROR, "the call has no HTTP request")
        inputs = dict(params.arguments or {})
        try:
            check_inputs(inputs, max_chars=service.settings.max_input_chars)
            until = call.deadline(service.settings)
        except HTTPError as error:
            return _tool_error(error.code, error.message)
        wants_progress = bool(ctx.meta and ctx.meta.get("progress_token") is not None)
        outcome: list[PredictionResult | EngineError] = []
        progress = 0

        async def emit(event: Outcome) -> None:
            nonlocal progress
            match event:
                case StatusEvent():
                    await ctx.session.report_progress(progress, message=event.stage)
                case FieldDelta():
                    if event.predictor == info.predictor:
                        progress += 1
                        await ctx.session.report_progress(progress, message=event.text)
                case FinalEvent():
                    outcome.append(event.result)
                case PredictionResult():
                    outcome.append(event)
                case ErrorEvent():
                    outcome.append(event.error)

        await run(engine, call, until, info.name, inputs, stream=wants_progress, emit=emit)
        [last] = outcome
        if isinstance(last, EngineError):
            return _tool_error(last.code, last.message)
        call.notes.timings = last.timings
        outputs = dict(last.outputs)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=chat_content(outputs, len(outputs) != 1))],
            structured_content=_jsonable(outputs),
            is_error=False,
        )


def _check_post_headers(headers: dict[str, str]) -> None:
    """Refuse, in the service's JSON shape, the POSTs the SDK would answer with a body that is not JSON:
    one not sent as JSON (the SDK: a plain-text 400), one that does not accept both JSON and SSE, the two
    forms its answer may take (the SDK's current revision: a 406 with no body).

    Raises:
        HTTPError: 415 ``unsupported_media_type`` or ``unsupported_content_encoding``; 406
            ``not_acceptable``.
    """
    if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPError(
            415,
            "send the JSON-RPC message as JSON with Content-Type: application/json",
            type="invalid_request_error",
            code="unsupported_media_type",
        )
    check_content_encoding(headers.get("content-encoding"))
    accepted = {part.split(";")[0].strip().lower() for part in headers.get("accept", "").split(",")}
    json = bool(accepted & {"*/*", "application/*", "application/json"})
    sse = bool(accepted & {"*/*", "text/*", "text/event-stream"})
    if not (json and sse):
        raise HTTPError(
            406,
            "accept both application/json and text/event-stream (Accept): the answer is one or the other",
            type="invalid_request_error",
            code="not_acceptable",
        )


def _tool(info: ProgramInfo) -> types.Tool:
    return types.Tool(
        name=info.name,
        description=info.description or None,
        input_schema=info.input_schema(),
        output_schema=info.output_schema(),
    )


def _tool_error(code: str, message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=f"{code}: {message}")], is_error=True
    )


def _jsonable(outputs: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(dumps(outputs))
    return value


def _opens_session(body: bytes) -> bool:
    """Whether a request without a session id would open one: an ``initialize`` (the SDK refuses any
    other request without a session id)."""
    if b'"initialize"' not in body:
        return False  # most requests: no parse
    try:
        message = json.loads(body)
    except ValueError:
        return False  # the SDK answers it
    return isinstance(message, dict) and message.get("method") == "initialize"


def _principal(owner: str) -> AuthenticatedUser:
    """The SDK's principal for an API key: a session belongs to the key that opened it (a digest of the
    key, never the key)."""
    digest = hashlib.sha256(owner.encode()).hexdigest() if owner else "anyone"
    return AuthenticatedUser(AccessToken(token="", client_id=digest, scopes=[]))


async def answer_refusal(send: ASGISendCallable, error: HTTPError, *, close: bool = False) -> None:
    """A refusal of the endpoint itself, in the service's JSON error shape (``close``: the connection
    cannot serve another request, its body was not all read)."""
    status, body, extra = http_error_response(error)
    payload = dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in extra.items()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers, "trailers": False})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


__all__ = ["MAX_SESSIONS", "MAX_SESSIONS_PER_KEY", "SESSION_IDLE_TIMEOUT", "MCPEndpoint", "answer_refusal"]
