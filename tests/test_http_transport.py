"""The HTTP backends' error mapping and retry timing with no socket: the default (lean) transport on the
in-memory network (``tests/scripted_upstream.py``), the engine's upstream guard around it, and exact
times on the virtual clock; and the httpx transport's own errors through an ``httpx.MockTransport``."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from dspy_trio.engine import (
    RateLimitWaitError,
    UpstreamConnectionError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from dspy_trio.engine.lm import HTTPSettings, OpenAICompatibleLM
from dspy_trio.engine.testing import EOF, MockBackend, MockRequest, Reply, http_response
from tests.scripted_upstream import COMPLETION, MESSAGE, Scripted, anthropic_lm, guarded, openai_lm

MESSAGES = [{"role": "user", "content": "What is Trio?"}]


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (503, {"Retry-After": "1"}, 1.0),
        (429, {"Retry-After": "2"}, 2.0),
        (529, {"retry-after-ms": "1500"}, 1.5),
        (500, {"Retry-After": "3", "retry-after-ms": "750"}, 0.75),
    ],
    ids=["503", "429", "529-ms", "500-ms-first"],
)
async def test_every_retryable_status_is_retried_exactly_after_its_retry_after(
    autojump_clock: Any, status: int, headers: dict[str, str], wait: float
) -> None:
    script = Scripted(http_response(status, headers=headers, json={"error": {"message": "busy"}}))
    lm = guarded(openai_lm(script))
    assert await lm.acall(messages=MESSAGES) == ["ok"]
    assert script.times == [0.0, wait]


async def test_retry_after_never_waits_past_the_deadline(autojump_clock: Any) -> None:
    script = Scripted(http_response(503, headers={"Retry-After": "30"}, json={}))
    lm = guarded(openai_lm(script))
    with trio.move_on_after(10), pytest.raises(UpstreamServerError) as info:
        await lm.acall(messages=MESSAGES)
    assert info.value.retry_after == 30
    assert script.times == [0.0]
    assert trio.current_time() == 0.0, "gave up at once instead of sleeping"


async def test_a_503_retry_after_holds_off_the_next_call_too(autojump_clock: Any) -> None:
    script = Scripted(http_response(503, headers={"Retry-After": "5"}, json={}))
    lm = guarded(openai_lm(script), attempts=1)
    with pytest.raises(UpstreamServerError):
        await lm.acall(messages=MESSAGES)
    with trio.move_on_after(2), pytest.raises(RateLimitWaitError) as info:
        await lm.acall(messages=MESSAGES)
    assert info.value.retry_after == 5
    assert trio.current_time() == 0.0
    assert await lm.acall(messages=MESSAGES) == ["ok"]
    assert script.times == [0.0, 5.0]


async def test_anthropic_529_overloaded_is_retried_after_its_retry_after(autojump_clock: Any) -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    script = Scripted(http_response(529, headers={"retry-after": "4"}, json=overloaded), success=MESSAGE)
    lm = guarded(anthropic_lm(script))
    assert await lm.acall(messages=MESSAGES) == ["ok"]
    assert script.times == [0.0, 4.0]


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (
            [http_response(200, b"not gzip at all", headers={**JSON, "content-encoding": "gzip"})],
            UpstreamResponseError,
        ),
        (
            [http_response(307, headers={"location": "http://upstream.test/v1/chat/completions"})],
            UpstreamResponseError,
        ),
        ([http_response(200, b"{not json", headers=JSON)], UpstreamResponseError),
        ([http_response(200, json={"choices": "nope"})], UpstreamResponseError),
        ([http_response(400, json={"error": {"message": "bad"}})], UpstreamResponseError),
        ([http_response(502, b"<html>", headers={"content-type": "text/html"})], UpstreamServerError),
        ([http_response(200, json=COMPLETION)[:-3], EOF], UpstreamConnectionError),
        ([], UpstreamTimeoutError),  # the upstream never answers: the read timeout
    ],
    ids=["decoding", "redirect", "bad-json", "bad-shape", "400", "502", "cut", "read-timeout"],
)
async def test_transport_and_payload_failures_are_upstream_errors(
    autojump_clock: Any, reply: Reply, error: type[Exception]
) -> None:
    lm = openai_lm(lambda request: reply)
    with pytest.raises(error):
        await lm.acall(messages=MESSAGES)
    await lm.aclose()


async def test_a_refused_connection_is_a_connection_error() -> None:
    lm = OpenAICompatibleLM(
        "m", api_base="http://upstream.test/v1", network=MockBackend(lambda r: [], connections=0)
    )
    with pytest.raises(UpstreamConnectionError):
        await lm.acall(messages=MESSAGES)


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


def _plain_request_error(request: httpx.Request) -> httpx.Response:
    raise httpx.RequestError("something else", request=request)


def _redirect_loop(request: httpx.Request) -> httpx.Response:
    return httpx.Response(307, headers={"Location": str(request.url)})


@pytest.mark.parametrize(
    ("respond", "error"),
    [
        (_refused, UpstreamConnectionError),
        (_read_timeout, UpstreamTimeoutError),
        (_plain_request_error, UpstreamConnectionError),
        (_redirect_loop, UpstreamResponseError),
    ],
    ids=["connect", "read-timeout", "request-error", "redirects"],
)
async def test_the_httpx_transports_own_errors_are_upstream_errors(
    autojump_clock: Any, respond: Callable[[httpx.Request], httpx.Response], error: type[Exception]
) -> None:
    """The httpx path (proxies, HTTP/2) raises httpx's exceptions; they map to the same errors."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return respond(request)

    lm = OpenAICompatibleLM("m", api_base="http://upstream.test/v1", transport=httpx.MockTransport(handler))
    with pytest.raises(error):
        await lm.acall(messages=MESSAGES)
    await lm.aclose()


