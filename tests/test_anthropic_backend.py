"""The Anthropic Messages API backend against the fake upstream's Anthropic mode, over real sockets; its
usage and token estimates on the in-memory network."""

from __future__ import annotations

import json
from typing import Any

import dspy
import h11
import pytest
import trio

from dspy_trio.engine import (
    AnthropicSettings,
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    LMConfig,
    RetryPolicy,
    UpstreamConnectionError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine.lm import AnthropicLM, GuardedLM, HTTPSettings
from dspy_trio.engine.lm.anthropic import to_messages_api
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault, http_response

from .helpers import cancel_once_upstream_has_it, first_request_closed_by_client
from .scripted_upstream import Scripted, anthropic_lm
from .transport_helpers import RawServer, open_raw_server, read_request, wait_closed

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first"},
    {"role": "user", "content": "second"},
]
ONE_QUESTION = [{"role": "user", "content": "What is Trio?"}]


def anthropic(upstream: FakeUpstream) -> AnthropicLM:
    return AnthropicLM("anthropic/claude-test", api_key="sk-ant", api_base=upstream.url)


def test_chat_messages_map_to_system_and_alternating_turns() -> None:
    system, turns = to_messages_api([*MESSAGES, {"role": "assistant", "content": "ok"}])
    assert system == "Be brief."
    assert turns == [{"role": "user", "content": "first\n\nsecond"}, {"role": "assistant", "content": "ok"}]


async def test_a_message_request_and_its_usage(fake_upstream: FakeUpstream) -> None:
    lm = anthropic(fake_upstream)
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        prediction = await dspy.Predict("question -> answer").acall(question="What is Trio?")
    await lm.aclose()
    assert prediction.answer
    [record] = fake_upstream.records
    assert record.path == "/v1/messages"
    assert record.body["model"] == "claude-test"
    assert record.body["max_tokens"] == 1024
    assert "system" in record.body
    assert [m["role"] for m in record.body["messages"]] == ["user"]
    usage = tracker.get_total_tokens()["anthropic/claude-test"]
    assert usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] > 0


async def test_streaming_through_the_engine(fake_upstream: FakeUpstream) -> None:
    lm = LMConfig(model="claude-test", settings=AnthropicSettings(api_base=fake_upstream.url, api_key="k"))
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        async with engine.stream("default", {"question": "q"}) as events:
            received = [event async for event in events]
        result = await engine.predict("default", {"question": "q"})
    assert isinstance(received[-1], FinalEvent)
    text = "".join(e.text for e in received if isinstance(e, FieldDelta))
    assert text == received[-1].result.outputs["answer"]
    assert received[-1].result.usage.completion_tokens == fake_upstream.records[0].tokens_sent
    assert result.outputs["answer"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [
        (Fault("rate_limit", retry_after=4), UpstreamRateLimitedError, "HTTP 429"),
        (Fault("overloaded"), UpstreamServerError, "HTTP 529"),
        (Fault("server_error"), UpstreamServerError, "HTTP 500"),
        (Fault("malformed", after_tokens=2), UpstreamResponseError, "not valid JSON"),
        (Fault("disconnect", after_tokens=2), UpstreamConnectionError, "claude-test"),
    ],
    ids=["429", "529", "500", "malformed", "disconnect"],
)
async def test_faults_map_to_the_same_typed_errors(
    fake_upstream: FakeUpstream, fault: Fault, error: type[Exception], match: str, stream: bool
) -> None:
    lm = anthropic(fake_upstream)
    fake_upstream.add_faults(fault)
    send, _receive = trio.open_memory_channel[Any](10_000)
    with pytest.raises(error, match=match) as info, dspy.context(send_stream=send if stream else None):
        await lm.acall(messages=MESSAGES)
    if fault.kind == "rate_limit":
        assert info.value.retry_after == 4  # type: ignore[attr-defined]
    await lm.aclose()


