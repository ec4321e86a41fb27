"""A scripted upstream for the HTTP backends' socket-less tests: it answers on the in-memory network
(``MockBackend``), under the default (lean) transport, and records when each request came and what it
carried. Also an OpenAI-compatible and an Anthropic backend on it, and a backend under the upstream guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dspy_trio.engine._adaptive import AdaptiveSettings
from dspy_trio.engine._retry import RetryPolicy, seeded
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import AnthropicLM, GuardedLM, OpenAICompatibleLM, TrioLM
from dspy_trio.engine.testing import MockBackend, MockRequest, Reply, http_response

COMPLETION = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
MESSAGE = {
    "content": [{"type": "text", "text": "ok"}],
    "usage": {"input_tokens": 3, "output_tokens": 1},
}


class Scripted:
    """Answers with the scripted responses in order (raw bytes, e.g. ``http_response(503, ...)``, or
    whole replies with pauses), then with ``success``; records the virtual time and the JSON body of
    every request it received."""

    def __init__(self, *responses: bytes | Reply, success: dict[str, Any] = COMPLETION) -> None:
        self.responses = list(responses)
        self.success = success
        self.times: list[float] = []
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: MockRequest) -> Reply:
        self.times.append(request.at)
        self.bodies.append(request.json())
        if self.responses:
            response = self.responses.pop(0)
            return [response] if isinstance(response, bytes) else response
        return [http_response(200, json=self.success)]


def openai_lm(respond: Callable[[MockRequest], Reply], **params: Any) -> OpenAICompatibleLM:
    return OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", network=MockBackend(respond), **params
    )


def anthropic_lm(respond: Callable[[MockRequest], Reply], **params: Any) -> AnthropicLM:
    return AnthropicLM("anthropic/m", api_base="http://upstream.test", network=MockBackend(respond), **params)


def guarded(
    lm: TrioLM, attempts: int = 3, *, adaptive: AdaptiveSettings | None = None, **retry: Any
) -> GuardedLM:
    """``lm`` under a guard retrying up to ``attempts`` times (backoff 0.25 s doubling to 8 s, seeded)."""
    policy = RetryPolicy(max_attempts=attempts, base_delay=0.25, max_delay=8.0, **retry)
    return GuardedLM(
        lm, UpstreamGuard("up", UpstreamPolicy(retry=policy, adaptive=adaptive), jitter=seeded(3))
    )
