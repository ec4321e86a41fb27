"""GuardedLM: the upstream guard wraps a backend instead of being installed on it, and DSPy
sees what the backend declares (``supported_params``) through it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dspy_trio.engine import EngineConfig, LMConfig, SimulatedSettings, open_engine
from dspy_trio.engine._upstream import UpstreamGuard
from dspy_trio.engine.lm import Completion, DeltaSink, GuardedLM, OpenAICompatibleLM, SimulatedLM
from dspy_trio.engine.testing import MockBackend, MockRequest, Reply, http_response


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


def _scripted_upstream(content: str) -> tuple[list[dict[str, Any]], MockBackend]:
    bodies: list[dict[str, Any]] = []

    def handler(request: MockRequest) -> Reply:
        bodies.append(request.json())
        answer = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        return [http_response(200, json={"choices": [answer]})]

    return bodies, MockBackend(handler)


async def test_the_engine_json_adapter_still_asks_an_openai_server_for_json(autojump_clock: Any) -> None:
    """The bare OpenAI backend declares ``supported_params`` (with ``response_format``), so DSPy's
    JSONAdapter asks the server for JSON (tests/test_http_transport.py pins it). Through the engine, DSPy
    sees the GuardedLM wrapper, which forwards ``supported_params``: the engine with ``adapter="json"``
    still sends ``response_format``."""
    bodies, network = _scripted_upstream('{"answer": "ok"}')
    lm = OpenAICompatibleLM("openai/m", api_base="http://upstream.test/v1", network=network)
    config = EngineConfig(lms={"default": LMConfig()}, adapter="json")
    async with open_engine(config, lms={"default": lm}) as engine:
        assert engine.lms["default"].supported_params == lm.supported_params
        result = await engine.predict("default", {"question": "q"})
    assert result.outputs["answer"] == "ok"
    assert bodies[0].get("response_format") == {"type": "json_object"}
