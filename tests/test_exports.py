"""The public API is exactly what engine/__init__.py re-exports."""

import types

import pytest

from dspy_trio import engine


def test_engine_public_names_are_pinned() -> None:
    assert sorted(engine.__all__) == [
        "AdaptiveSettings",
        "AnthropicSettings",
        "BatchItem",
        "BreakerSettings",
        "BudgetExceededError",
        "BudgetLimit",
        "CacheConfig",
        "CallTimeouts",
        "CircuitOpenError",
        "ClusterUnavailableError",
        "ConfigError",
        "DSPySettings",
        "DeadlineExceededError",
        "DeadlineUnmeetableError",
        "Engine",
        "EngineClosedError",
        "EngineConfig",
        "EngineError",
        "EngineStatistics",
        "ErrorEvent",
        "EventStream",
        "FieldDelta",
        "FinalEvent",
        "GCSettings",
        "HTTPSettings",
        "InputField",
        "InvalidInputError",
        "LMCall",
        "LMConfig",
        "OpenAISettings",
        "OutputField",
        "OverloadedError",
        "PredictionResult",
        "Price",
        "ProgramError",
        "ProgramInfo",
        "ProgramSpec",
        "RateLimit",
        "RateLimitWaitError",
        "RequestAbandonedError",
        "RequestCancelledError",
        "RetryPolicy",
        "SharingStatistics",
        "SimulatedSettings",
        "SkippedLM",
        "SlowConsumerError",
        "StatusEvent",
        "StreamEvent",
        "StreamOptions",
        "TenantConfig",
        "TenantOverloadedError",
        "TenantRateLimitedError",
        "TenantStatistics",
        "Timings",
        "UnknownProgramError",
        "UpstreamConnectionError",
        "UpstreamContextWindowError",
        "UpstreamError",
        "UpstreamRateLimitedError",
        "UpstreamResponseError",
        "UpstreamServerError",
        "UpstreamStatistics",
        "UpstreamTimeoutError",
        "Usage",
        "open_engine",
        "tune_gc_for_serving",
    ]
    for name in set(engine.__all__) - {"StreamEvent"}:  # StreamEvent is a union alias
        assert getattr(engine, name).__module__.startswith("dspy_trio.engine")


def test_every_error_is_an_engine_error() -> None:
    errors = [getattr(engine, n) for n in engine.__all__ if n.endswith("Error")]
    assert all(issubclass(e, engine.EngineError) for e in errors)
    assert len({e.code for e in errors}) == len(errors), "each error has its own code"


def test_lm_public_names_are_pinned() -> None:
    assert sorted(engine.lm.__all__) == [
        "AnthropicLM",
        "AnthropicSettings",
        "ChunkSink",
        "Completion",
        "DSPySettings",
        "DeltaSink",
        "GuardedLM",
        "HTTPSettings",
        "OpenAICompatibleLM",
        "OpenAISettings",
        "ProviderSettings",
        "SimulatedLM",
        "SimulatedSettings",
        "ThreadedLM",
        "TrioLM",
    ]


def test_testing_public_names_are_pinned() -> None:
    assert sorted(engine.testing.__all__) == [
        "Behavior",
        "EOF",
        "FakeUpstream",
        "Fault",
        "IdleClose",
        "MockBackend",
        "MockRequest",
        "Reply",
        "RequestRecord",
        "http_response",
        "open_fake_upstream",
    ]


@pytest.mark.parametrize("module", [engine, engine.lm, engine.testing], ids=lambda m: m.__name__)
def test_every_public_name_resolves_and_nothing_public_is_unlisted(module: types.ModuleType) -> None:
    for name in module.__all__:
        assert hasattr(module, name)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(module.__all__), f"{module.__name__} exposes unlisted names"


def test_no_public_api_returns_an_unexported_statistics_type() -> None:
    import typing

    hints = typing.get_type_hints(engine.EngineStatistics)
    for hint in hints.values():
        name = getattr(hint, "__name__", "")
        if name.endswith("Statistics"):
            assert name in engine.__all__


def test_engine_never_imports_the_web_layer() -> None:
    import pathlib

    root = pathlib.Path(engine.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import web", "from web", "quart", "hypercorn"):
            assert banned not in text, f"{path} mentions {banned!r}"


async def test_an_engine_comes_only_from_open_engine() -> None:
    with pytest.raises(TypeError, match="no public constructor; use open_engine"):
        engine.Engine(engine.EngineConfig(), {}, None)  # type: ignore[arg-type]
    async with engine.open_engine(engine.EngineConfig()) as opened:
        assert isinstance(opened, engine.Engine)


def test_dead_code_is_gone() -> None:
    assert not hasattr(engine.EngineConfig, "uses_simulated_lm")
