"""Process set-up a long-running server needs: no unbounded history or trace, cache off unless asked."""

from __future__ import annotations

import os
import uuid

import dspy
from dspy.clients.base_lm import GLOBAL_HISTORY

from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings, SimulatedSettings, open_engine
from dspy_trio.engine.testing import FakeUpstream

FAST = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))


async def test_requests_leave_no_history_or_trace_behind() -> None:
    history_before = len(GLOBAL_HISTORY)
    trace_before = len(dspy.settings.trace)
    async with open_engine(EngineConfig(lms={"default": FAST})) as engine:
        for i in range(20):
            await engine.predict("default", {"question": f"q{i}"})
        assert engine.lms["default"].history == []
    assert len(GLOBAL_HISTORY) == history_before
    assert len(dspy.settings.trace) == trace_before


def test_litellm_never_fetches_its_cost_map_from_the_network() -> None:
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


async def test_identical_requests_reach_the_model_unless_the_cache_is_enabled(
    fake_upstream: FakeUpstream,
) -> None:
    lm = LMConfig(model="cache-probe", settings=OpenAISettings(api_base=fake_upstream.url))
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        first = await engine.predict("default", {"question": "same question"})
        second = await engine.predict("default", {"question": "same question"})
    assert len(fake_upstream.records) == 2
    assert first.outputs == second.outputs

    question = f"cached question {uuid.uuid4()}"  # DSPy's cache may persist on disk across runs
    async with open_engine(EngineConfig(lms={"default": lm}, dspy_cache=True)) as engine:
        await engine.predict("default", {"question": question})
        cached = await engine.predict("default", {"question": question})
    assert len(fake_upstream.records) == 3
    assert cached.outputs["answer"]


def test_the_engines_fast_read_of_a_dspy_setting_reads_what_dspy_settings_reads() -> None:
    """``_dspy.setting`` reads DSPy's settings without ``dspy.settings``' failed attribute lookup first: it
    must see the global configuration, a context's overrides, and a configuration made after import."""
    from dspy_trio.engine._dspy import setting

    names = ("usage_tracker", "callbacks", "send_stream", "caller_predict", "lm", "adapter")
    assert all(setting(name) is getattr(dspy.settings, name) for name in names)
    before = dspy.settings.callbacks
    marker: list[object] = []
    dspy.configure(callbacks=marker)
    try:
        assert setting("callbacks") is marker
        with dspy.context(callbacks=[], send_stream="a stream"):
            assert setting("callbacks") == []
            assert setting("send_stream") == "a stream"
            assert all(setting(name) is getattr(dspy.settings, name) for name in names)
        assert setting("callbacks") is marker
        assert setting("send_stream") is None
    finally:
        dspy.configure(callbacks=before)
    assert setting("callbacks") is before
