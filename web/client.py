"""A Trio client for the service: HTTP and SSE over httpx, WebSocket over trio-websocket.

::

    async with open_client("http://127.0.0.1:8000", api_key="...") as client:
        answer = await client.predict("default", {"question": "What is Trio?"})
        async with client.stream("default", {"question": "..."}) as events:  # (name, payload) pairs
            async for name, payload in events: ...
        async with client.ws_ask("What is Trio?") as tokens:                # /ws: a question, tokens, [DONE]
            async for token in tokens: ...
        async with client.open_multiplexed() as ws:                          # /v1/ws, many requests at once
            result = await ws.predict("default", {"question": "a"})
            async with ws.stream("default", {"question": "b"}, id="b") as frames:
                async for frame in frames: ...

Errors come back as :class:`ServiceError` with the status and the server's error body.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url


class ServiceError(Exception):
    """The service answered with an error.

    Attributes:
        status: The HTTP status (0 for WebSocket frames).
        code: The error's code, e.g. ``overloaded``.
        body: The whole error object.
        retry_after: Seconds from ``Retry-After``, when sent.
    """

    def __init__(self, status: int, body: Mapping[str, Any], retry_after: float | None = None) -> None:
        error = body.get("error", body) if isinstance(body, Mapping) else {}
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status = status
        self.code = error.get("code")
        self.body = dict(body)
        self.retry_after = retry_after


def _raise_for(response: httpx.Response, body: Any) -> None:
    if response.status_code >= 400:
        retry = response.headers.get("Retry-After")
        raise ServiceError(
            response.status_code, body if isinstance(body, dict) else {}, float(retry) if retry else None
        )


async def _sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) pairs of an SSE body; comments (keep-alives) are skipped."""
    name, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", list[str]()
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))


