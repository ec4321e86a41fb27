"""GuardedLM: the upstream guard wraps a backend instead of being installed on it (issue #13)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dspy_trio.engine import EngineConfig, LMConfig, SimulatedSettings, open_engine
from dspy_trio.engine._upstream import UpstreamGuard
from dspy_trio.engine.lm import Completion, DeltaSink, GuardedLM, SimulatedLM


class CountingGuard:
    """A guard that runs each attempt once and records the estimates it was given."""

    def __init__(self) -> None:
        self.estimates: list[float] = []

    async def call(
        self,
        attempt: Callable[[DeltaSink | None], Awaitable[Completion]],
        sink: DeltaSink | None,
        *,
        estimate: float,
        streamed: bool = False,
    ) -> Completion:
        self.estimates.append(estimate)
        return await attempt(sink)


async def test_a_guarded_lm_sends_every_call_through_its_guard_alone() -> None:
    inner = SimulatedLM(first_token_delay=0.0, token_delay=0.0)
    guard = CountingGuard()
    lm = GuardedLM(inner, guard)
    assert (lm.model, lm.kwargs) == (inner.model, inner.kwargs)
    outputs: list[Any] = await lm.acall(messages=[{"role": "user", "content": "hello"}])
    assert outputs
    assert len(guard.estimates) == 1
    assert not hasattr(inner, "guard")


async def test_open_engine_wraps_each_backend_and_leaves_it_unchanged() -> None:
    given = SimulatedLM(first_token_delay=0.0, token_delay=0.0)
    config = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0.0, token_delay=0.0))}
    )
    async with open_engine(config, lms={"default": given}) as engine:
        wrapped = engine.lms["default"]
        assert isinstance(wrapped, GuardedLM)
        assert wrapped.inner is given
        assert isinstance(wrapped.guard, UpstreamGuard)
        assert not hasattr(given, "guard")
        result = await engine.predict("default", {"question": "What is Trio?"})
        assert result.outputs
        assert wrapped.guard.statistics().retries_by_cause == {}
