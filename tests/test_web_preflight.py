"""What `dspy-trio serve` checks and says before it listens (web/preflight.py), in process; the command
itself is run as a subprocess in tests/test_cli.py."""

from __future__ import annotations

import pytest

from dspy_trio.engine import AnthropicSettings, ConfigError, DSPySettings, EngineConfig, LMConfig, ProgramSpec
from dspy_trio.web.preflight import api_root, check_api_keys, check_engine_opens, describe_lm


def lm(**changes: object) -> LMConfig:
    return LMConfig.from_mapping({"provider": "openai", "model": "m", **changes})


@pytest.mark.parametrize(
    ("base", "shown"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("http://user:hunter2@127.0.0.1:8080/v1?token=s3cret#frag", "http://127.0.0.1:8080/v1"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
        ("https://u@gpu.example.com/v1", "https://gpu.example.com/v1"),
    ],
)
def test_the_api_root_is_shown_without_credentials_or_query(base: str, shown: str) -> None:
    assert api_root(lm(api_base=base)) == shown
    assert describe_lm(lm(api_base=base, api_key="sk-x")).count("sk-x") == 0


def test_anthropic_defaults_to_its_public_api() -> None:
    assert api_root(LMConfig(model="c", settings=AnthropicSettings())) == "https://api.anthropic.com"
    assert api_root(LMConfig()) is None  # the simulated LM has none


@pytest.mark.parametrize(
    ("lms", "refused"),
    [
        ({"default": lm(api_base="https://api.openai.com/v1")}, "set LM_API_KEY (or OPENAI_API_KEY)"),
        (
            {"default": LMConfig(model="c", settings=AnthropicSettings())},
            "set LM_API_KEY (or ANTHROPIC_API_KEY)",
        ),
        ({"default": LMConfig(), "big": lm(api_base="https://api.openai.com/v1")}, "[lms.big]"),
    ],
)
def test_a_hosted_api_without_a_key_is_refused(lms: dict[str, LMConfig], refused: str) -> None:
    with pytest.raises(ConfigError, match=r"without an API key") as raised:
        check_api_keys(EngineConfig(lms=lms))
    assert refused in str(raised.value)


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        (lm(api_base="https://api.openai.com/v1", api_key="k"), False),
        (lm(api_base="http://127.0.0.1:8080/v1"), False),
        (lm(api_base="http://localhost:8080/v1"), False),
        (lm(api_base="http://[::1]:8080/v1"), False),
        (lm(api_base="http://127.1.2.3/v1"), False),
        (LMConfig(model="c", settings=AnthropicSettings(api_base="http://127.0.0.1:9/")), False),
        (
            LMConfig(model="openai/gpt-4o-mini", settings=DSPySettings()),
            False,
        ),  # LiteLLM reads its own variables
        (LMConfig(), False),
        (lm(api_base="http://10.0.0.7:8000/v1"), True),
        (lm(api_base="https://vllm.internal/v1"), True),
    ],
)
def test_other_servers_may_need_no_key(config: LMConfig, warned: bool) -> None:
    warnings = check_api_keys(EngineConfig(lms={"default": config}))
    assert bool(warnings) is warned, warnings


def test_the_lm_line_says_what_it_serves() -> None:
    line = describe_lm(lm(api_base="http://127.0.0.1:8080/v1", stream_upstream=True))
    assert line == "openai, model 'm', at http://127.0.0.1:8080/v1, no API key, stream_upstream on"
    assert describe_lm(LMConfig(model="openai/x", settings=DSPySettings())) == "dspy, model 'openai/x'"


async def test_the_engine_check_finds_what_opening_would() -> None:
    await check_engine_opens(EngineConfig())
    broken = EngineConfig(programs={"p": ProgramSpec("no_such_module_here:program")})
    with pytest.raises(ConfigError, match="program 'p': cannot import"):
        await check_engine_opens(broken)
    clustered = EngineConfig.from_env({"DSPY_TRIO_REDIS_URL": "redis://127.0.0.1:1/0"})
    await check_engine_opens(clustered)  # the check never joins the cluster (nothing listens on port 1)
