"""Any stock dspy.LM through worker threads: it works, errors are typed, and cancel only abandons."""

from __future__ import annotations

import importlib

import dspy
import pytest
import trio

from dspy_trio.engine import (
    ConfigError,
    DSPySettings,
    EngineConfig,
    LMConfig,
    RetryPolicy,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault


def threaded_config(upstream: FakeUpstream) -> EngineConfig:
    lm = LMConfig(
        model="openai/fake-model",
        retry=RetryPolicy(max_attempts=1),
        settings=DSPySettings(api_base=upstream.url, api_key="sk-test", threads=4),
    )
    return EngineConfig(lms={"default": lm})


async def test_stock_lm_answers_with_usage(fake_upstream: FakeUpstream) -> None:
    async with open_engine(threaded_config(fake_upstream)) as engine:
        result = await engine.predict("default", {"question": "What is Trio?"})
    assert result.outputs["answer"]
    assert result.usage.completion_tokens > 0
    [record] = fake_upstream.records
    assert record.body["model"] == "fake-model"


async def test_rate_limit_maps_to_the_typed_error_with_retry_after(fake_upstream: FakeUpstream) -> None:
    fake_upstream.add_faults(Fault("rate_limit", retry_after=3))
    async with open_engine(threaded_config(fake_upstream)) as engine:
        with pytest.raises(UpstreamRateLimitedError) as info:
            await engine.predict("default", {"question": "q"})
    assert info.value.retry_after == 3
    assert "\n" not in info.value.message


async def test_cancel_returns_at_once_but_the_thread_runs_the_call_to_completion(
    fake_upstream: FakeUpstream,
) -> None:
    """The documented limit of this path: the upstream never sees the cancel."""
    fake_upstream.behavior = Behavior(latency=1.0)
    async with open_engine(threaded_config(fake_upstream)) as engine:
        start = trio.current_time()
        with trio.move_on_after(0.2):
            await engine.predict("default", {"question": "q"})
        assert trio.current_time() - start < 0.5
        assert engine.statistics().timed_out == 1
        with trio.fail_after(10):
            await fake_upstream.wait_for(lambda u: u.records and u.records[0].ended)
    [record] = fake_upstream.records
    assert record.client_closed_at is None
    assert record.completed_at is not None


@pytest.mark.parametrize(
    ("api_base", "match"),
    [("https://api.openai.com/v1", "LiteLLM"), ("http://127.0.0.1:9/v1", "cannot send these params")],
    ids=["openai", "compatible-server"],
)
@pytest.mark.parametrize("params", [{"min_tokens": 5}, {"repeat_penalty": 1.1}])
async def test_params_that_take_dspys_asyncio_litellm_route_are_refused_at_start_up(
    params: dict[str, float], api_base: str, match: str
) -> None:
    """DSPy streams its LiteLLM route by running asyncio code on the calling (Trio) thread; under Trio
    that failed every stream and froze the server. The configuration is refused before anything runs
    (for a compatible server DSPy itself refuses params its native route cannot carry)."""
    lm = LMConfig(model="openai/m", params=params, settings=DSPySettings(api_base=api_base, api_key="k"))
    with pytest.raises(ConfigError, match=match) as info:
        async with open_engine(EngineConfig(lms={"default": lm})):
            pytest.fail("the engine opened")
    assert next(iter(params)) in info.value.message
    assert 'provider = "openai"' in info.value.message


async def test_params_dspy_sends_natively_are_accepted(fake_upstream: FakeUpstream) -> None:
    lm = LMConfig(
        model="openai/fake-model",
        params={"temperature": 0.3, "max_tokens": 40},
        settings=DSPySettings(api_base=fake_upstream.url, api_key="k"),
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        result = await engine.predict("default", {"question": "q"})
    assert result.outputs["answer"]


@pytest.mark.parametrize("api_key", ["k", None], ids=["key", "no-key"])
async def test_a_compatible_server_gets_max_tokens_not_max_completion_tokens(
    fake_upstream: FakeUpstream, api_key: str | None
) -> None:
    """DSPy spells the cap ``max_completion_tokens`` (OpenAI's current name), which llama.cpp ignores:
    an ``openai/`` model on any other server is sent ``max_tokens``, with or without a key."""
    lm = LMConfig(
        model="openai/fake-model",
        params={"max_tokens": 40},
        settings=DSPySettings(api_base=fake_upstream.url, api_key=api_key),
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        result = await engine.predict("default", {"question": "q"})
        async with engine.stream("default", {"question": "q"}) as events:
            async for _event in events:
                pass
    assert result.outputs["answer"]
    assert len(fake_upstream.records) == 2
    for record in fake_upstream.records:
        assert record.body["model"] == "fake-model"
        assert record.body["max_tokens"] == 40
        assert "max_completion_tokens" not in record.body


def test_openai_itself_keeps_dspys_settings_and_nothing_is_registered_process_wide() -> None:
    registered_providers = importlib.import_module("dspy.lm15").registered_providers
    from dspy_trio.engine.lm.threaded import COMPATIBLE_PROVIDER

    openai = LMConfig(model="openai/gpt-4o-mini", settings=DSPySettings(api_base="https://api.openai.com/v1"))
    assert openai.build_lm().inner.model == "openai/gpt-4o-mini"
    local = LMConfig(model="openai/m", settings=DSPySettings(api_base="http://127.0.0.1:9/v1"))
    threaded = local.build_lm()
    assert threaded.model == "openai/m"
    assert threaded.inner.model == f"{COMPATIBLE_PROVIDER}/m"
    assert all(binding.id != COMPATIBLE_PROVIDER for binding in registered_providers())
    assert dspy.LM("openai/m", api_base="http://127.0.0.1:9/v1")._providers == registered_providers()


def test_a_dspy_lm_error_quoting_the_key_reaches_only_the_log_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dspy provider follows the HTTP backends' rule: DSPy's error text is the provider's (LiteLLM's
    ``AuthenticationError: Incorrect API key provided: sk-...``); clients read the status's meaning."""
    from dspy.utils.exceptions import LMAuthError

    from dspy_trio.engine.lm._redact import Redactor
    from dspy_trio.engine.lm.threaded import dspy_lm_errors

    key = "sk-proj-threaded0123456789abcdefXYZ"
    with pytest.raises(UpstreamResponseError) as info, dspy_lm_errors("m", Redactor([key])):
        raise LMAuthError(f"AuthenticationError: Incorrect API key provided: {key}", status=401)
    assert (
        info.value.message
        == "m: the upstream answered HTTP 401: it refused the credentials: check the LM's api_key"
    )
    assert key not in caplog.text
    assert "Incorrect API key provided: [redacted]" in caplog.text


async def test_a_lone_surrogate_from_a_stock_lm_is_a_bad_response(fake_upstream: FakeUpstream) -> None:
    """The same rule on every path: ``"\\ud800"`` is valid JSON but no client can be sent it. The
    Trio-native backends refuse it (``upstream_bad_response``); the stock-LM path let it through."""
    fake_upstream.add_faults(Fault("surrogate"))
    async with open_engine(threaded_config(fake_upstream)) as engine:
        with pytest.raises(UpstreamResponseError):
            await engine.predict("default", {"question": "q"})


def test_the_dspy_provider_keeps_a_503s_retry_after() -> None:
    """ "Retry-After honoured on every retryable status" holds for the dspy provider too: threaded.py
    dspy_lm_errors copies DSPy's retry_after for an LMServerError (503/529) as for an LMRateLimitError,
    so retry_after=3 reaches the UpstreamServerError."""
    from dspy.utils.exceptions import LMServerError

    from dspy_trio.engine.lm.threaded import dspy_lm_errors

    with pytest.raises(UpstreamServerError) as info, dspy_lm_errors("m"):
        raise LMServerError("busy", status=503, retry_after=3.0)
    assert info.value.retry_after == 3.0
