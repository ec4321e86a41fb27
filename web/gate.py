"""Refusing an overload below the framework: a 429 answered in ASGI, before Quart sees the request.

When the engine is saturated, refusals must stay cheap and fast, or they queue behind the very work
they refuse. ``refuse_when_overloaded`` (web/app.py) already refuses before the body is
parsed, but a refusal there still pays for Quart's request and app contexts, werkzeug's routing, the
before/after-request hooks and the error handlers: about as much CPU as a whole bare Quart-Trio JSON
request. This wrapper answers the same 429 directly in ASGI for the requests where nothing else can
differ, and hands everything else to the app unchanged:

- only ``POST`` to a prediction or stream route (``/predict``, ``/predict/stream``, ``/stream`` for the
  default program; ``/v1/programs/NAME/predict`` and ``/v1/programs/NAME/stream``); batches are
  admitted item by item;
- only while the engine is serving and saturated (:meth:`dspy_trio.engine.Engine.refuse_if_overloaded`, which
  also counts the refusal, exactly as the hook does; an unknown program is left to the app's 404);
- never a request that would get a 401 first (API keys) or that needs CORS headers (an ``Origin`` while
  CORS is configured): the app answers those as before.

The answer is the app's, byte for byte where it matters: status 429, ``Retry-After``, the JSON error
body in OpenAI's shape (code ``overloaded``), a fresh ``X-Server-Request-ID``, ``X-Request-ID`` (the
client's label when valid, else the server's id) and ``Server-Timing: total``. The request body is read
(not parsed) before answering, so the keep-alive connection is reused as after any early answer
(:mod:`dspy_trio.web.keepalive`, which wraps this gate).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from dspy_trio.engine import OverloadedError

from .auth import authorize
from .encoding import dumps
from .errors import HTTPError, engine_error_response
from .keepalive import body_headers
from .state import ServiceState

_DEFAULT_PROGRAM_PATHS = frozenset({"/predict", "/predict/stream", "/stream"})
_PROGRAM_PATH = re.compile(r"/v1/programs/([^/]+)/(?:predict|stream)")  # fullmatch: "$" allows a "\n"
_LABEL = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # fullmatch


class _ScopeHeaders:
    """An ASGI scope's request headers, case-insensitive, as :func:`dspy_trio.web.auth.authorize` reads
    them."""

    def __init__(self, raw: Any) -> None:
        self._headers: dict[str, str] = {}
        for name, value in raw:  # a repeated header: its first value, as werkzeug's Headers.get reads it
            self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def get(self, key: str) -> str | None:
        return self._headers.get(key.lower())

    def __contains__(self, key: str, /) -> bool:
        return key.lower() in self._headers


class OverloadGate:
    """Wrap the app so that an overloaded prediction or stream is refused before the framework runs.

    Args:
        app: The Quart-Trio app (it still answers every request this gate lets through).
        state: The service's state (settings, and the engine while serving).
    """

    def __init__(self, app: ASGIFramework, state: ServiceState) -> None:
        self.app = app
        self.state = state

    def _program(self, scope: Scope) -> str | None:
        """The program a request would run if it is a prediction or stream; else None."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if path in _DEFAULT_PROGRAM_PATHS:
            return "default"
        if path.startswith("/v1/programs/") and (match := _PROGRAM_PATH.fullmatch(path)):
            return match.group(1)
        return None

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        program = self._program(scope)
        engine = self.state.engine
        if program is None or engine is None or self.state.draining or self._app_answers_first(scope):
            await self.app(scope, receive, send)
            return
        arrived = trio.current_time()
        try:
            engine.refuse_if_overloaded(program)  # counts the refusal, as the app's hook would
        except OverloadedError as error:
            await self._refuse(scope, receive, send, error, arrived)
            return
        await self.app(scope, receive, send)

    def _app_answers_first(self, scope: Any) -> bool:
        """Whether the app must answer this request itself: a 401 comes first, or CORS is configured
        (then the app's own hook refuses it, after those)."""
        settings = self.state.settings
        if settings.cors_origins:  # quart-cors shapes every answer (Vary: Origin even with no Origin)
            return True
        if not settings.api_keys:
            return False
        headers = _ScopeHeaders(scope["headers"])
        try:
            authorize(settings, method="POST", path=scope["path"], headers=headers)
        except HTTPError:
            return True
        return False

    async def _refuse(
        self,
        scope: Any,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        error: OverloadedError,
        arrived: float,
    ) -> None:
        # As the app's Server-Timing: the time to the answer, not the wait for the body below.
        total = (trio.current_time() - arrived) * 1000
        # Read (never parse) the body first, so the connection can serve the next request; a body
        # declared too large, larger than the limit or not all there within the keep-alive timeout gets
        # "Connection: close" instead (and KeepAliveGuard then waits no more).
        limit = self.state.settings.max_body_bytes
        declared, has_body = body_headers(scope)
        complete = not has_body
        if has_body and (declared is None or declared <= limit):
            received = 0
            with trio.move_on_after(self.state.settings.keep_alive_timeout):
                while True:
                    message: Any = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    received += len(message.get("body", b""))
                    if received > limit:
                        break
                    if not message.get("more_body", False):
                        complete = True
                        break
        status, body, extra = engine_error_response(error)
        payload = dumps(body).encode()
        request_id = uuid.uuid4().hex
        label = next((value for name, value in scope["headers"] if name.lower() == b"x-request-id"), b"")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in extra.items()),
            (b"x-server-request-id", request_id.encode()),
            (b"x-request-id", label if _LABEL.fullmatch(label) else request_id.encode()),
            (b"server-timing", f"total;dur={total:.3f}".encode()),
        ]
        if not complete:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers, "trailers": False})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


__all__ = ["OverloadGate"]
