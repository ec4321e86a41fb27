"""WebSocket endpoints: the plain-text ``/ws`` and the multiplexed JSON protocol ``/v1/ws``.

``/ws``: each text frame is a question for the route's program (``default``); the answer comes back as
one text frame per token, then ``[DONE]`` (after a JSON ``{"error": ...}`` frame if it failed). One at a
time.

``/v1/ws``: JSON frames, many requests at once on one socket, labelled by client-chosen ids::

    -> {"id": "a", "type": "predict", "program": "default", "inputs": {...}, "timeout_secs": 5}
    -> {"id": "b", "type": "stream", "program": "default", "inputs": {...}}
    -> {"id": "c", "type": "predict", "inputs": {...}, "cache_control": "no-cache"}
    -> {"id": "b", "type": "cancel"}
    <- {"id": "a", "type": "result", "outputs": ..., "usage": ..., "timings": ...}
    <- {"id": "b", "type": "status" | "delta" | "final" | "error", ...}
    <- {"id": "b", "type": "cancelled"}

The socket is one call (its owner is the handshake's key, its cache switches the handshake's
``Cache-Control``, to which a frame's ``cache_control`` may add); each question and each frame is a call
of its own (:meth:`dspy_trio.web.call.Call.frame`: the server's id, the socket's owner), run by the one runner
(:mod:`dspy_trio.web.runner`) and encoded in the socket's format (:mod:`dspy_trio.web.formats`). A frame's
``id`` is the client's label *within its socket*; the server's id (``request_id`` in results) routes,
cancels and logs, so ids of different sockets never collide. A cancel frame is turned into that id and
handed to the engine (``Engine.cancel`` for the socket's owner), like ``DELETE /v1/requests/{id}``.

Frames are validated by the same models and limits as the HTTP bodies (size, nesting, input text,
Unicode, ``timeout_secs``); a bad frame gets an ``error`` frame (with its id, when it had one: for a frame
refused before parsing, found by the bounded scan of :mod:`dspy_trio.web.frame_label`) and disturbs
nothing else. Every request ends with exactly one ``result``, ``final``, ``error`` or ``cancelled`` frame.
At most ``ws_max_requests`` requests run per socket. Frames go out through one sender task and a bounded
channel. Closing the socket cancels its requests (and their upstream calls).

The handshake was authorized by the front door (API key, Origin policy: a refusal is an HTTP 401/403
with a JSON body, before the socket is accepted); a service that is not ready refuses it with 503.
"""

from __future__ import annotations

from typing import Any

import pydantic
import trio
from quart import websocket
from quart_cors import cors_exempt

from dspy_trio.engine import Engine

from .cache_control import cache_switches
from .call import Call
from .deadline import RequestDeadline
from .errors import HTTPError
from .formats import Outcome, seed_frames, seed_frames_refused, ws_cancelled, ws_frame, ws_refused
from .frame_label import frame_label
from .limits import check_inputs, parse_json
from .models import FRAME, CancelFrame, RunFrame, validation_error
from .runner import run
from .service import Service
from .settings import ServiceSettings

_OUTBOX = 256


async def _accept(service: Service) -> Engine:
    """The engine (or a 503 before accepting, while starting or draining); then accept the handshake."""
    engine = service.require_engine()
    await websocket.accept()
    return engine


