"""Configuration from the environment and from TOML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import ConfigError, EngineConfig, LMConfig


def test_nothing_configured_means_the_simulated_lm_and_the_default_program() -> None:
    config = EngineConfig.from_env({})
    assert config.lms["default"].provider == "simulated"
    assert config.programs["default"].source == "question -> answer"
    assert config.uses_simulated_lm


def test_env_selects_an_openai_compatible_lm() -> None:
    config = EngineConfig.from_env(
        {
            "LM_API_BASE": "http://127.0.0.1:9/v1",
            "LM_MODEL": "llama",
            "OPENAI_API_KEY": "sk-1",
            "LM_TIMEOUT": "7",
        }
    )
    lm = config.lms["default"]
    assert (lm.provider, lm.model, lm.api_base, lm.api_key, lm.timeout) == (
        "openai",
        "llama",
        "http://127.0.0.1:9/v1",
        "sk-1",
        7.0,
    )
    assert "sk-1" not in repr(lm)


def test_env_limits_and_dspy_provider() -> None:
    config = EngineConfig.from_env(
        {
            "LM_PROVIDER": "dspy",
            "LM_MODEL": "anthropic/claude",
            "LM_API_KEY": "k",
            "DSPY_TRIO_MAX_IN_FLIGHT": "7",
        }
    )
    assert (config.lms["default"].provider, config.lms["default"].api_key, config.max_in_flight) == (
        "dspy",
        "k",
        7,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LM_PROVIDER": "openai", "LM_MODEL": "m"}, "needs api_base"),
        ({"LM_PROVIDER": "magic", "LM_MODEL": "m"}, "provider must be one of"),
        ({"LM_PROVIDER": "dspy"}, "needs LM_MODEL"),
        ({"DSPY_TRIO_MAX_IN_FLIGHT": "lots"}, "must be a number"),
        ({"DSPY_TRIO_MAX_IN_FLIGHT": "0"}, "must be positive"),
        ({"DSPY_TRIO_CONFIG": "/no/such.toml"}, "cannot read config file"),
    ],
)
def test_bad_environment_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_env(env)


def test_toml_file_with_several_lms_and_programs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "secret")
    path = tmp_path / "dspy-trio.toml"
    path.write_text(
        """
[engine]
max_in_flight = 64
max_queued = 128
adapter = "json"

[lms.default]
provider = "simulated"

[lms.big]
provider = "openai"
model = "gpt-4o-mini"
api_base = "https://api.openai.com/v1"
api_key_env = "MY_KEY"
params = { temperature = 0.2 }

[programs.summarize]
source = "text -> summary"
lm = "big"
"""
    )
    config = EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path)})
    assert (config.max_in_flight, config.max_queued, config.adapter) == (64, 128, "json")
    assert config.lms["big"] == LMConfig(
        provider="openai",
        model="gpt-4o-mini",
        api_base="https://api.openai.com/v1",
        api_key="secret",
        params={"temperature": 0.2},
    )
    assert set(config.programs) == {"default", "summarize"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nope]\n", "unknown config section"),
        ("[engine]\nmax_inflight = 3\n", "unknown key"),
        ('[programs.p]\nsource = "a -> b"\nlm = "missing"\n', "not configured"),
        ("[engine\n", "cannot read config file"),
    ],
)
def test_bad_toml_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_toml(path)
