"""The wire formats the fake upstream speaks: OpenAI chat completions and Anthropic messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import h11
import trio

from ._records import RequestRecord


def sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


@attrs.frozen
class OpenAIWire:
    """``POST /v1/chat/completions``."""

    path = "/chat/completions"

    def messages(self, body: dict[str, Any]) -> list[Any]:
        return list(body.get("messages") or [])

    def error(self, kind: str, message: str) -> dict[str, Any]:
        if kind == "context_window":  # OpenAI's own shape of it
            message = "This model's maximum context length is 128 tokens. Please reduce the length."
            error = {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}
            return {"error": error}
        return {"error": {"message": message, "type": kind}}

    def completion(
        self, index: int, model: str, text: str, usage: dict[str, int], cut: bool = False
    ) -> dict[str, Any]:
        finish = "length" if cut else "stop"
        return {
            "id": f"chatcmpl-fake-{index}",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            ],
            "usage": usage,
        }

    def _chunk(self, index: int, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
        return sse(
            {
                "id": f"chatcmpl-fake-{index}",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def stream_start(self, index: int, model: str, usage: dict[str, int]) -> bytes:
        return b""

    def stream_token(self, index: int, model: str, token: str) -> bytes:
        return self._chunk(index, model, {"content": token}, None)

    def stream_end(
        self, index: int, model: str, usage: dict[str, int], body: dict[str, Any], cut: bool = False
    ) -> bytes:
        end = self._chunk(index, model, {}, "length" if cut else "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            end += sse({"id": f"chatcmpl-fake-{index}", "choices": [], "usage": usage})
        return end + b"data: [DONE]\n\n"

    malformed_body = b'{"choices": [{"message": '
    malformed_chunk = b'data: {"choices": [{"delta": \n\n'


@attrs.frozen
class AnthropicWire:
    """``POST /v1/messages``."""

    path = "/messages"

    def messages(self, body: dict[str, Any]) -> list[Any]:
        system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
        return system + list(body.get("messages") or [])

    def error(self, kind: str, message: str) -> dict[str, Any]:
        kinds = {
            "rate_limit": "rate_limit_error",
            "overloaded": "overloaded_error",
            "context_window": "invalid_request_error",
            "unauthorized": "authentication_error",
        }
        if kind == "context_window":  # Anthropic's own words for it
            message = "prompt is too long: 210000 tokens > 200000 maximum"
        return {"type": "error", "error": {"type": kinds.get(kind, "api_error"), "message": message}}

    def _usage(self, usage: dict[str, int]) -> dict[str, int]:
        return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}

    def completion(
        self, index: int, model: str, text: str, usage: dict[str, int], cut: bool = False
    ) -> dict[str, Any]:
        return {
            "id": f"msg_fake_{index}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "max_tokens" if cut else "end_turn",
            "usage": self._usage(usage),
        }

    def stream_start(self, index: int, model: str, usage: dict[str, int]) -> bytes:
        message = {
            "id": f"msg_fake_{index}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": 1},
        }
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return (
            sse({"type": "message_start", "message": message}, "message_start")
            + sse(block, "content_block_start")
            + sse({"type": "ping"}, "ping")
        )

    def stream_token(self, index: int, model: str, token: str) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        return sse(delta, "content_block_delta")

    def stream_end(
        self, index: int, model: str, usage: dict[str, int], body: dict[str, Any], cut: bool = False
    ) -> bytes:
        return (
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens" if cut else "end_turn"},
                    "usage": {"output_tokens": usage["completion_tokens"]},
                },
                "message_delta",
            )
            + sse({"type": "message_stop"}, "message_stop")
        )

    malformed_body = b'{"content": [{"type": "text", '
    malformed_chunk = b'event: content_block_delta\ndata: {"type": "content_block_delta", \n\n'


WIRES = (OpenAIWire(), AnthropicWire())


def wire_for(path: str) -> OpenAIWire | AnthropicWire | None:
    return next((wire for wire in WIRES if path.endswith(wire.path)), None)


class ClientGone(Exception):
    """The client closed the connection (seen by the watcher or by a failed write)."""


class Sender:
    """Writes h11 events to the socket; a failed write means the client is gone. Bytes written are
    counted on ``record`` (its ``bytes_sent`` and ``body_bytes``) once it is set."""

    def __init__(self, connection: h11.Connection, stream: trio.SocketStream) -> None:
        self._connection = connection
        self._stream = stream
        self.aborted = False
        self.record: RequestRecord | None = None

    async def _send(self, event: Any) -> None:
        payload = self._connection.send(event)
        if payload:
            if self.record is not None:  # counted as it is handed to the socket
                self.record.bytes_sent += len(payload)
                if isinstance(event, h11.Data):
                    self.record.body_bytes += len(event.data)
            try:
                await self._stream.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone from exc

    async def raw(
        self, status: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        head = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        await self._send(h11.Response(status_code=status, headers=head))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def json(self, status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        await self.raw(status, json.dumps(payload).encode(), "application/json", headers)

    async def start_stream(self, content_type: str = "text/event-stream") -> None:
        head = [("content-type", content_type), ("cache-control", "no-cache")]
        await self._send(h11.Response(status_code=200, headers=head))

    async def data(self, payload: bytes) -> None:
        await self._send(h11.Data(data=payload))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def abort(self) -> None:
        """Close the connection without finishing the answer."""
        self.aborted = True
        await self._stream.aclose()
