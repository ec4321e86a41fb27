"""The public API is exactly what engine/__init__.py re-exports."""

import engine
import engine.lm
import engine.testing


def test_engine_public_names_are_pinned() -> None:
    assert sorted(engine.__all__) == [
        "AdmissionStatistics",
        "BatchItem",
        "ConfigError",
        "DeadlineExceededError",
        "Engine",
        "EngineClosedError",
        "EngineConfig",
        "EngineError",
        "EngineStatistics",
        "ErrorEvent",
        "EventStream",
        "FieldDelta",
        "FinalEvent",
        "InputField",
        "InvalidInputError",
        "LMConfig",
        "OverloadedError",
        "PredictionResult",
        "ProgramError",
        "ProgramInfo",
        "ProgramSpec",
        "RequestAbandonedError",
        "RequestCancelledError",
        "SlowConsumerError",
        "StatusEvent",
        "StreamEvent",
        "StreamOptions",
        "Timings",
        "UnknownProgramError",
        "UpstreamConnectionError",
        "UpstreamError",
        "UpstreamRateLimitedError",
        "UpstreamResponseError",
        "UpstreamServerError",
        "UpstreamStatistics",
        "UpstreamTimeoutError",
        "Usage",
        "open_engine",
    ]
    for name in set(engine.__all__) - {"StreamEvent"}:  # StreamEvent is a union alias
        assert getattr(engine, name).__module__.startswith("engine")


def test_every_error_is_an_engine_error() -> None:
    errors = [getattr(engine, n) for n in engine.__all__ if n.endswith("Error")]
    assert all(issubclass(e, engine.EngineError) for e in errors)
    assert len({e.code for e in errors}) == len(errors), "each error has its own code"


def test_lm_and_testing_exports_resolve() -> None:
    for module in (engine.lm, engine.testing):
        for name in module.__all__:
            assert hasattr(module, name)


def test_engine_never_imports_the_web_layer() -> None:
    import pathlib

    root = pathlib.Path(engine.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import web", "from web", "quart", "hypercorn"):
            assert banned not in text, f"{path} mentions {banned!r}"
