"""OpenAI-compatible chat completions, Trio-native: the ``openai`` provider's backend and settings.

Speaks ``POST {api_base}/chat/completions`` as served by OpenAI, vLLM, llama.cpp's server, Ollama's ``/v1``,
the LiteLLM proxy and the project's fake upstream, through the transport ``HTTPSettings`` chooses
(``_transport``: h11 on Trio streams, or httpx on Trio through anyio), so the caller's cancel scope reaches
the socket: cancelling a call closes its connection instead of leaving a request running upstream (and
billing tokens nobody reads).

Streaming reads the Server-Sent Events body line by line and pushes each delta to the sink *before*
reading the next line: a slow consumer therefore pauses the socket read, and TCP flow control carries
the backpressure to the provider.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import httpx
import trio

from .._errors import ConfigError, UpstreamConnectionError
from .._tables import nested
from .._validate import http_url
from ._answers import bad, clean_usage, json_object, parse_json, text_or_none
from ._base import Completion, DeltaSink, Message, TrioLM, estimated_usage
from ._http_errors import status_error
from ._provider import api_key_field
from ._redact import Redactor
from ._transport import HTTPSettings, NetworkBackend


def _jsonable_response_format(value: Any) -> Any:
    """JSONAdapter may pass a pydantic model class as ``response_format``; send its JSON schema."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return {
            "type": "json_schema",
            "json_schema": {"name": value.__name__, "schema": value.model_json_schema(), "strict": False},
        }
    return value


# Sent as max_tokens unless the LM's params or the call set it (None: send no cap). Without a cap a small
# self-hosted model can loop to its context limit: one such request ran 353 s.
DEFAULT_MAX_TOKENS = 1024

# The request parameters DSPy may pass that an OpenAI-compatible server takes. ``response_format`` here
# makes DSPy's JSONAdapter ask for ``{"type": "json_object"}``.
_SUPPORTED_PARAMS = frozenset(
    {"temperature", "max_tokens", "top_p", "n", "stop", "seed", "response_format", "logprobs", "top_logprobs"}
)


def _wire_model(model: str) -> str:
    return model.removeprefix("openai/")


