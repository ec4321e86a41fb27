"""What an upstream's answers may make the engine do, and what they may not: a huge ``Retry-After``
is capped by ``retry.max_retry_after`` (for the backoff and for the shared cool-down), a request that
cannot be sent is not retried as a connection failure, and only the "overloaded" 5xx statuses push the
adaptive limit down. The default (lean) transport on the in-memory network, and httpx's MockTransport for
what only httpx raises, on the virtual clock, exact times."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
import trio

from dspy_trio.engine import ConfigError, InvalidInputError, UpstreamRateLimitedError, UpstreamServerError
from dspy_trio.engine._adaptive import AdaptiveLimit, AdaptiveSettings
from dspy_trio.engine._retry import RetryPolicy, seeded
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import GuardedLM, OpenAICompatibleLM, TrioLM
from dspy_trio.engine.testing import MockRequest, Reply, http_response
from tests.scripted_upstream import COMPLETION, Scripted, openai_lm

MESSAGES = [{"role": "user", "content": "What is Trio?"}]


def guarded(lm: TrioLM, *, attempts: int = 3, **retry: Any) -> tuple[GuardedLM, UpstreamGuard]:
    policy = RetryPolicy(max_attempts=attempts, base_delay=0.25, max_delay=8.0, **retry)
    guard = UpstreamGuard("up", UpstreamPolicy(retry=policy), jitter=seeded(3))
    return GuardedLM(lm, guard), guard


async def test_a_huge_retry_after_is_waited_only_up_to_max_retry_after(autojump_clock: Any) -> None:
    """``Retry-After: 1e9`` (31 years) to a call with no deadline: the retry goes at the policy's cap."""
    script = Scripted(http_response(503, headers={"Retry-After": "1e9"}, json={}))
    lm, _ = guarded(openai_lm(script), max_retry_after=60.0)
    assert await lm.acall(messages=MESSAGES) == ["ok"]
    assert script.times == [0.0, 60.0]


async def test_a_huge_retry_after_cools_the_upstream_down_only_up_to_the_cap(autojump_clock: Any) -> None:
    script = Scripted(http_response(429, headers={"Retry-After": "1e308"}, json={}))
    lm, guard = guarded(openai_lm(script), attempts=1, max_retry_after=30.0)
    with pytest.raises(Exception, match="429"):
        await lm.acall(messages=MESSAGES)
    assert guard.statistics().cooldown_remaining == 30.0
    assert await lm.acall(messages=MESSAGES) == ["ok"]
    assert script.times == [0.0, 30.0]


def test_the_default_cap_is_sixty_seconds_and_it_validates_itself() -> None:
    assert RetryPolicy().max_retry_after == 60.0
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="max_retry_after"):
            RetryPolicy(max_retry_after=bad)


@pytest.mark.parametrize(
    "error", [httpx.LocalProtocolError("Illegal header value"), httpx.UnsupportedProtocol("no scheme")]
)
async def test_a_request_that_cannot_be_sent_is_not_retried(autojump_clock: Any, error: Exception) -> None:
    """h11 refusing our own header, or a URL without http(s): no retry can help, so it is a
    ConfigError after one attempt, not a retried UpstreamConnectionError."""
    times: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        raise error

    httpx_lm = OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", transport=httpx.MockTransport(handler)
    )
    lm, guard = guarded(httpx_lm)
    with pytest.raises(ConfigError, match="cannot be sent"):
        await lm.acall(messages=MESSAGES)
    assert times == [0.0]
    assert guard.statistics().retries_by_cause == {}


async def test_a_parameter_json_cannot_carry_is_invalid_input_and_nothing_is_sent() -> None:
    sent: list[bytes] = []

    def handler(request: MockRequest) -> Reply:
        sent.append(request.body)
        return [http_response(200, json=COMPLETION)]

    lm, _ = guarded(openai_lm(handler))
    with pytest.raises(InvalidInputError, match="JSON"):
        await lm.acall(messages=MESSAGES, temperature=math.inf)
    assert sent == []
    assert await lm.acall(messages=MESSAGES, temperature=0.5) == ["ok"]
    assert json.loads(sent[0])["temperature"] == 0.5


@pytest.mark.parametrize(("status", "pushback"), [(500, False), (502, False), (503, True), (529, True)])
def test_only_the_overloaded_statuses_are_pushback(status: int, pushback: bool) -> None:
    assert UpstreamServerError("x", status=status).pushback is pushback


def test_the_initial_adaptive_limit_is_kept_within_its_bounds() -> None:
    """``adaptive = {maximum = 8}`` keeps the default initial 16 valid: the limit starts at 8."""
    assert AdaptiveLimit(AdaptiveSettings(maximum=8)).limit == 8
    assert AdaptiveLimit(AdaptiveSettings(minimum=32)).limit == 32


@pytest.mark.parametrize("seconds", [math.inf, math.nan])
def test_the_dspy_provider_ignores_a_non_finite_retry_after(seconds: float) -> None:
    from dspy.utils.exceptions import LMRateLimitError, LMServerError

    from dspy_trio.engine.lm.threaded import dspy_lm_errors

    for error in (LMRateLimitError("slow", retry_after=seconds), LMServerError("busy", retry_after=seconds)):
        with pytest.raises((UpstreamServerError, UpstreamRateLimitedError)) as info, dspy_lm_errors("m"):
            raise error
        assert info.value.retry_after is None
