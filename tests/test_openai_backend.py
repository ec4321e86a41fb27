"""The Trio-native OpenAI-compatible backend against the fake upstream, over real sockets (real clock)."""

from __future__ import annotations

import functools
import threading
from typing import Any

import dspy
import pytest
import trio

from dspy_trio.engine import (
    EngineConfig,
    LMConfig,
    OpenAISettings,
    UpstreamConnectionError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
    open_engine,
)
from dspy_trio.engine.lm import HTTPSettings, OpenAICompatibleLM
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault

from .helpers import cancel_once_upstream_has_it, first_request_closed_by_client

MESSAGES = [{"role": "user", "content": "What is Trio?"}]


def lm_for(upstream: FakeUpstream, **http: Any) -> OpenAICompatibleLM:
    return OpenAICompatibleLM(
        "openai/fake-model", api_base=upstream.url, api_key="sk-test", http=HTTPSettings(**http)
    )


async def test_completion_request_shape_and_usage(fake_upstream: FakeUpstream) -> None:
    lm = lm_for(fake_upstream)
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        prediction = await dspy.Predict("question -> answer").acall(question="What is Trio?")
    await lm.aclose()
    assert prediction.answer
    [record] = fake_upstream.records
    assert record.body["model"] == "fake-model"
    assert [m["role"] for m in record.body["messages"]] == ["system", "user"]
    assert "stream" not in record.body
    assert tracker.get_total_tokens()["openai/fake-model"]["completion_tokens"] > 0


async def test_streaming_pushes_deltas_and_returns_the_whole_text(fake_upstream: FakeUpstream) -> None:
    lm = lm_for(fake_upstream)
    send, receive = trio.open_memory_channel[Any](10_000)
    with dspy.context(send_stream=send):
        [text] = await lm.acall(messages=MESSAGES)
    await lm.aclose()
    send.close()
    deltas = [chunk.choices[0].delta.content async for chunk in receive]
    assert len(deltas) > 5
    assert "".join(deltas) == text
    [record] = fake_upstream.records
    assert record.body["stream"] is True
    assert record.tokens_sent == len(deltas)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [
        (Fault("rate_limit", retry_after=7), UpstreamRateLimitedError, "HTTP 429"),
        (Fault("server_error"), UpstreamServerError, "HTTP 500"),
        (Fault("unavailable"), UpstreamServerError, "HTTP 503"),
        (Fault("malformed", after_tokens=2), UpstreamResponseError, "not valid JSON"),
        (Fault("disconnect", after_tokens=2), UpstreamConnectionError, "fake-model"),
    ],
    ids=["429", "500", "503", "malformed", "disconnect"],
)
async def test_faults_map_to_typed_errors(
    fake_upstream: FakeUpstream, fault: Fault, error: type[Exception], match: str, stream: bool
) -> None:
    lm = lm_for(fake_upstream)
    fake_upstream.add_faults(fault)
    send, _receive = trio.open_memory_channel[Any](10_000)
    with pytest.raises(error, match=match), dspy.context(send_stream=send if stream else None):
        await lm.acall(messages=MESSAGES)
    await lm.aclose()


async def test_retry_after_is_kept_as_a_number_ms_header_first(fake_upstream: FakeUpstream) -> None:
    lm = lm_for(fake_upstream)
    fake_upstream.add_faults(
        Fault("rate_limit", retry_after=2), Fault("rate_limit", retry_after=2, retry_after_ms=1500)
    )
    for expected in (2.0, 1.5):
        with pytest.raises(UpstreamRateLimitedError) as info:
            await lm.acall(messages=MESSAGES)
        assert info.value.retry_after == expected
        assert info.value.status == 429
    await lm.aclose()


async def test_a_silent_upstream_hits_the_read_timeout(fake_upstream: FakeUpstream) -> None:
    lm = lm_for(fake_upstream, read_timeout=0.2)
    fake_upstream.add_faults(Fault("hang"))
    with pytest.raises(UpstreamTimeoutError):
        await lm.acall(messages=MESSAGES)
    await lm.aclose()


