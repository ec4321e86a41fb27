"""httpx MockTransport helpers for the httpx-backed LM backends' tests: a scripted upstream, an
OpenAI-compatible backend on it, and a backend under the upstream guard."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from dspy_trio.engine._adaptive import AdaptiveSettings
from dspy_trio.engine._retry import RetryPolicy, seeded
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import GuardedLM, OpenAICompatibleLM, TrioLM

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]

COMPLETION = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class Scripted:
    """A transport handler answering with the scripted responses in order, then success; it records
    the virtual time and the JSON body of every request it received."""

    def __init__(self, *responses: httpx.Response, success: dict[str, Any] = COMPLETION) -> None:
        self.responses = list(responses)
        self.success = success
        self.times: list[float] = []
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        self.bodies.append(json.loads(request.content))
        await trio.lowlevel.checkpoint()
        if self.responses:
            return self.responses.pop(0)
        return httpx.Response(200, json=self.success)


def openai_lm(handler: Handler, **params: Any) -> OpenAICompatibleLM:
    return OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", transport=httpx.MockTransport(handler), **params
    )


def guarded(lm: TrioLM, attempts: int = 3, *, adaptive: AdaptiveSettings | None = None) -> GuardedLM:
    """``lm`` under a guard retrying up to ``attempts`` times (backoff 0.25 s doubling to 8 s, seeded)."""
    retry = RetryPolicy(max_attempts=attempts, base_delay=0.25, max_delay=8.0)
    return GuardedLM(
        lm, UpstreamGuard("up", UpstreamPolicy(retry=retry, adaptive=adaptive), jitter=seeded(3))
    )