async def test_gzip_bodies_decode(autojump_clock: Any) -> None:
    body = gzip.compress(json.dumps(COMPLETION).encode())
    answer = http_response(200, body, headers={**JSON, "content-encoding": "gzip"})
    assert await openai_lm(lambda request: [answer]).acall(messages=MESSAGES) == ["ok"]


def test_http_settings_carry_every_timeout() -> None:
    settings = HTTPSettings(connect_timeout=1, read_timeout=2, write_timeout=3, pool_timeout=4)
    assert settings.httpx_timeout() == httpx.Timeout(connect=1, read=2, write=3, pool=4)


async def test_an_output_token_cap_is_sent_by_default_and_can_be_overridden(autojump_clock: Any) -> None:
    script = Scripted()
    await openai_lm(script).acall(messages=MESSAGES)
    await openai_lm(script, max_tokens=64).acall(messages=MESSAGES)
    await openai_lm(script).acall(messages=MESSAGES, max_tokens=8)
    assert [body["max_tokens"] for body in script.bodies] == [1024, 64, 8]


async def test_the_json_adapter_asks_openai_compatible_servers_for_json(autojump_clock: Any) -> None:
    import dspy

    answer = {"choices": [{"index": 0, "message": {"content": '{"answer": "ok"}'}, "finish_reason": "stop"}]}
    script = Scripted(success=answer)
    with dspy.context(lm=openai_lm(script), adapter=dspy.JSONAdapter()):
        prediction = await dspy.Predict("question -> answer").acall(question="q")
    with dspy.context(lm=openai_lm(script, response_format={"type": "text"}), adapter=dspy.JSONAdapter()):
        await dspy.Predict("question -> answer").acall(question="q")
    assert prediction.answer == "ok"
    assert [body["response_format"] for body in script.bodies] == [{"type": "json_object"}, {"type": "text"}]


async def test_the_chat_adapter_sends_no_response_format(autojump_clock: Any) -> None:
    import dspy

    answer = {
        "choices": [{"index": 0, "message": {"content": "[[ ## answer ## ]]\nok"}, "finish_reason": "stop"}]
    }
    script = Scripted(success=answer)
    with dspy.context(lm=openai_lm(script), adapter=dspy.ChatAdapter()):
        await dspy.Predict("question -> answer").acall(question="q")
    assert "response_format" not in script.bodies[0]


def _sse(*payloads: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads) + b"data: [DONE]\n\n"


async def test_a_stream_without_a_usage_chunk_reports_estimated_usage(autojump_clock: Any) -> None:
    chunks = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in ("one ", "two ", "three")]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})

    def handler(request: MockRequest) -> Reply:
        return [http_response(200, _sse(*chunks), headers={"content-type": "text/event-stream"})]

    class Sink:
        async def send(self, text: str) -> None:
            pass

    completion = await openai_lm(handler).complete(MESSAGES, {}, Sink())
    assert completion.usage["estimated"] is True
    assert completion.usage["completion_tokens"] > 0
    assert completion.usage["prompt_tokens"] > 0
    assert (
        completion.usage["total_tokens"]
        == completion.usage["prompt_tokens"] + completion.usage["completion_tokens"]
    )

    with_usage = [
        *chunks,
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}},
    ]

    def reporting(request: MockRequest) -> Reply:
        return [http_response(200, _sse(*with_usage), headers={"content-type": "text/event-stream"})]

    reported = await openai_lm(reporting).complete(MESSAGES, {}, Sink())
    assert reported.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