async def test_connection_refused_is_a_connection_error() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    lm = OpenAICompatibleLM("m", api_base=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(UpstreamConnectionError):
        await lm.acall(messages=MESSAGES)
    await lm.aclose()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_cancel_closes_the_upstream_connection(stream: bool) -> None:
    from dspy_trio.engine.testing import open_fake_upstream

    async with open_fake_upstream(Behavior(latency=30, first_token_delay=0.0, token_delay=0.5)) as upstream:
        lm = lm_for(upstream)
        send, _receive = trio.open_memory_channel[Any](10_000)

        async def call() -> None:
            with dspy.context(send_stream=send if stream else None):
                await lm.acall(messages=MESSAGES)

        cancelled_at = await cancel_once_upstream_has_it(upstream, call)
        await first_request_closed_by_client(upstream, cancelled_at)
        assert len(upstream.records) == 1
        assert upstream.active_requests == 0
        await lm.aclose()


async def test_engine_deadline_closes_the_upstream_connection(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(latency=30)
    lm = LMConfig(model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url))
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:

        async def call() -> None:
            await engine.predict("default", {"question": "q"})

        cancelled_at = await cancel_once_upstream_has_it(fake_upstream, call, deadline=True)
        await first_request_closed_by_client(fake_upstream, cancelled_at)
        stats = engine.statistics()
        assert (stats.timed_out, stats.in_flight) == (1, 0)


async def test_500_concurrent_predictions_complete_on_one_os_thread(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(latency=0.5)
    threads_before = threading.active_count()
    lm = LMConfig(model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url))
    results = []
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:

        async def one(i: int) -> None:
            results.append(await engine.predict("default", {"question": f"question {i}"}))

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(one, i)
            with trio.fail_after(30):
                await fake_upstream.wait_for(lambda u: u.active_requests >= 100)
            assert threading.active_count() <= threads_before  # no new thread; an older one may end
        assert engine.statistics().succeeded == 500
    assert len({r.outputs["answer"] for r in results}) > 1
    assert len(fake_upstream.records) == 500
    assert threading.active_count() <= threads_before  # no new thread; an older one may end


@pytest.mark.parametrize("stream", [False, True])
async def test_a_requests_lm_params_reach_every_call_over_the_lms_own(
    fake_upstream: FakeUpstream, stream: bool
) -> None:
    """``lm_params`` of a request win over the LM's defaults (``max_tokens=1024``, a configured
    temperature); an answer cut at ``max_tokens`` (``finish_reason: length``) marks the result
    ``truncated``, streamed or not."""
    lm = OpenAICompatibleLM("openai/m", api_base=fake_upstream.url, temperature=0.9)
    config = EngineConfig(lms={"default": LMConfig()})
    params = {"temperature": 0.1, "max_tokens": 10, "stop": ["\n\n\n"], "seed": 7}
    async with open_engine(config, lms={"default": lm}) as engine:
        plain = await engine.predict("default", {"question": "q"})
        if stream:
            async with engine.stream("default", {"question": "q"}, lm_params=params) as events:
                cut = [event async for event in events][-1].result  # type: ignore[union-attr]
        else:
            cut = await engine.predict("default", {"question": "q"}, lm_params=params)
    first, second = (record.body for record in fake_upstream.records)
    assert (first["temperature"], first["max_tokens"]) == (0.9, 1024)
    assert {key: second[key] for key in params} == params
    assert not plain.truncated
    assert cut.truncated
    assert len(cut.outputs["answer"].split()) == 5  # the 5 words after "[[ ## answer ## ]]\n"


async def test_lm_params_belong_to_their_request_only(fake_upstream: FakeUpstream) -> None:
    """Two requests at once, one with parameters: the other's calls carry none of them."""
    lm = OpenAICompatibleLM("openai/m", api_base=fake_upstream.url)
    config = EngineConfig(lms={"default": LMConfig()})
    async with open_engine(config, lms={"default": lm}) as engine, trio.open_nursery() as nursery:
        nursery.start_soon(engine.predict, "default", {"question": "a"})
        nursery.start_soon(
            functools.partial(engine.predict, "default", {"question": "b"}, lm_params={"seed": 1})
        )
    records = fake_upstream.records
    seeds = {r.body["messages"][-1]["content"].split("\n")[1]: r.body.get("seed") for r in records}
    assert seeds == {"a": None, "b": 1}
