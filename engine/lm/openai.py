"""OpenAI-compatible chat completions over ``httpx.AsyncClient``, Trio-native.

Speaks ``POST {api_base}/chat/completions`` as served by OpenAI, vLLM, llama.cpp's server, Ollama's
``/v1``, the LiteLLM proxy and the project's fake upstream. httpx runs on Trio through anyio, so the
caller's cancel scope reaches the socket: cancelling a call closes its connection instead of leaving a
request running upstream (and billing tokens nobody reads).

Streaming reads the Server-Sent Events body line by line and pushes each delta to the sink *before*
reading the next line: a slow consumer therefore pauses the socket read, and TCP flow control carries
the backpressure to the provider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import httpx

from .._errors import UpstreamConnectionError, UpstreamResponseError
from ._base import Completion, DeltaSink, Message, TrioLM
from ._http_pool import ClientShards
from ._sse import json_object
from ._transport import (
    HTTPClient,
    LeanClient,
    Timeouts,
    TransportName,
    choose,
    default_ssl_context,
    new_ssl_context,
)


@attrs.frozen
class HTTPSettings:
    """Connection policy of an HTTP backend.

    Attributes:
        connect_timeout: Seconds to open a connection.
        read_timeout: Seconds the provider may stay silent between two reads (per attempt).
        write_timeout: Seconds to send the request.
        pool_timeout: Seconds to wait for a free pooled connection.
        max_connections: Concurrent connections to the provider.
        idle_timeout: Seconds an idle keep-alive connection is kept (lean transport).
        client: ``"lean"`` (h11 on Trio streams), ``"httpx"``, or ``"auto"``: lean unless an HTTP
            proxy from the environment applies to the URL or ``http2`` is asked for.
        http2: Speak HTTP/2 (through httpx; needs the ``h2`` package).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    write_timeout: float = 30.0
    pool_timeout: float = 30.0
    max_connections: int = 1024
    idle_timeout: float = 5.0
    client: TransportName = "auto"
    http2: bool = False

    def clients(self, base_url: str, headers: Mapping[str, str]) -> HTTPClient:
        """A client with these timeouts and limits (no I/O happens until first use)."""
        if choose(base_url, self.client, http2=self.http2) == "lean":
            timeouts = Timeouts(
                connect=self.connect_timeout,
                read=self.read_timeout,
                write=self.write_timeout,
                pool=self.pool_timeout,
            )
            return LeanClient(
                base_url,
                headers,
                timeouts=timeouts,
                max_connections=self.max_connections,
                idle_timeout=self.idle_timeout,
            )
        timeout = httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.pool_timeout,
        )

        # Loading CA certificates takes ~50 ms: one context for all shards and lean clients.
        verify = new_ssl_context() if self.http2 else default_ssl_context()

        def make_client(connections: int) -> httpx.AsyncClient:
            limits = httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                keepalive_expiry=self.idle_timeout,
            )
            return httpx.AsyncClient(
                base_url=base_url,
                headers=dict(headers),
                timeout=timeout,
                limits=limits,
                verify=verify,
                http2=self.http2,
            )

        return ClientShards(self.max_connections, make_client)


