"""Metrics, request logs and spans agree with what clients observed."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from prometheus_client import generate_latest

from dspy_trio.engine import (
    EngineConfig,
    FinalEvent,
    LMConfig,
    OverloadedError,
    ProgramSpec,
    RequestCancelledError,
    RetryPolicy,
    SimulatedSettings,
    UpstreamServerError,
    open_engine,
)

from .helpers import CountingLM, FailingLM

MODEL = "simulated/lm"


def sample(engine: Any, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def test_counters_and_histograms_match_a_scripted_mix_of_outcomes(autojump_clock: Any) -> None:
    ok_lm, bad_lm = (
        CountingLM(first_token_delay=1.0),
        FailingLM(UpstreamServerError("x", status=500), delay=0.5),
    )
    config = EngineConfig(
        lms={"default": LMConfig(), "bad": LMConfig(retry=RetryPolicy(max_attempts=1))},
        programs={
            "default": ProgramSpec("question -> answer"),
            "bad": ProgramSpec("question -> answer", lm="bad"),
        },
        max_in_flight=2,
        max_queued=1,
    )
    observed: dict[str, int] = {
        "succeeded": 0,
        "failed": 0,
        "timed_out": 0,
        "cancelled": 0,
        "rejected": 0,
        "invalid": 0,
    }
    tokens = [0, 0]
    async with open_engine(config, lms={"default": ok_lm, "bad": bad_lm}) as engine:
        for _ in range(3):
            result = await engine.predict("default", {"question": "q"})
            observed["succeeded"] += 1
            tokens[0] += result.usage.prompt_tokens
            tokens[1] += result.usage.completion_tokens
        for _ in range(2):
            with pytest.raises(UpstreamServerError):
                await engine.predict("bad", {"question": "q"})
            observed["failed"] += 1
        with trio.move_on_after(0.5):
            await engine.predict("default", {"question": "q"})
        observed["timed_out"] += 1
        for _ in range(2):
            with pytest.raises(Exception):  # noqa: B017, PT011
                await engine.predict("default", {"wrong": "q"})
            observed["invalid"] += 1
        cancelled: list[RequestCancelledError] = []

        async def fill(i: int) -> None:
            try:
                await engine.predict("default", {"question": f"fill {i}"}, request_id=f"fill-{i}")
            except RequestCancelledError as exc:
                cancelled.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(3):  # fill both slots and the one queue place
                nursery.start_soon(fill, i)
                await trio.lowlevel.checkpoint()
            await trio.sleep(0.1)
            with pytest.raises(OverloadedError):
                await engine.predict("default", {"question": "refused"})
            observed["rejected"] += 1
            assert engine.cancel("fill-2")  # the queued one
            observed["cancelled"] += 1
        observed["succeeded"] += 2

        for outcome, count in observed.items():
            program = "bad" if outcome == "failed" else "default"
            assert (
                sample(engine, "dspy_trio_requests_total", program=program, model=MODEL, outcome=outcome)
                == count
            ), outcome
        ran = observed["succeeded"] + observed["timed_out"]  # the cancelled one never left the queue
        assert sample(engine, "dspy_trio_request_seconds_count", program="default", model=MODEL) == ran
        assert sample(engine, "dspy_trio_request_seconds_count", program="bad", model=MODEL) == 2
        assert (
            sample(engine, "dspy_trio_errors_total", program="bad", model=MODEL, code="upstream_server_error")
            == 2
        )
        assert (
            sample(engine, "dspy_trio_errors_total", program="default", model=MODEL, code="overloaded") == 1
        )
        assert sample(engine, "dspy_trio_errors_total", program="default", model=MODEL, code="cancelled") == 1
        assert (
            sample(engine, "dspy_trio_tokens_total", program="default", model=MODEL, direction="in")
            >= tokens[0]
        )
        assert sample(engine, "dspy_trio_lm_seconds_sum", program="default", model=MODEL) == pytest.approx(
            3 + 0.5 + 2
        )
        assert sample(engine, "dspy_trio_in_flight") == 0
        assert len(cancelled) == 1


async def test_each_engine_has_its_own_registry() -> None:
    fast = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))}
    )
    async with open_engine(fast) as one, open_engine(fast) as two:
        await one.predict("default", {"question": "q"})
        assert (
            sample(one, "dspy_trio_requests_total", program="default", model=MODEL, outcome="succeeded") == 1
        )
        assert (
            sample(two, "dspy_trio_requests_total", program="default", model=MODEL, outcome="succeeded") == 0
        )
        assert b"dspy_trio_requests_total" in generate_latest(two.metrics.registry)


async def test_time_to_first_token_is_observed_per_field(autojump_clock: Any) -> None:
    config = EngineConfig(
        lms={"default": LMConfig()},
        programs={"default": ProgramSpec("question -> answer", module="chain_of_thought")},
    )
    lm = CountingLM(first_token_delay=0.25, token_delay=0.01)
    async with open_engine(config, lms={"default": lm}) as engine:
        async with engine.stream("default", {"question": "q"}) as events:
            assert isinstance([e async for e in events][-1], FinalEvent)
        for field in ("reasoning", "answer"):
            count = sample(
                engine,
                "dspy_trio_time_to_first_token_seconds_count",
                program="default",
                model=MODEL,
                field=field,
            )
            assert count == 1
        first = sample(
            engine,
            "dspy_trio_time_to_first_token_seconds_sum",
            program="default",
            model=MODEL,
            field="reasoning",
        )
        assert 0.25 < first < 0.4


async def test_one_json_log_line_per_request_without_text_unless_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fast = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))
    caplog.set_level(logging.INFO, logger="dspy_trio.engine.requests")
    async with open_engine(EngineConfig(lms={"default": fast})) as engine:
        await engine.predict("default", {"question": "secret question"}, request_id="log-1")
    async with open_engine(EngineConfig(lms={"default": fast}, log_text=True)) as engine:
        await engine.predict("default", {"question": "shared question"}, request_id="log-2")
    lines = [json.loads(r.message) for r in caplog.records if r.name == "dspy_trio.engine.requests"]
    assert [line["request_id"] for line in lines] == ["log-1", "log-2"]
    first, second = lines
    assert first["outcome"] == "succeeded"
    assert first["program"] == "default"
    assert {"queued_ms", "lm_ms", "total_ms", "prompt_tokens", "completion_tokens", "attempts"} <= set(first)
    assert "secret question" not in json.dumps(first)
    assert second["inputs"] == {"question": "shared question"}
    assert second["outputs"]["answer"]


async def test_spans_wrap_requests_and_lm_attempts_with_the_request_id() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    fast = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))
    async with open_engine(EngineConfig(lms={"default": fast})) as engine:
        await engine.predict("default", {"question": "q"}, request_id="span-1")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request, attempt = spans["dspy_trio.predict"], spans["dspy_trio.lm_attempt"]
    assert request.attributes["request_id"] == "span-1"
    assert attempt.parent is not None
    assert attempt.parent.span_id == request.context.span_id


def test_no_span_objects_are_made_when_no_tracer_provider_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace

    from dspy_trio.engine import _telemetry

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    made = _telemetry.span("dspy_trio.predict", request_id="r")
    assert made is _telemetry.span("dspy_trio.lm_attempt", upstream="u")  # one shared no-op context
    with made as current:
        assert current is None


def test_no_tracer_provider_is_seen_without_asking_opentelemetry_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no provider set (nor named in the environment), ``span`` fetches no provider object and
    makes nothing; a provider set later is seen at once."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from dspy_trio.engine import _telemetry

    def must_not_be_called() -> Any:
        raise AssertionError("get_tracer_provider called on the hot path")

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)
    monkeypatch.setattr(trace, "get_tracer_provider", must_not_be_called)
    assert _telemetry.span("dspy_trio.predict") is _telemetry._NO_SPAN
    provider = TracerProvider()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert _telemetry.span("dspy_trio.predict") is not _telemetry._NO_SPAN


def test_a_tracer_provider_named_in_the_environment_is_still_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from dspy_trio.engine import _telemetry

    provider = TracerProvider()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert _telemetry.span("dspy_trio.predict") is not _telemetry._NO_SPAN


def test_a_tracer_provider_named_in_the_environment_after_import_makes_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``OTEL_PYTHON_TRACER_PROVIDER`` set after ``dspy_trio.engine`` was imported (an application setting up
    its environment in ``main()``): OpenTelemetry's own ``get_tracer_provider()`` loads the SDK's
    provider from it, so stock code traces, and so does ``span()`` (reading the variable once at
    import would leave it the do-nothing context: the requests never traced)."""
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    from dspy_trio.engine import _telemetry

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")
    with _telemetry.span("dspy_trio.predict", request_id="env-1") as current:
        made, recording = current, current is not None and current.is_recording()
    assert not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert made is not None, "span() made no span although a tracer provider is configured"
    assert recording