def _question(raw: str | bytes | None, limits: ServiceSettings) -> str:
    """A ``/ws`` frame as a question, within the limits.

    Raises:
        HTTPError: 422 not a non-empty text frame; 413 too large; 413 / 422 from the input checks.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise HTTPError(
            422,
            "send the question as a non-empty text frame",
            type="invalid_request_error",
            code="invalid_frame",
        )
    if len(raw.encode("utf-8", "surrogatepass")) > limits.max_body_bytes:
        raise HTTPError(
            413,
            f"the frame is larger than {limits.max_body_bytes} bytes",
            type="invalid_request_error",
            code="frame_too_large",
        )
    check_inputs({"question": raw}, max_chars=limits.max_input_chars)
    return raw


@cors_exempt  # the front door applies the Origin policy (dspy_trio.web.auth)
async def seed_ws(service: Service, call: Call) -> None:
    """A question per text frame, token frames, then ``[DONE]``."""
    engine = await _accept(service)
    limits = service.settings
    while True:
        raw = await websocket.receive()
        question = call.frame(None, trio.current_time(), call.program)
        try:
            text = _question(raw, limits)
        except HTTPError as exc:
            for frame in seed_frames_refused(exc):
                await websocket.send(frame)
            continue
        await _answer(engine, question, question.deadline(limits), text)


async def _answer(engine: Engine, question: Call, until: RequestDeadline, text: str) -> None:
    """Stream one ``/ws`` answer: token frames (or the whole answer if no token came), then ``[DONE]``."""
    encode = seed_frames()

    async def send(outcome: Outcome) -> None:
        for frame in encode(outcome):
            await websocket.send(frame)

    await run(engine, question, until, question.runs(), {"question": text}, stream=True, emit=send)


@cors_exempt
async def multiplexed_ws(service: Service, call: Call) -> None:
    """The JSON protocol: concurrent predict / stream requests with ids, and cancel by id."""
    engine = await _accept(service)
    async with trio.open_nursery() as nursery:
        socket = _Socket(service.settings, engine, call, nursery)
        nursery.start_soon(socket.send_frames)
        while True:
            await socket.handle(await websocket.receive(), trio.current_time())


class _Socket:
    """One ``/v1/ws`` connection: its call, its requests by the client's label, its outbox."""

    def __init__(self, settings: ServiceSettings, engine: Engine, call: Call, nursery: trio.Nursery) -> None:
        self.settings = settings
        self.engine = engine
        self.call = call
        self.nursery = nursery
        self.outbox, self._outbox = trio.open_memory_channel[str](_OUTBOX)
        # label -> (the server's id of the request, the scope of the task running it)
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
            await self.outbox.send(ws_refused(bad.label, bad.error))

    def cancel(self, label: str) -> None:
        """Cancel the request labelled ``label`` on this socket, through the engine, for this socket's
        owner; one that is not in the engine (not yet, or not any more) is ended here."""
        if label not in self.active:
            raise _BadFrame(label, _frame_error(404, "no such request in flight", "unknown_id"))
        request_id, scope = self.active[label]
        if not self.engine.cancel(request_id, owner=self.call.owner):
            scope.cancel()

    def start(self, frame: RunFrame, arrived: float) -> None:
        if frame.id in self.active:
            raise _BadFrame(frame.id, _frame_error(409, "this id is already in flight", "duplicate_id"))
        if len(self.active) >= self.settings.ws_max_requests:
            message = f"at most {self.settings.ws_max_requests} requests per socket"
            raise _BadFrame(frame.id, _frame_error(429, message, "too_many_requests"))
        no_cache, no_store = cache_switches(frame.cache_control)
        call = self.call.frame(frame.id, arrived, frame.program, no_cache=no_cache, no_store=no_store)
        try:
            until = call.deadline(self.settings, frame.timeout_secs)
        except HTTPError as exc:
            raise _BadFrame(frame.id, exc) from None
        scope = trio.CancelScope()
        self.active[frame.id] = (call.request_id, scope)
        self.nursery.start_soon(self.run, frame, call, until, scope)

    async def run(self, frame: RunFrame, call: Call, until: RequestDeadline, scope: trio.CancelScope) -> None:
        """Run one request to exactly one last frame."""

        async def send(outcome: Outcome) -> None:
            await self.outbox.send(ws_frame(frame.id, outcome))

        try:
            with scope:
                await run(
                    self.engine,
                    call,
                    until,
                    frame.program,
                    frame.inputs,
                    stream=frame.type == "stream",
                    emit=send,
                )
            if scope.cancelled_caught:
                await self.outbox.send(ws_cancelled(frame.id))
        finally:
            del self.active[frame.id]


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