class OpenAICompatibleLM(TrioLM):
    """A ``dspy.BaseLM`` for any OpenAI-compatible chat completions endpoint.

    Args:
        model: The model name; a leading ``openai/`` (DSPy's provider prefix) is not sent.
        api_base: The API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        api_key: Sent as ``Authorization: Bearer``; None sends no key.
        http: Timeouts and connection limits.
        transport: An ``httpx`` transport to send requests through instead of the network (tests).
        network: Where the lean transport opens its connections instead of the network (tests pass
            ``dspy_trio.engine.testing.MockBackend``).
        stream_upstream: Send non-streamed calls upstream as streams too (``stream: true``) and
            assemble the answer: closing a stream is what makes self-hosted servers (llama.cpp) stop
            generating when the call is cancelled, while they finish a plain request nobody reads.
        **kwargs: Default request parameters (``temperature``, ``max_tokens``, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        api_base: str,
        api_key: str | None = None,
        http: HTTPSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        network: NetworkBackend | None = None,
        stream_upstream: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        super().__init__(model, **kwargs)
        self.api_base = api_base
        self.stream_upstream = stream_upstream
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or HTTPSettings()
        root = api_base.rstrip("/") + "/"
        self._clients = self.http.clients(root, headers, transport=transport, network=network)

    def __repr__(self) -> str:
        return f"OpenAICompatibleLM(model={self.model!r}, api_base={self.api_base!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> OpenAICompatibleLM:
        # DSPy deep-copies modules (and the LMs they hold); a connection pool is shared, not copied.
        return self

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close kept-alive connections the provider closed, every ``http.idle_check_interval`` seconds,
        until cancelled."""
        await self._clients.reap_forever(self.http.idle_check_interval, task_status=task_status)

    async def aclose(self) -> None:
        await self._clients.aclose()

    @property
    def supported_params(self) -> set[str]:
        """What DSPy's adapters may send; with ``response_format`` in it, JSONAdapter asks for JSON."""
        return set(_SUPPORTED_PARAMS)

    def _body(self, messages: Sequence[Message], params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": _wire_model(self.model), "messages": list(messages)}
        body.update(params)
        if "response_format" in self.kwargs:  # the user's choice beats the adapter's; None sends none
            body["response_format"] = self.kwargs["response_format"]
            if body["response_format"] is None:
                del body["response_format"]
        if "response_format" in body:
            body["response_format"] = _jsonable_response_format(body["response_format"])
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        if sink is None and not self.stream_upstream:
            return await self._complete(self._body(messages, params, stream=False))
        return await self._stream(self._body(messages, params, stream=True), sink)

    async def _complete(self, body: dict[str, Any]) -> Completion:
        response = await self._clients.post_json(self.model, "chat/completions", body)
        redact = self._clients.redact
        payload = parse_json(self.model, response.content, redact)
        try:
            choices = payload["choices"]
            messages = [choice["message"] for choice in choices]
            texts = [text_or_none(self.model, m.get("content"), redact) or "" for m in messages]
            reasoning = [text_or_none(self.model, m.get("reasoning_content"), redact) for m in messages]
            finishes = [_finish(choice.get("finish_reason")) for choice in choices]
        except (KeyError, TypeError, AttributeError) as exc:
            detail = response.content[:2000].decode(errors="replace")
            raise bad(self.model, "the upstream's answer is not a chat completion", detail, redact) from exc
        return Completion(texts, _usage(payload), reasoning, finish_reasons=finishes)

    async def _stream(self, body: dict[str, Any], sink: DeltaSink | None) -> Completion:
        """Read an SSE answer, pushing choice 0's deltas to ``sink`` (None: assemble it only)."""
        parts: dict[int, list[str]] = {}
        reasoning: dict[int, list[str]] = {}
        usage: dict[str, Any] = {}
        finished: dict[int, str | None] = {}  # choices that ended, with their finish reason
        done = False

        wanted = body.get("n")
        choices = wanted if isinstance(wanted, int) and wanted > 1 else 1
        redact = self._clients.redact

        async def on_event(name: str, data: str) -> bool:
            nonlocal usage, done
            if data.strip() == "[DONE]":
                done = True
                return True  # the stream's own end: the answer is complete
            payload = self._chunk(data.strip())
            usage = _usage(payload) or usage
            for index, content, thinking, finish in _deltas(payload, self.model, choices, redact):
                if content:
                    parts.setdefault(index, []).append(content)
                    if index == 0 and sink is not None:
                        await sink.send(content)
                if thinking:
                    reasoning.setdefault(index, []).append(thinking)
                if finish:
                    finished[index] = _finish(finish)
            return False

        await self._clients.post_sse(self.model, "chat/completions", body, on_event)
        if not done and len(finished) < choices:  # a stream cut before every choice ended
            raise UpstreamConnectionError(f"{self.model}: stream ended before completion", model=self.model)
        count = max([*parts, *reasoning], default=0) + 1
        texts = ["".join(parts.get(i, [])) for i in range(count)]
        thoughts = ["".join(reasoning[i]) if i in reasoning else None for i in range(count)]
        finishes = [finished.get(i) for i in range(count)]
        return Completion(
            texts, usage or estimated_usage(body["messages"], texts), thoughts, finish_reasons=finishes
        )

    def _chunk(self, data: str) -> dict[str, Any]:
        redact = self._clients.redact
        payload = json_object(self.model, data, redact)
        if "error" in payload:
            error = payload["error"]
            code = error.get("code") if isinstance(error, dict) else None
            if isinstance(code, int) and not isinstance(code, bool) and (code == 429 or code >= 500):
                # An overload or rate limit the server reports after its 200: the same error (and retry
                # policy) as that status before the stream began.
                raise status_error(self.model, code, {}, json.dumps(payload), redact)
            raise bad(self.model, "the upstream reported an error mid-stream", json.dumps(payload), redact)
        return payload


def _needs_api_base(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value:
        raise ConfigError(
            "an LM of provider 'openai' needs api_base (LM_API_BASE), e.g. https://api.openai.com/v1"
        )
    http_url(instance, attribute, value)


@attrs.frozen
class OpenAISettings:
    """The ``openai`` provider's keys of an ``[lms.NAME]`` table: any OpenAI-compatible endpoint.

    Attributes:
        api_base: The API root (required), e.g. ``https://api.openai.com/v1`` or a self-hosted
            server's ``http://127.0.0.1:8080/v1``.
        api_key: Sent as ``Authorization: Bearer``; never shown in ``repr``. Without one, the
            environment's ``OPENAI_API_KEY`` is used (for the default LM, ``LM_API_KEY`` first).
        http: Connection policy: timeouts, connections, the transport, the caps on answers.
        stream_upstream: Send non-streamed calls upstream as streams and assemble the answer, so a
            cancelled call closes a stream: self-hosted servers (llama.cpp) stop generating then, but
            finish a plain request whose client left. Off by default: it costs the engine ~0.08 ms of
            CPU a token (``benchmarks/stream_upstream.py``).
    """

    provider: ClassVar[str] = "openai"
    key_env: ClassVar[str | None] = "OPENAI_API_KEY"

    api_base: str = attrs.field(default="", validator=_needs_api_base)
    api_key: str | None = api_key_field()
    http: HTTPSettings = nested(HTTPSettings)
    stream_upstream: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def build(self, model: str, params: Mapping[str, Any], *, cache: bool = False) -> OpenAICompatibleLM:
        """The backend; no I/O happens until its first call."""
        return OpenAICompatibleLM(
            model,
            api_base=self.api_base,
            api_key=self.api_key,
            http=self.http,
            stream_upstream=self.stream_upstream,
            cache=cache,
            **params,
        )


def _usage(payload: Mapping[str, Any]) -> dict[str, Any]:
    return clean_usage(payload.get("usage"))


def _finish(reason: object) -> str | None:
    """A choice's ``finish_reason`` when it is text (``stop``, ``length``, ...), else None."""
    return reason if isinstance(reason, str) and len(reason) <= 64 else None


def _deltas(
    payload: Mapping[str, Any], model: str, choices: int, redact: Redactor
) -> list[tuple[int, str | None, str | None, object]]:
    """(choice index, content delta, reasoning delta, finish reason or None) for each choice in a
    stream chunk.

    Raises:
        UpstreamResponseError: a choice that is not an object, an index outside the ``choices`` asked
            for, or a delta that is not text.
    """
    found = payload.get("choices") or []
    try:
        deltas = []
        for choice in found:
            index = choice.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < choices:
                raise bad(
                    model, "the upstream's stream names a choice that was not asked for", repr(index), redact
                )
            delta = choice.get("delta") or {}
            deltas.append(
                (
                    index,
                    text_or_none(model, delta.get("content"), redact),
                    text_or_none(model, delta.get("reasoning_content"), redact),
                    choice.get("finish_reason"),
                )
            )
        return deltas
    except (AttributeError, TypeError) as exc:
        raise bad(
            model, "the upstream's stream has malformed choices", json.dumps(payload)[:2000], redact
        ) from exc