def _jsonable_response_format(value: Any) -> Any:
    """JSONAdapter may pass a pydantic model class as ``response_format``; send its JSON schema."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return {
            "type": "json_schema",
            "json_schema": {"name": value.__name__, "schema": value.model_json_schema(), "strict": False},
        }
    return value


def _wire_model(model: str) -> str:
    return model.removeprefix("openai/")


class OpenAICompatibleLM(TrioLM):
    """A ``dspy.BaseLM`` for any OpenAI-compatible chat completions endpoint.

    Args:
        model: The model name; a leading ``openai/`` (DSPy's provider prefix) is not sent.
        api_base: The API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        api_key: Sent as ``Authorization: Bearer``; None sends no key.
        http: Timeouts and connection limits.
        **kwargs: Default request parameters (``temperature``, ``max_tokens``, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        api_base: str,
        api_key: str | None = None,
        http: HTTPSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.api_base = api_base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients = (http or HTTPSettings()).clients(api_base.rstrip("/") + "/", headers)

    def __repr__(self) -> str:
        return f"OpenAICompatibleLM(model={self.model!r}, api_base={self.api_base!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> OpenAICompatibleLM:
        # DSPy deep-copies modules (and the LMs they hold); a connection pool is shared, not copied.
        return self

    async def aclose(self) -> None:
        await self._clients.aclose()

    def _body(self, messages: Sequence[Message], params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": _wire_model(self.model), "messages": list(messages)}
        body.update(params)
        if "response_format" in body:
            body["response_format"] = _jsonable_response_format(body["response_format"])
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        if sink is None:
            return await self._complete(self._body(messages, params, stream=False))
        return await self._stream(self._body(messages, params, stream=True), sink)

    async def _complete(self, body: dict[str, Any]) -> Completion:
        response = await self._clients.post_json(self.model, "chat/completions", body)
        try:
            payload = response.json()
            choices = payload["choices"]
            texts = [choice["message"].get("content") or "" for choice in choices]
            reasoning = [choice["message"].get("reasoning_content") for choice in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamResponseError(
                f"{self.model}: malformed completion: {response.text[:200]!r}", model=self.model
            ) from exc
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise UpstreamResponseError(f"{self.model}: completion content is not text", model=self.model)
        return Completion(texts, _usage(payload), reasoning)

    async def _stream(self, body: dict[str, Any], sink: DeltaSink) -> Completion:
        parts: dict[int, list[str]] = {}
        reasoning: dict[int, list[str]] = {}
        usage: dict[str, Any] = {}
        finished = done = False

        async def on_event(name: str, data: str) -> None:
            nonlocal usage, finished, done
            if data.strip() == "[DONE]":
                done = True  # read on to the end of the body, so the connection can be reused
                return
            payload = self._chunk(data.strip())
            usage = _usage(payload) or usage
            for index, content, thinking, finish in _deltas(payload, self.model):
                if content:
                    parts.setdefault(index, []).append(content)
                    if index == 0:
                        await sink.send(content)
                if thinking:
                    reasoning.setdefault(index, []).append(thinking)
                finished = finished or finish

        await self._clients.post_sse(self.model, "chat/completions", body, on_event)
        if not (done or finished):
            raise UpstreamConnectionError(f"{self.model}: stream ended before completion", model=self.model)
        count = max([*parts, *reasoning], default=0) + 1
        texts = ["".join(parts.get(i, [])) for i in range(count)]
        thoughts = ["".join(reasoning[i]) if i in reasoning else None for i in range(count)]
        return Completion(texts, usage, thoughts)

    def _chunk(self, data: str) -> dict[str, Any]:
        payload = json_object(self.model, data)
        if "error" in payload:
            message = payload["error"].get("message") if isinstance(payload["error"], dict) else None
            raise UpstreamResponseError(
                f"{self.model}: error mid-stream: {message or payload['error']}", model=self.model
            )
        return payload


def _usage(payload: Mapping[str, Any]) -> dict[str, Any]:
    usage = payload.get("usage")
    return dict(usage) if isinstance(usage, dict) else {}


def _deltas(payload: Mapping[str, Any], model: str) -> list[tuple[int, str | None, str | None, bool]]:
    """(choice index, content delta, reasoning delta, finished) for each choice in a stream chunk."""
    choices = payload.get("choices") or []
    try:
        return [
            (
                int(choice.get("index", 0)),
                choice.get("delta", {}).get("content"),
                choice.get("delta", {}).get("reasoning_content"),
                bool(choice.get("finish_reason")),
            )
            for choice in choices
        ]
    except (AttributeError, TypeError, ValueError) as exc:
        raise UpstreamResponseError(f"{model}: malformed stream chunk choices", model=model) from exc
