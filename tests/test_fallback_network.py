"""Fallbacks over real sockets: two fake upstreams, one killed mid-stream (a real process, SIGKILL), and
the HTTP service naming the LM that answered (JSON, SSE final event, Server-Timing, /ready, /metrics)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from benchmarks._upstream import start_upstream
from dspy_trio.engine import (
    BreakerSettings,
    CallTimeouts,
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    LMConfig,
    OpenAISettings,
    ProgramSpec,
    RetryPolicy,
    SimulatedSettings,
    SkippedLM,
    open_engine,
)
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault, open_fake_upstream

from .web_helpers import running, settings

pytestmark = pytest.mark.network

QUESTION = {"question": "What is Trio?"}


def chain_config(primary_url: str, backup_url: str, **primary: Any) -> EngineConfig:
    primary.setdefault("retry", RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01))
    primary.setdefault("breaker", BreakerSettings(min_calls=2, failure_ratio=1.0, open_for=60.0))
    lms = {
        "primary": LMConfig(
            model="primary-model",
            settings=OpenAISettings(api_base=primary_url),
            fallbacks=("backup",),
            **primary,
        ),
        "backup": LMConfig(model="backup-model", settings=OpenAISettings(api_base=backup_url)),
    }
    return EngineConfig(lms=lms, programs={"default": ProgramSpec("question -> answer", lm="primary")})


@asynccontextmanager
async def killable_upstream() -> AsyncIterator[tuple[Any, str]]:
    """The fake upstream in a process of its own, streaming a token every 50 ms."""
    process, url = await trio.to_thread.run_sync(
        lambda: start_upstream(first_token_delay=0.0, token_delay=0.05, words=40)
    )
    try:
        yield process, url
    finally:
        process.kill()
        await trio.to_thread.run_sync(process.wait)
        if process.stdout is not None:
            process.stdout.close()


async def test_a_primary_killed_mid_stream_ends_that_stream_then_the_backup_takes_over() -> None:
    async with (
        killable_upstream() as (process, url),
        open_fake_upstream() as backup,
        open_engine(chain_config(url, backup.url)) as engine,
    ):
        events: list[Any] = []
        async with engine.stream("default", QUESTION) as stream:
            async for event in stream:
                events.append(event)
                if isinstance(event, FieldDelta) and process.poll() is None:
                    process.kill()  # SIGKILL mid-answer: the kernel closes its sockets
        deltas = [e for e in events if isinstance(e, FieldDelta)]
        assert deltas, "text arrived before the kill"
        assert isinstance(events[-1], ErrorEvent)
        assert events[-1].error.code == "upstream_connection_error"
        assert backup.records == []  # never spliced onto the answer already begun

        async with engine.stream("default", QUESTION) as stream:  # before any delta: falls back
            events = [event async for event in stream]
        assert isinstance(events[-1], FinalEvent)
        assert events[-1].result.lm_calls[0].skipped == (SkippedLM("primary", "connection"),)
        assert events[-1].result.lms == ("backup",)
        assert engine.statistics().breakers["primary"].state == "open"

        result = await engine.predict("default", QUESTION)
        assert result.lm_calls[0].skipped == (SkippedLM("primary", "breaker_open"),)
        assert len(backup.records) == 2
        assert engine.statistics().fallbacks == {
            ("primary", "backup", "connection"): 1,
            ("primary", "backup", "breaker_open"): 1,
        }


async def test_a_stalled_primary_is_cut_off_by_its_first_token_timeout() -> None:
    async with open_fake_upstream() as primary, open_fake_upstream() as backup:
        primary.add_faults(Fault("hang"), Fault("hang"))
        cfg = chain_config(
            primary.url,
            backup.url,
            timeouts=CallTimeouts(first_token=0.3),
            retry=RetryPolicy(max_attempts=1),
        )
        async with open_engine(cfg) as engine, engine.stream("default", QUESTION) as stream:
            events = [event async for event in stream]
        assert isinstance(events[-1], FinalEvent)
        assert events[-1].result.lm_calls[0].skipped == (SkippedLM("primary", "timeout"),)
        assert primary.records[0].client_closed_at is not None  # its connection was closed


async def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name = "message"
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append((name, json.loads(data) if data.startswith("{") else data))
            name = "message"
    return events


async def test_over_http_the_answer_names_the_lm_and_the_service_shows_its_breakers() -> None:
    async with open_fake_upstream() as primary, open_fake_upstream(Behavior(latency=0.0)) as backup:
        primary.add_faults(*[Fault("unavailable")] * 2)
        async with (
            running(settings(engine=chain_config(primary.url, backup.url))) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        ):
            response = await client.post("/v1/programs/default/predict", json={"inputs": QUESTION})
            assert response.status_code == 200
            body = response.json()
            assert set(body["usage"]["by_lm"]) == {"backup"}
            assert body["timings"]["lm_calls"][0]["lm"] == "backup"
            assert body["timings"]["lm_calls"][0]["skipped"] == [{"lm": "primary", "reason": "server_error"}]
            assert "lm;dur=" in response.headers["server-timing"]
            assert 'desc="backup"' in response.headers["server-timing"]

            ready = (await client.get("/ready")).json()
            assert ready["breakers"] == {"backup": "closed", "primary": "open"}

            async with client.stream(
                "POST", "/v1/programs/default/stream", json={"inputs": QUESTION}
            ) as streamed:
                events = await sse_events(streamed)
            final = dict(events)["final"]
            assert final["timings"]["lm_calls"][0]["skipped"] == [{"lm": "primary", "reason": "breaker_open"}]

            metrics = (await client.get("/metrics")).text
            assert 'dspy_trio_breaker_state{lm="primary"} 2.0' in metrics
            assert (
                'dspy_trio_fallbacks_total{from="primary",reason="server_error",to="backup"} 1.0' in metrics
            )
            assert (
                'dspy_trio_fallbacks_total{from="primary",reason="breaker_open",to="backup"} 1.0' in metrics
            )
            assert len(primary.records) == 2


async def test_over_http_an_open_breaker_without_a_fallback_is_a_503_with_retry_after(
    fake_upstream: FakeUpstream,
) -> None:
    lm = LMConfig(
        model="m",
        settings=OpenAISettings(api_base=fake_upstream.url),
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerSettings(min_calls=1, failure_ratio=1.0, open_for=30.0),
    )
    fake_upstream.add_faults(Fault("server_error"))
    async with (
        running(settings(engine=EngineConfig(lms={"default": lm}))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        first = await client.post("/v1/programs/default/predict", json={"inputs": QUESTION})
        assert first.status_code == 502
        second = await client.post("/v1/programs/default/predict", json={"inputs": QUESTION})
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "circuit_open"
        assert 25 <= int(second.headers["retry-after"]) <= 30
        assert len(fake_upstream.records) == 1


async def test_server_timing_names_any_lm_safely() -> None:
    """An LM's name is a TOML key, and a quoted key may hold a quote, a backslash or a newline: the
    Server-Timing header stays one valid header (a raw newline would fail the response)."""
    name = 'odd "lm"\\\nname'
    lm = LMConfig(settings=SimulatedSettings(first_token_delay=0.0, token_delay=0.0))
    engine = EngineConfig(lms={name: lm}, programs={"default": ProgramSpec("question -> answer", lm=name)})
    async with running(settings(engine=engine)) as server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/v1/programs/default/predict", json={"inputs": QUESTION})
    assert response.status_code == 200
    assert response.json()["timings"]["lm_calls"][0]["lm"] == name
    assert 'desc="odd \\"lm\\"\\\\name"' in response.headers["server-timing"]
