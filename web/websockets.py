"""WebSocket endpoints: the seed's plain-text ``/ws`` and the multiplexed JSON protocol ``/v1/ws``.

``/ws``: each text frame is a question for the default program; the answer comes back as one text
frame per token, then ``[DONE]`` (after a JSON ``{"error": ...}`` frame if it failed). One at a time.

``/v1/ws``: JSON frames, many requests at once on one socket, told apart by client-chosen ids::

    -> {"id": "a", "type": "predict", "program": "default", "inputs": {...}, "timeout_secs": 5}
    -> {"id": "b", "type": "stream", "program": "default", "inputs": {...}}
    -> {"id": "b", "type": "cancel"}
    <- {"id": "a", "type": "result", "outputs": ..., "usage": ..., "timings": ...}
    <- {"id": "b", "type": "status" | "delta" | "final" | "error", ...}
    <- {"id": "b", "type": "cancelled"}

Every request ends with exactly one ``result``, ``final``, ``error`` or ``cancelled`` frame. A malformed
frame gets an ``error`` frame (with the id, when it had one) and disturbs nothing else. At most
``ws_max_requests`` requests run per socket. Frames go out through one sender task and a bounded
channel, so a client that stops reading slows its own requests, not the server. The socket's requests
are cancelled (and their upstream calls closed) when it disconnects.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Any

import trio
from quart import websocket
from quart_trio import QuartTrio

from engine import DeadlineExceededError, EngineError, InvalidInputError

from .encoding import dumps, error_json, event_json, result_json
from .errors import error_body

_OUTBOX = 256
_MAX_ID = 128


def _error_frame(request_id: Any, message: str, code: str) -> str:
    return dumps(
        {"id": request_id, "type": "error", **error_body(message, type="invalid_request_error", code=code)}
    )


def register_websockets(app: QuartTrio, state: Any) -> None:
    settings = state.settings

    def authorized() -> bool:
        if not settings.api_keys:
            return True
        scheme, _, key = websocket.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            key = websocket.args.get("api_key", "")
        return any([hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys])

    async def refuse() -> bool:
        if not authorized():
            await websocket.close(1008, "a valid API key is required")
            return True
        if not state.ready:
            await websocket.close(1013, "the service is not ready")
            return True
        await websocket.accept()
        return False

    def timeout_of(frame: dict[str, Any]) -> float:
        asked = frame.get("timeout_secs")
        if asked is not None and (
            not isinstance(asked, int | float)
            or isinstance(asked, bool)
            or not asked > 0
            or not math.isfinite(asked)
        ):
            raise ValueError("timeout_secs must be a positive number")
        return float(settings.timeout_for(asked))

    @app.websocket("/ws")
    async def seed_ws() -> None:
        """The seed's protocol: a question per text frame, token frames, then ``[DONE]``."""
        if await refuse():
            return
        while True:
            question = await websocket.receive()
            if not isinstance(question, str) or not question.strip():
                await websocket.send(
                    dumps(
                        error_body(
                            "send the question as a non-empty text frame",
                            type="invalid_request_error",
                            code="invalid_frame",
                        )
                    )
                )
                await websocket.send("[DONE]")
                continue
            with trio.move_on_after(settings.default_timeout) as deadline:
                try:
                    async with state.require_engine().stream("default", {"question": question}) as events:
                        async for event in events:
                            name, payload = event_json(event)
                            if name == "delta":
                                await websocket.send(payload["text"])
                            elif name == "error":
                                await websocket.send(dumps(payload))
                except EngineError as exc:
                    await websocket.send(dumps(error_json(exc)))
            if deadline.cancelled_caught:
                await websocket.send(
                    dumps(error_json(DeadlineExceededError("the request ran past its timeout")))
                )
            await websocket.send("[DONE]")

    @app.websocket("/v1/ws")
    async def multiplexed_ws() -> None:
        """The JSON protocol: concurrent predict / stream requests with ids, and cancel by id."""
        if await refuse():
            return
        engine = state.require_engine()
        outbox_send, outbox = trio.open_memory_channel[str](_OUTBOX)
        active: dict[str, trio.CancelScope] = {}

        async def sender() -> None:
            async for text in outbox:
                await websocket.send(text)

        async def run(
            request_id: str, frame: dict[str, Any], seconds: float, scope: trio.CancelScope
        ) -> None:
            try:
                with scope:
                    with trio.move_on_after(seconds) as deadline:
                        try:
                            await _serve_one(engine, request_id, frame, outbox_send)
                        except EngineError as exc:
                            await outbox_send.send(
                                dumps({"id": request_id, "type": "error", **error_json(exc)})
                            )
                    if deadline.cancelled_caught:
                        error = error_json(DeadlineExceededError("the request ran past its timeout"))
                        await outbox_send.send(dumps({"id": request_id, "type": "error", **error}))
                if scope.cancelled_caught:
                    await outbox_send.send(dumps({"id": request_id, "type": "cancelled"}))
            finally:
                del active[request_id]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while True:
                raw = await websocket.receive()
                try:
                    frame = json.loads(raw)
                except (TypeError, ValueError):
                    await outbox_send.send(_error_frame(None, "frames must be JSON objects", "invalid_frame"))
                    continue
                request_id = frame.get("id") if isinstance(frame, dict) else None
                if (
                    not isinstance(frame, dict)
                    or not isinstance(request_id, str)
                    or not 0 < len(request_id) <= _MAX_ID
                ):
                    await outbox_send.send(
                        _error_frame(
                            request_id if isinstance(request_id, str) else None,
                            f"every frame is an object with a string id of 1 to {_MAX_ID} characters",
                            "invalid_frame",
                        )
                    )
                    continue
                kind = frame.get("type")
                if kind == "cancel":
                    if request_id in active:
                        active[request_id].cancel()
                    else:
                        await outbox_send.send(
                            _error_frame(request_id, "no such request in flight", "unknown_id")
                        )
                    continue
                if kind not in ("predict", "stream"):
                    await outbox_send.send(
                        _error_frame(request_id, "type must be predict, stream or cancel", "invalid_frame")
                    )
                    continue
                if request_id in active:
                    await outbox_send.send(
                        _error_frame(request_id, "this id is already in flight", "duplicate_id")
                    )
                    continue
                if len(active) >= settings.ws_max_requests:
                    await outbox_send.send(
                        _error_frame(
                            request_id,
                            f"at most {settings.ws_max_requests} requests per socket",
                            "too_many_requests",
                        )
                    )
                    continue
                if not isinstance(frame.get("inputs"), dict):
                    await outbox_send.send(
                        _error_frame(request_id, "inputs must be an object", "invalid_frame")
                    )
                    continue
                try:
                    timeout = timeout_of(frame)
                except ValueError as exc:
                    await outbox_send.send(_error_frame(request_id, str(exc), "invalid_timeout"))
                    continue
                active[request_id] = trio.CancelScope()
                nursery.start_soon(run, request_id, frame, timeout, active[request_id])


async def _serve_one(
    engine: Any, request_id: str, frame: dict[str, Any], outbox: trio.MemorySendChannel[str]
) -> None:
    program = frame.get("program", "default")
    if not isinstance(program, str):
        raise InvalidInputError("program must be a string")
    if frame["type"] == "predict":
        result = await engine.predict(program, frame["inputs"], request_id=f"ws-{request_id}")
        await outbox.send(dumps({"id": request_id, "type": "result", **result_json(result)}))
        return
    async with engine.stream(program, frame["inputs"], request_id=f"ws-{request_id}") as events:
        async for event in events:
            name, payload = event_json(event)
            await outbox.send(dumps({"id": request_id, "type": name, **payload}))
