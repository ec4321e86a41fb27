"""WebSocket endpoints: the seed's plain-text ``/ws`` and the multiplexed JSON protocol ``/v1/ws``.

``/ws``: each text frame is a question for the default program; the answer comes back as one text
frame per token, then ``[DONE]`` (after a JSON ``{"error": ...}`` frame if it failed). One at a time.

``/v1/ws``: JSON frames, many requests at once on one socket, labelled by client-chosen ids::

    -> {"id": "a", "type": "predict", "program": "default", "inputs": {...}, "timeout_secs": 5}
    -> {"id": "b", "type": "stream", "program": "default", "inputs": {...}}
    -> {"id": "b", "type": "cancel"}
    <- {"id": "a", "type": "result", "outputs": ..., "usage": ..., "timings": ...}
    <- {"id": "b", "type": "status" | "delta" | "final" | "error", ...}
    <- {"id": "b", "type": "cancelled"}

A frame's ``id`` is the client's label *within its socket*; the server gives every request its own
unique id (``request_id`` in results) for routing, cancelling and logs, so ids of different sockets
never collide. Frames are validated by the same models and limits as the HTTP bodies (size, nesting,
input text, Unicode, ``timeout_secs``); a bad frame gets an ``error`` frame (with its id, when it had
one: for a frame refused before parsing, found by the bounded scan of :mod:`dspy_trio.web.frame_label`) and
disturbs nothing else. Every request ends with exactly one ``result``, ``final``, ``error`` or
``cancelled`` frame. At most ``ws_max_requests`` requests run per socket. Frames go out through one
sender task and a bounded channel. Closing the socket cancels its requests (and their upstream calls).

The handshake goes through :func:`dspy_trio.web.auth.authorize` (API key, Origin policy): a refusal is an HTTP
401/403 with a JSON body, before the socket is accepted.
"""

from __future__ import annotations

import uuid
from typing import Any

import pydantic
import trio
from quart import Blueprint, websocket
from quart_cors import cors_exempt

from dspy_trio.engine import (
    Engine,
    EngineError,
    ErrorEvent,
    FinalEvent,
    RequestCancelledError,
)

from .auth import authorize
from .deadline import RequestDeadline
from .encoding import dumps, error_json, event_json, result_json
from .errors import HTTPError, error_body
from .frame_label import frame_label
from .http import state
from .limits import check_inputs, parse_json
from .models import FRAME, CancelFrame, RunFrame, validation_error
from .sse import seed_answer
from .state import ServiceState

websockets = Blueprint("websockets", __name__)

_OUTBOX = 256


async def _admit() -> tuple[ServiceState, Engine, str]:
    """Authorize the handshake (HTTP 401/403/503 before accepting), then accept; returns the owner key."""
    service = state()
    owner = authorize(
        service.settings,
        method="GET",
        path=websocket.path,
        headers=websocket.headers,
        query=websocket.args,
        websocket=True,
    )
    engine = service.require_engine()
    await websocket.accept()
    return service, engine, owner


def _error_frame(label: Any, error: HTTPError | EngineError) -> str:
    if isinstance(error, HTTPError):
        body = error_body(error.message, type=error.type, code=error.code, param=error.param)
    else:
        body = error_json(error)
    return dumps({"id": label, "type": "error", **body})


@websockets.websocket("/ws")
@cors_exempt
async def seed_ws() -> None:
    """The seed's protocol: a question per text frame, token frames, then ``[DONE]``."""
    service, engine, owner = await _admit()
    limits = service.settings
    while True:
        question = await websocket.receive()
        arrived = trio.current_time()
        try:
            if not isinstance(question, str) or not question.strip():
                raise HTTPError(
                    422,
                    "send the question as a non-empty text frame",
                    type="invalid_request_error",
                    code="invalid_frame",
                )
            if len(question.encode("utf-8", "surrogatepass")) > limits.max_body_bytes:
                raise HTTPError(
                    413,
                    f"the frame is larger than {limits.max_body_bytes} bytes",
                    type="invalid_request_error",
                    code="frame_too_large",
                )
            check_inputs({"question": question}, max_chars=limits.max_input_chars)
        except HTTPError as exc:
            await websocket.send(dumps(http_body(exc)))
            await websocket.send("[DONE]")
            continue
        until = RequestDeadline.start(limits, arrived=arrived)
        await _seed_answer(service, engine, owner, question, until)
        await websocket.send("[DONE]")


def http_body(error: HTTPError) -> dict[str, Any]:
    return error_body(error.message, type=error.type, code=error.code, param=error.param)


async def _seed_answer(
    service: ServiceState, engine: Engine, owner: str, question: str, until: RequestDeadline
) -> None:
    """Stream one answer of the seed's ``/ws``: token frames (or the whole answer if no token came)."""
    request_id = uuid.uuid4().hex
    sent_delta = False
    with until.scope() as timer:
        try:
            async with engine.stream(
                "default", {"question": question}, request_id=request_id, owner=owner
            ) as events:
                async for event in events:
                    name, payload = event_json(event)
                    if name == "delta":
                        sent_delta = True
                        await websocket.send(payload["text"])
                    elif isinstance(event, FinalEvent) and not sent_delta:
                        answer = seed_answer(payload["outputs"])
                        if answer is not None:
                            await websocket.send(str(answer))
                    elif name == "error":
                        await websocket.send(dumps(payload))
        except EngineError as exc:
            await websocket.send(dumps(error_json(exc)))
    if timer.cancelled_caught:
        await websocket.send(dumps(error_json(until.error())))