class Client:
    """Talks to one dspy-trio service. Use :func:`open_client`."""

    def __init__(self, base_url: str, http: httpx.AsyncClient, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.api_key = api_key

    async def predict(
        self, program: str, inputs: Mapping[str, Any], *, timeout_secs: float | None = None
    ) -> dict[str, Any]:
        """``POST /v1/programs/{program}/predict``; blocks until the result."""
        body: dict[str, Any] = {"inputs": dict(inputs)}
        if timeout_secs is not None:
            body["timeout_secs"] = timeout_secs
        response = await self.http.post(f"/v1/programs/{program}/predict", json=body)
        payload = response.json()
        _raise_for(response, payload)
        return dict(payload)

    async def batch(
        self, program: str, items: list[Mapping[str, Any]], *, concurrency: int = 8, fail_fast: bool = False
    ) -> list[dict[str, Any]]:
        """``POST /v1/programs/{program}/batch``: one outcome per item, in input order."""
        body = {"items": [dict(item) for item in items], "concurrency": concurrency, "fail_fast": fail_fast}
        response = await self.http.post(f"/v1/programs/{program}/batch", json=body)
        payload = response.json()
        _raise_for(response, payload)
        return list(payload["results"])

    async def ask(self, question: str, *, timeout_secs: float | None = None) -> dict[str, Any]:
        """The plain ``POST /predict``: ``{"answer", "duration_ms"}``."""
        body: dict[str, Any] = {"question": question}
        if timeout_secs is not None:
            body["timeout_secs"] = timeout_secs
        response = await self.http.post("/predict", json=body)
        payload = response.json()
        _raise_for(response, payload)
        return dict(payload)

    @trio.as_safe_channel
    async def stream(
        self, program: str, inputs: Mapping[str, Any], *, timeout_secs: float | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """``POST /v1/programs/{program}/stream``:
        ``async with client.stream(...) as events: async for name, payload in events``; the last event is
        ``final`` or ``error``.

        The HTTP response lives in a task of its own; leaving the block closes the connection, which
        cancels the request on the server.
        """
        body: dict[str, Any] = {"inputs": dict(inputs)}
        if timeout_secs is not None:
            body["timeout_secs"] = timeout_secs
        async with self.http.stream("POST", f"/v1/programs/{program}/stream", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response, response.json())
            async for name, data in _sse_events(response):
                yield name, json.loads(data)

    @trio.as_safe_channel
    async def ws_ask(self, question: str) -> AsyncGenerator[str, None]:
        """The plain ``/ws``: ``async with client.ws_ask(q) as tokens: async for token in tokens``.

        The socket (and its nursery) lives in a task of its own; the tokens come through a channel.
        """
        async with self._websocket("/ws") as ws:
            await ws.send_message(question)
            while (frame := await ws.get_message()) != "[DONE]":
                if isinstance(frame, str) and frame.startswith('{"error"'):
                    raise ServiceError(0, json.loads(frame))
                yield str(frame)

    def _ws_url(self, path: str) -> str:
        return self.base_url.replace("http", "ws", 1) + path

    @asynccontextmanager
    async def _websocket(self, path: str) -> AsyncIterator[WebSocketConnection]:
        headers = [(b"authorization", f"Bearer {self.api_key}".encode())] if self.api_key else None
        async with open_websocket_url(self._ws_url(path), extra_headers=headers) as ws:
            yield ws

    @asynccontextmanager
    async def open_multiplexed(self) -> AsyncIterator[Multiplexed]:
        """A ``/v1/ws`` connection shared by concurrent requests."""
        async with self._websocket("/v1/ws") as ws, trio.open_nursery() as nursery:
            multiplexed = Multiplexed(ws)
            nursery.start_soon(multiplexed._route)
            try:
                yield multiplexed
            finally:
                nursery.cancel_scope.cancel()


class Multiplexed:
    """Many requests over one ``/v1/ws`` socket; frames are routed to their request by id."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count()
        self._routes: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.unrouted: list[dict[str, Any]] = []

    async def _route(self) -> None:
        while True:
            frame = json.loads(await self._ws.get_message())
            route = self._routes.get(frame.get("id"))
            if route is None:
                self.unrouted.append(frame)
            else:
                await route.send(frame)

    async def send_raw(self, frame: str) -> None:
        """Send a frame as is (for testing the server's handling of bad frames)."""
        await self._ws.send_message(frame)

    @trio.as_safe_channel
    async def frames(self, frame: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Send a request frame; ``async with ws.frames(frame) as answers: async for answer in answers``
        until the last one (``result``, ``final``, ``error`` or ``cancelled``). ``id`` is this socket's
        label for the request (one is chosen if missing); the server gives it its own unique id."""
        request_id = frame.setdefault("id", f"r{next(self._ids)}")
        send, receive = trio.open_memory_channel[dict[str, Any]](64)
        self._routes[request_id] = send
        try:
            await self._ws.send_message(json.dumps(frame))
            async for answer in receive:
                yield answer
                if answer["type"] in ("result", "final", "error", "cancelled"):
                    return
        finally:
            del self._routes[request_id]

    async def predict(self, program: str, inputs: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        """One prediction over the socket; raises :class:`ServiceError` for an error frame."""
        request = {"type": "predict", "program": program, "inputs": dict(inputs), **extra}
        async with self.frames(request) as answers:
            async for frame in answers:
                if frame["type"] == "error":
                    raise ServiceError(0, frame)
                return frame
        raise ServiceError(0, {"error": {"code": "no_answer", "message": "the socket ended"}})

    def stream(
        self, program: str, inputs: Mapping[str, Any], **extra: Any
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[dict[str, Any]]]:
        """``async with ws.stream(...) as frames: async for frame in frames``: status, deltas, then one
        ``final``, ``error`` or ``cancelled`` frame."""
        return self.frames({"type": "stream", "program": program, "inputs": dict(inputs), **extra})

    async def cancel(self, request_id: str) -> None:
        await self._ws.send_message(json.dumps({"id": request_id, "type": "cancel"}))


@asynccontextmanager
async def open_client(
    base_url: str, *, api_key: str | None = None, http_timeout: float = 120.0
) -> AsyncIterator[Client]:
    """A client for the service at ``base_url`` for the duration of the block."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=http_timeout) as http:
        yield Client(base_url, http, api_key)
