"""``stream_upstream``: non-streamed calls sent upstream as SSE streams, over real sockets (real clock),
and on the in-memory network for what a stream's events say (a choice cut mid-stream, an overload
reported after the 200).

Self-hosted servers (llama.cpp) stop generating when a stream's connection closes but finish a plain
request whose client left; with ``stream_upstream`` a cancelled predict closes a stream.
"""

from __future__ import annotations

import json
from typing import Any

import dspy
import h11
import pytest
import trio

from dspy_trio.engine import (
    AnthropicSettings,
    ConfigError,
    EngineConfig,
    LMConfig,
    OpenAISettings,
    RetryPolicy,
    UpstreamTimeoutError,
    open_engine,
)
from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
from dspy_trio.engine.lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM, TrioLM
from dspy_trio.engine.lm._base import GuardedLM
from dspy_trio.engine.testing import (
    Behavior,
    FakeUpstream,
    Fault,
    MockBackend,
    MockRequest,
    Reply,
    http_response,
    open_fake_upstream,
)

from .helpers import cancel_once_upstream_has_it, first_request_closed_by_client
from .transport_helpers import RawServer, open_raw_server, read_request

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Trio?"}]


def openai_lm(upstream: FakeUpstream, *, stream_upstream: bool) -> OpenAICompatibleLM:
    return OpenAICompatibleLM("openai/fake-model", api_base=upstream.url, stream_upstream=stream_upstream)


def anthropic_lm(upstream: FakeUpstream, *, stream_upstream: bool) -> AnthropicLM:
    return AnthropicLM(
        "anthropic/claude-test", api_key="sk-ant", api_base=upstream.url, stream_upstream=stream_upstream
    )


BACKENDS = [openai_lm, anthropic_lm]
IDS = ["openai", "anthropic"]


@pytest.mark.parametrize("make", BACKENDS, ids=IDS)
async def test_outputs_and_usage_equal_the_plain_path(fake_upstream: FakeUpstream, make: Any) -> None:
    results = []
    for stream_upstream in (False, True):
        lm = make(fake_upstream, stream_upstream=stream_upstream)
        with dspy.context(lm=lm), dspy.track_usage() as tracker:
            prediction = await dspy.Predict("question -> answer").acall(question="What is Trio?")
        await lm.aclose()
        results.append((prediction.toDict(), tracker.get_total_tokens()))
    plain, streamed = results
    assert plain == streamed
    assert plain[0]["answer"]
    [usage] = plain[1].values()
    assert usage["completion_tokens"] > 0
    first, second = fake_upstream.records
    assert "stream" not in first.body
    assert second.body["stream"] is True
    if make is openai_lm:
        assert second.body["stream_options"] == {"include_usage": True}


async def test_openai_without_a_usage_chunk_estimates_usage() -> None:
    """A server that ignores ``stream_options`` sends no usage: it is estimated, and marked so."""

    def handler(request: MockRequest) -> Reply:
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": "Hello "}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": "world"}, "finish_reason": "stop"}]},
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return [http_response(200, body.encode(), headers={"content-type": "text/event-stream"})]

    lm = OpenAICompatibleLM(
        "m", api_base="http://upstream.test/v1", network=MockBackend(handler), stream_upstream=True
    )
    with dspy.track_usage() as tracker:
        assert await lm.acall(messages=MESSAGES) == ["Hello world"]
    await lm.aclose()
    usage = tracker.get_total_tokens()["m"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] == 3  # 11 characters, ~4 a token


@pytest.mark.parametrize("make", BACKENDS, ids=IDS)
async def test_a_cancelled_call_closes_the_upstream_stream(make: Any) -> None:
    async with open_fake_upstream(Behavior(first_token_delay=0.05, token_delay=0.5)) as upstream:
        lm: TrioLM = make(upstream, stream_upstream=True)

        async def call() -> None:
            await lm.acall(messages=MESSAGES)

        cancelled_at = await cancel_once_upstream_has_it(upstream, call, tokens=1)
        record = await first_request_closed_by_client(upstream, cancelled_at)
        assert record.body["stream"] is True
        assert record.tokens_sent >= 1  # cut mid-generation, not before it started
        assert upstream.active_requests == 0
        await lm.aclose()