@websockets.websocket("/v1/ws")
@cors_exempt
async def multiplexed_ws() -> None:
    """The JSON protocol: concurrent predict / stream requests with ids, and cancel by id."""
    service, engine, owner = await _admit()
    async with trio.open_nursery() as nursery:
        socket = _Socket(service, engine, owner, nursery)
        nursery.start_soon(socket.send_frames)
        while True:
            await socket.handle(await websocket.receive(), trio.current_time())


class _Socket:
    """The state of one ``/v1/ws`` connection: its requests by label, its outbox, its owner."""

    def __init__(self, service: ServiceState, engine: Engine, owner: str, nursery: trio.Nursery) -> None:
        self.service = service
        self.settings = service.settings
        self.engine = engine
        self.owner = owner
        self.nursery = nursery
        self.outbox, self._outbox = trio.open_memory_channel[str](_OUTBOX)
        # label -> (server request id, the scope of the task running it)
        self.active: dict[str, tuple[str, trio.CancelScope]] = {}

    async def send_frames(self) -> None:
        async for text in self._outbox:
            await websocket.send(text)

    def parse(self, raw: str | bytes | None) -> RunFrame | CancelFrame:
        """A frame, validated like an HTTP body.

        Raises:
            _BadFrame: with the label (when the frame had one) and the error.
        """
        value: Any = None
        try:
            limits = self.settings
            # An empty frame arrives as None (Quart-Trio reads "bytes or text").
            value = parse_json(
                raw or b"", max_bytes=limits.max_body_bytes, max_depth=limits.max_json_depth, what="frame"
            )
            frame = FRAME.validate_python(value)
            if isinstance(frame, RunFrame):
                check_inputs(frame.inputs, max_chars=self.settings.max_input_chars)
            return frame
        except pydantic.ValidationError as exc:
            raise _BadFrame(_label_of(value), validation_error(exc, tagged=True)) from None
        except HTTPError as exc:  # refused unparsed (too large, too deep, not JSON): a bounded scan
            label = _label_of(value) if value is not None else frame_label(raw)
            raise _BadFrame(label, exc) from None

    async def handle(self, raw: str | bytes | None, arrived: float) -> None:
        """Act on one incoming frame; every problem becomes an error frame."""
        try:
            frame = self.parse(raw)
            if isinstance(frame, CancelFrame):
                self.cancel(frame.id)
            else:
                self.start(frame, arrived)
        except _BadFrame as bad:
            await self.outbox.send(_error_frame(bad.label, bad.error))

    def cancel(self, label: str) -> None:
        if label not in self.active:
            raise _BadFrame(label, _frame_error(404, "no such request in flight", "unknown_id"))
        request_id, scope = self.active[label]
        if not self.engine.cancel(request_id):
            scope.cancel()  # not in the engine yet (or any more): end it here

    def start(self, frame: RunFrame, arrived: float) -> None:
        if frame.id in self.active:
            raise _BadFrame(frame.id, _frame_error(409, "this id is already in flight", "duplicate_id"))
        if len(self.active) >= self.settings.ws_max_requests:
            message = f"at most {self.settings.ws_max_requests} requests per socket"
            raise _BadFrame(frame.id, _frame_error(429, message, "too_many_requests"))
        try:
            until = RequestDeadline.start(self.settings, arrived=arrived, asked=frame.timeout_secs)
        except HTTPError as exc:
            raise _BadFrame(frame.id, exc) from None
        scope = trio.CancelScope()
        self.active[frame.id] = (uuid.uuid4().hex, scope)
        self.nursery.start_soon(self.run, frame, until, scope)

    async def run(self, frame: RunFrame, until: RequestDeadline, scope: trio.CancelScope) -> None:
        """Run one request to exactly one last frame."""
        request_id = self.active[frame.id][0]
        try:
            with scope:
                with until.scope() as timer:
                    try:
                        await self.serve(frame, request_id)
                    except RequestCancelledError:
                        await self.outbox.send(dumps({"id": frame.id, "type": "cancelled"}))
                    except EngineError as exc:
                        await self.outbox.send(_error_frame(frame.id, exc))
                if timer.cancelled_caught:
                    await self.outbox.send(_error_frame(frame.id, until.error()))
            if scope.cancelled_caught:
                await self.outbox.send(dumps({"id": frame.id, "type": "cancelled"}))
        finally:
            del self.active[frame.id]

    async def serve(self, frame: RunFrame, request_id: str) -> None:
        if frame.type == "predict":
            result = await self.engine.predict(
                frame.program, frame.inputs, request_id=request_id, owner=self.owner
            )
            await self.outbox.send(dumps({"id": frame.id, "type": "result", **result_json(result)}))
            return
        async with self.engine.stream(
            frame.program, frame.inputs, request_id=request_id, owner=self.owner
        ) as events:
            async for event in events:
                if isinstance(event, ErrorEvent) and isinstance(event.error, RequestCancelledError):
                    await self.outbox.send(dumps({"id": frame.id, "type": "cancelled"}))
                    return
                name, payload = event_json(event)
                await self.outbox.send(dumps({"id": frame.id, "type": name, **payload}))


class _BadFrame(Exception):
    def __init__(self, label: str | None, error: HTTPError) -> None:
        super().__init__(error.message)
        self.label = label
        self.error = error


def _frame_error(status: int, message: str, code: str) -> HTTPError:
    return HTTPError(status, message, type="invalid_request_error", code=code)


def _label_of(value: Any) -> str | None:
    label = value.get("id") if isinstance(value, dict) else None
    return label if isinstance(label, str) and 0 < len(label) <= 128 else None
