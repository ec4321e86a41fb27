"""Anthropic's Messages API, Trio-native, plain and streaming: the ``anthropic`` provider's backend and
settings.

DSPy's chat messages are mapped to the Messages API: system messages become the ``system`` field,
consecutive messages of one role are merged (the API wants user and assistant to alternate), and
``max_tokens`` is always sent (the API requires it). Streams arrive as typed SSE events
(``message_start``, ``content_block_delta``, ``message_delta``, ``message_stop``, ``error``); text deltas
are pushed to the sink as they come, thinking deltas become the completion's reasoning. Errors map like
the OpenAI-compatible backend's (429 with ``retry-after``, 529 overloaded and other 5xx, connection
failures, malformed payloads, an ``error`` event mid-stream), so the engine's retry, cool-down and
rate-limit policies apply unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import httpx
import trio

from .._errors import UpstreamConnectionError
from .._tables import nested
from ._answers import bad, clean_usage, json_object, parse_json, text_or_none
from ._base import Completion, DeltaSink, Message, TrioLM, estimated_usage
from ._http_errors import status_error
from ._provider import api_base_field, api_key_field
from ._transport import HTTPSettings, NetworkBackend

ANTHROPIC_API = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
# OpenAI-style parameter names DSPy passes, and their Messages API names (None: not sent).
_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop": "stop_sequences",
    "n": None,
}
# The retryable ``error`` event types and the HTTP status each stands for: reported after the 200, the
# same error (and retry, cool-down and rate-limit policy) as that status before the stream began.
_RETRYABLE_STREAM_ERRORS = {"rate_limit_error": 429, "api_error": 500, "overloaded_error": 529}


def to_messages_api(messages: Sequence[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """DSPy's chat messages as the Messages API's ``system`` and alternating ``messages``."""
    system = [str(m.get("content", "")) for m in messages if m.get("role") == "system"]
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "system":
            continue
        role = "assistant" if role == "assistant" else "user"
        content = message.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    return ("\n\n".join(system) or None), turns


def _usage(reported: Mapping[str, Any]) -> dict[str, int]:
    usage = clean_usage(reported)
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@attrs.frozen
class AnthropicSettings:
    """The ``anthropic`` provider's keys of an ``[lms.NAME]`` table: Anthropic's Messages API.

    Attributes:
        api_base: The API root (default Anthropic's own; a proxy's otherwise).
        api_key: Sent as ``x-api-key``; never shown in ``repr``. Without one, the environment's
            ``ANTHROPIC_API_KEY`` is used (for the default LM, ``LM_API_KEY`` first).
        http: Connection policy: timeouts, connections, the transport, the caps on answers.
        stream_upstream: Send non-streamed calls as streams and assemble the answer (see
            ``OpenAISettings.stream_upstream``).
    """

    provider: ClassVar[str] = "anthropic"
    key_env: ClassVar[str | None] = "ANTHROPIC_API_KEY"

    api_base: str = api_base_field(ANTHROPIC_API)
    api_key: str | None = api_key_field()
    http: HTTPSettings = nested(HTTPSettings)
    stream_upstream: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def build(self, model: str, params: Mapping[str, Any], *, cache: bool = False) -> AnthropicLM:
        """The backend; no I/O happens until its first call."""
        return AnthropicLM(
            model,
            api_key=self.api_key,
            api_base=self.api_base,
            http=self.http,
            stream_upstream=self.stream_upstream,
            cache=cache,
            **params,
        )


class AnthropicLM(TrioLM):
    """A ``dspy.BaseLM`` for Anthropic's Messages API.

    Args:
        model: The model, e.g. ``claude-sonnet-4-5``; a leading ``anthropic/`` (DSPy's prefix) is not sent.
        api_key: Sent as ``x-api-key``.
        api_base: The API root (``https://api.anthropic.com``, or a proxy / the fake upstream).
        http: Timeouts and connection limits.
        transport: An ``httpx`` transport to send requests through instead of the network (tests).
        network: Where the lean transport opens its connections instead of the network (tests pass
            ``dspy_trio.engine.testing.MockBackend``).
        stream_upstream: Send non-streamed calls as streams too and assemble the answer, so that a
            cancelled call closes a stream (see ``OpenAICompatibleLM``).
        **kwargs: Default request parameters (``max_tokens``, ``temperature``, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        api_base: str = ANTHROPIC_API,
        http: HTTPSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        network: NetworkBackend | None = None,
        stream_upstream: bool = False,
        **kwargs: Any,
    ) -> None:
        # Set like any param (not only in the body), so the TPM estimate charges the cap actually sent.
        kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        super().__init__(model, **kwargs)
        self.api_base = api_base
        self.stream_upstream = stream_upstream
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        root = api_base.rstrip("/").removesuffix("/v1")
        self.http = http or HTTPSettings()
        self._clients = self.http.clients(root + "/", headers, transport=transport, network=network)

    def __repr__(self) -> str:
        return f"AnthropicLM(model={self.model!r}, api_base={self.api_base!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> AnthropicLM:
        return self  # a connection pool is shared, not copied

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close kept-alive connections the provider closed, every ``http.idle_check_interval`` seconds,
        until cancelled."""
        await self._clients.reap_forever(self.http.idle_check_interval, task_status=task_status)

    async def aclose(self) -> None:
        await self._clients.aclose()

    def _body(self, messages: Sequence[Message], params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        system, turns = to_messages_api(messages)
        body: dict[str, Any] = {
            "model": self.model.removeprefix("anthropic/"),
            "messages": turns,
            "max_tokens": int(params.get("max_tokens") or DEFAULT_MAX_TOKENS),
        }
        if system:
            body["system"] = system
        for name, value in params.items():
            if name in _PARAMS and _PARAMS[name] is not None:
                body[str(_PARAMS[name])] = [value] if name == "stop" and isinstance(value, str) else value
        if stream:
            body["stream"] = True
        return body

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        stream = sink is not None or self.stream_upstream
        body = self._body(messages, params, stream=stream)
        if not stream:
            return await self._complete(body)
        return await self._stream(body, sink)

    async def _complete(self, body: dict[str, Any]) -> Completion:
        response = await self._clients.post_json(self.model, "v1/messages", body)
        redact = self._clients.redact
        payload = parse_json(self.model, response.content, redact)
        try:
            blocks = payload["content"]
            text = "".join(b["text"] for b in blocks if b.get("type") == "text")
            thinking = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking")
            usage = _usage(payload.get("usage") or {})
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            detail = response.content[:2000].decode(errors="replace")
            raise bad(self.model, "the upstream's answer is not a message", detail, redact) from exc
        text = text_or_none(self.model, text, redact) or ""
        thinking = text_or_none(self.model, thinking, redact) or ""
        return Completion(
            [text], usage, [thinking or None], finish_reasons=[_finish(payload.get("stop_reason"))]
        )

    async def _stream(self, body: dict[str, Any], sink: DeltaSink | None) -> Completion:
        """Read an SSE answer, pushing text deltas to ``sink`` (None: assemble it only)."""
        text: list[str] = []
        thinking: list[str] = []
        usage: dict[str, Any] = {}
        stopped = False
        finish: list[str | None] = [None]

        redact = self._clients.redact

        async def on_event(name: str, data: str) -> bool:
            nonlocal stopped
            payload = json_object(self.model, data, redact)
            kind = payload.get("type", name)
            try:
                if kind == "message_start":
                    usage.update(payload.get("message", {}).get("usage") or {})
                elif kind == "content_block_delta":
                    delta = payload.get("delta") or {}
                    if delta.get("type") == "text_delta":
                        if delta_text := text_or_none(self.model, delta.get("text"), redact):
                            text.append(delta_text)
                            if sink is not None:
                                await sink.send(delta_text)
                    elif delta.get("type") == "thinking_delta":
                        thinking.append(text_or_none(self.model, delta.get("thinking"), redact) or "")
                elif kind == "message_delta":
                    usage.update(payload.get("usage") or {})
                    finish[0] = _finish((payload.get("delta") or {}).get("stop_reason")) or finish[0]
                elif kind == "message_stop":
                    stopped = True
                    return True  # the stream's own end: the answer is complete
                elif kind == "error":
                    self._raise_stream_error(payload, data)
            except (AttributeError, TypeError, ValueError) as exc:
                raise bad(self.model, "the upstream's stream has a malformed event", data, redact) from exc
            return False

        await self._clients.post_sse(self.model, "v1/messages", body, on_event)
        if not stopped:
            raise UpstreamConnectionError(f"{self.model}: stream ended before message_stop", model=self.model)
        texts = ["".join(text)]
        if not usage.get("input_tokens") and not usage.get("output_tokens"):  # the stream reported none
            turns = [{"content": body.get("system") or ""}, *body["messages"]]
            return Completion(
                texts, estimated_usage(turns, texts), ["".join(thinking) or None], finish_reasons=finish
            )
        return Completion(texts, _usage(usage), ["".join(thinking) or None], finish_reasons=finish)

    def _raise_stream_error(self, payload: Mapping[str, Any], data: str) -> None:
        error = payload.get("error")
        kind = error.get("type") if isinstance(error, dict) else None
        redact = self._clients.redact
        if isinstance(kind, str) and (status := _RETRYABLE_STREAM_ERRORS.get(kind)) is not None:
            raise status_error(self.model, status, {}, data, redact)
        raise bad(self.model, "the upstream reported an error mid-stream", data, redact)


_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _finish(stop_reason: object) -> str | None:
    """Anthropic's ``stop_reason`` in OpenAI's words (``max_tokens`` is ``length``)."""
    return _FINISH.get(stop_reason) if isinstance(stop_reason, str) else None