async def test_retries_and_stream_errors_go_through_the_engines_policies(fake_upstream: FakeUpstream) -> None:
    fake_upstream.add_faults(Fault("overloaded"))
    lm = LMConfig(
        model="claude-test",
        retry=RetryPolicy(base_delay=0.01),
        settings=AnthropicSettings(api_base=fake_upstream.url, api_key="k"),
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        result = await engine.predict("default", {"question": "q"})
        assert result.attempts == 2
        fake_upstream.add_faults(Fault("disconnect", after_tokens=3))
        async with engine.stream("default", {"question": "q"}) as events:
            last = [event async for event in events][-1]
    assert isinstance(last, ErrorEvent)
    assert isinstance(last.error, UpstreamConnectionError)


async def test_cancel_closes_the_connection(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(latency=30)
    lm = anthropic(fake_upstream)

    async def call() -> None:
        await lm.acall(messages=MESSAGES)

    cancelled_at = await cancel_once_upstream_has_it(fake_upstream, call)
    await first_request_closed_by_client(fake_upstream, cancelled_at)
    await lm.aclose()


def test_anthropic_from_the_environment() -> None:
    config = EngineConfig.from_env(
        {"LM_PROVIDER": "anthropic", "LM_MODEL": "claude-x", "ANTHROPIC_API_KEY": "a"}
    )
    lm = config.lms["default"]
    settings = lm.settings
    assert isinstance(settings, AnthropicSettings)
    assert (lm.provider, lm.model, settings.api_key, settings.api_base) == (
        "anthropic",
        "claude-x",
        "a",
        "https://api.anthropic.com",
    )


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_a_rate_limit_reported_mid_stream_is_a_rate_limit_as_on_the_openai_backend(
    transport: str,
) -> None:
    """The backends' errors map alike, so that the engine's retry, cool-down and rate-limit policies
    apply unchanged: Anthropic's ``rate_limit_error`` event after the 200 is a rate limit."""

    def event(name: str, payload: str) -> bytes:
        return f"event: {name}\ndata: {payload}\n\n".encode()

    body = event("message_start", '{"type": "message_start", "message": {"usage": {"input_tokens": 3}}}')
    body += event("error", '{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}')

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
        await stream.send_all(head % len(body) + body)
        await wait_closed(stream)

    class Sink:
        async def send(self, text: str) -> None:
            pass

    async with open_raw_server(handle) as server:
        http = HTTPSettings(client=transport)  # type: ignore[arg-type]
        lm = AnthropicLM("claude-test", api_key="sk-ant", api_base=server.url, http=http)
        with pytest.raises(UpstreamRateLimitedError):
            await lm.complete(MESSAGES, {}, Sink())
        await lm.aclose()


async def test_an_anthropic_stream_without_usage_reports_estimated_usage(autojump_clock: Any) -> None:
    """ "Streams without a usage chunk report estimated usage" holds for the Anthropic backend as for the
    OpenAI one: an estimate marked ``estimated``, not 0 tokens."""
    events = [
        {"type": "message_start", "message": {}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a fairly long answer"}},
        {"type": "message_stop"},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)

    class Sink:
        async def send(self, text: str) -> None:
            pass

    lm = anthropic_lm(
        lambda request: [http_response(200, body, headers={"content-type": "text/event-stream"})]
    )
    completion = await lm.complete(ONE_QUESTION, {}, Sink())
    assert completion.texts == ["a fairly long answer"]
    assert completion.usage.get("estimated") is True
    assert completion.usage["completion_tokens"] > 0


class RecordingGuard:
    """A CallGuard that records the token estimate of each call and runs it once."""

    def __init__(self) -> None:
        self.estimates: list[float] = []

    async def call(self, attempt: Any, sink: Any, *, estimate: float, streamed: bool = False) -> Any:
        self.estimates.append(estimate)
        return await attempt(sink)


async def test_the_tpm_estimate_counts_the_output_cap_actually_sent(autojump_clock: Any) -> None:
    """The Anthropic backend always sends max_tokens = 1024, though it is not in the LM's kwargs: the TPM
    bucket is charged for that cap (as the OpenAI backend, which setdefaults max_tokens, is), not the
    prompt + 512 of estimate_tokens' default."""
    script = Scripted(success={"content": [{"type": "text", "text": "ok"}], "usage": {}})
    lm = anthropic_lm(script)
    guard = RecordingGuard()
    await GuardedLM(lm, guard).acall(messages=[{"role": "user", "content": "hi"}])
    assert script.bodies[0]["max_tokens"] == 1024
    assert guard.estimates[0] >= 1024