async def test_an_engine_deadline_closes_the_upstream_stream(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(first_token_delay=0.05, token_delay=0.5)
    lm = LMConfig(
        model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url, stream_upstream=True)
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:

        async def call() -> None:
            await engine.predict("default", {"question": "q"})

        cancelled_at = await cancel_once_upstream_has_it(fake_upstream, call, deadline=True)
        record = await first_request_closed_by_client(fake_upstream, cancelled_at)
    assert record.body["stream"] is True


async def test_a_stream_broken_mid_way_is_retried_for_predict(fake_upstream: FakeUpstream) -> None:
    """For predict no token reached the caller, so a stream whose connection breaks after some tokens
    is retried like a plain request whose connection broke (a streamed call is not: its tokens are the
    caller's). A malformed chunk is not retried, as a malformed plain body is not."""
    fake_upstream.add_faults(Fault("disconnect", after_tokens=3))
    lm = LMConfig(
        model="fake-model",
        retry=RetryPolicy(base_delay=0.0),
        settings=OpenAISettings(api_base=fake_upstream.url, stream_upstream=True),
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        result = await engine.predict("default", {"question": "q"})
    assert result.outputs["answer"]
    first, second = fake_upstream.records
    assert first.tokens_sent == 3
    assert first.completed_at is None
    assert second.body["stream"] is True
    assert second.completed_at is not None


def test_config_reads_stream_upstream_from_toml_and_env() -> None:
    table = {"provider": "openai", "model": "m", "api_base": "http://127.0.0.1:1/v1", "stream_upstream": True}
    assert LMConfig.from_mapping(table).settings.stream_upstream is True
    assert OpenAISettings(api_base="http://127.0.0.1:1/v1").stream_upstream is False
    env = {"LM_API_BASE": "http://127.0.0.1:1/v1", "LM_MODEL": "m", "LM_STREAM_UPSTREAM": "true"}
    assert EngineConfig.from_env(env).lms["default"].settings.stream_upstream is True
    env["LM_STREAM_UPSTREAM"] = "0"
    assert EngineConfig.from_env(env).lms["default"].settings.stream_upstream is False
    env["LM_STREAM_UPSTREAM"] = "maybe"
    with pytest.raises(ConfigError, match="LM_STREAM_UPSTREAM must be true or false"):
        EngineConfig.from_env(env)
    with pytest.raises(ConfigError, match="stream_upstream"):
        LMConfig.from_mapping({**table, "stream_upstream": "yes"})
    with pytest.raises(ConfigError, match="stream_upstream"):
        LMConfig.from_mapping({**table, "stream_upstream": False, "params": {"stream_upstream": True}})


@pytest.mark.parametrize("provider", ["simulated", "dspy"])
def test_stream_upstream_on_a_provider_without_it_is_a_config_error(provider: str) -> None:
    with pytest.raises(ConfigError, match=f"applies to the openai and anthropic providers, not {provider}"):
        LMConfig.from_mapping(
            {
                "provider": provider,
                "model": "openai/m",
                "api_base": "http://127.0.0.1:1/v1",
                "stream_upstream": True,
            }
        )
    with pytest.raises(ConfigError, match="LM_STREAM_UPSTREAM"):
        EngineConfig.from_env({"LM_STREAM_UPSTREAM": "true"})  # the default LM is the simulated one


def test_the_settings_pass_stream_upstream_to_the_backend() -> None:
    config = LMConfig(
        model="m", settings=OpenAISettings(api_base="http://127.0.0.1:1/v1", stream_upstream=True)
    )
    assert config.build_lm().stream_upstream is True
    config = LMConfig(model="m", settings=AnthropicSettings(api_key="k", stream_upstream=True))
    assert config.build_lm().stream_upstream is True


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_first_token_and_stall_timeouts_watch_a_predict_sent_as_a_stream(
    autojump_clock: Any, transport: str
) -> None:
    """An upstream that answers ``200 text/event-stream`` and then only ``: keep-alive`` comments, one a
    second, forever: a read timeout never fires (bytes keep coming). With ``first_token = 5`` the call
    must fail at exactly 5 s, as the same call with a stream consumer does."""

    async def keep_alives(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        while True:
            await stream.send_all(b": keep-alive\n\n")
            await trio.sleep(1)

    async with open_raw_server(keep_alives) as server:
        backend = OpenAICompatibleLM(
            "fake",
            api_base=server.url,
            http=HTTPSettings(client=transport, read_timeout=10.0),  # type: ignore[arg-type]
            stream_upstream=True,
        )
        policy = UpstreamPolicy(first_token_timeout=5.0, stall_timeout=5.0, retry=RetryPolicy(max_attempts=1))
        lm = GuardedLM(backend, UpstreamGuard("fake", policy))
        started = trio.current_time()
        error: Exception | None = None
        with trio.move_on_after(100):  # the caller's deadline
            try:
                await lm.complete(MESSAGES, {}, None)
            except UpstreamTimeoutError as exc:
                error = exc
        await backend.aclose()
    assert error is not None, "the keep-alives held the call until the caller's deadline"
    assert trio.current_time() - started == 5.0


def _sse(*events: dict[str, Any] | str) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


async def test_stream_upstream_with_two_choices_does_not_accept_a_stream_cut_mid_choice(
    autojump_clock: Any,
) -> None:
    """With ``n=2``, a stream cut after choice 0 finished but while choice 1 was still being written (no
    [DONE], no finish for choice 1) is the "stream ended before completion" error (which the guard
    retries), not a successful completion whose second answer is silently truncated: the stream is
    complete only when every choice has a finish_reason."""
    from dspy_trio.engine import UpstreamConnectionError

    body = _sse(
        {"choices": [{"index": 0, "delta": {"content": "full answer"}, "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {"content": "trunc"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    )  # the connection ends here: choice 1 never finished, no usage chunk, no [DONE]

    def handler(request: MockRequest) -> Reply:
        return [http_response(200, body, headers={"Content-Type": "text/event-stream"})]

    lm = OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", network=MockBackend(handler), stream_upstream=True
    )
    outcome: Any
    try:
        outcome = await lm.complete([{"role": "user", "content": "q"}], {"n": 2}, None)
    except UpstreamConnectionError as exc:
        outcome = exc
    assert isinstance(outcome, UpstreamConnectionError), f"accepted truncated choices: {outcome.texts!r}"


async def test_stream_upstream_retries_an_overload_the_server_reports_in_the_stream(
    autojump_clock: Any,
) -> None:
    """README: with ``stream_upstream`` "retries are unchanged" and the completion is the one a plain
    call returns. A server that reports an overload after the 200 (an SSE error event with ``code: 503``,
    as llama.cpp's server and OpenRouter do for streams) is retried like the same overload on the plain
    path (HTTP 503), not turned into a non-retryable UpstreamResponseError. Nothing had reached the
    caller, so the retry is safe."""
    from dspy_trio.engine import RetryPolicy

    calls: list[int] = []
    overloaded = _sse(
        {"error": {"message": "server overloaded, try later", "type": "server_error", "code": 503}}
    )
    answer = _sse(
        {"choices": [{"index": 0, "delta": {"content": "[[ ## answer ## ]]\nok"}, "finish_reason": "stop"}]},
        "[DONE]",
    )

    def handler(request: MockRequest) -> Reply:
        calls.append(1)
        content = overloaded if len(calls) == 1 else answer
        return [http_response(200, content, headers={"Content-Type": "text/event-stream"})]

    lm = OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", network=MockBackend(handler), stream_upstream=True
    )
    config = EngineConfig(lms={"default": LMConfig(retry=RetryPolicy(base_delay=0.0))})
    async with open_engine(config, lms={"default": lm}) as engine:
        result = await engine.predict("default", {"question": "q"})
    assert result.outputs["answer"] == "ok"
    assert len(calls) == 2
