"""Config values validate themselves where they are written, and the errors name the TOML key or the
environment variable and the bad value (never the API key itself)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dspy_trio.engine import ConfigError, EngineConfig, LMConfig
from dspy_trio.engine._adaptive import AdaptiveSettings

OPENAI: dict[str, Any] = {"provider": "openai", "model": "m", "api_base": "http://upstream.test/v1"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"http": {"read_timeout": math.nan}},
            r"lms\.x\.http\.read_timeout must be a finite number, got nan",
        ),
        ({"http": {"max_connections": 0}}, r"lms\.x\.http\.max_connections must be positive, got 0"),
        ({"http": {"max_response_bytes": 0}}, r"lms\.x\.http\.max_response_bytes must be positive"),
        ({"http": {"max_event_bytes": 1.5}}, r"lms\.x\.http\.max_event_bytes must be an integer"),
        ({"retry": {"max_attempts": 2.5}}, r"lms\.x\.retry\.max_attempts must be an integer, got 2\.5"),
        ({"rate_limit": {"rpm": math.inf}}, r"lms\.x\.rate_limit\.rpm must be a finite number"),
        ({"adaptive": {"inflation": 1.0}}, r"lms\.x\.adaptive\.inflation must be greater than 1"),
        ({"adaptive": {"decrease": 0}}, r"lms\.x\.adaptive\.decrease must be positive"),
        ({"adaptive": True}, r"lms\.x\.adaptive must be a table, got True"),
        ({"threads": 1.5}, r"lms\.x\.threads must be an integer"),
        ({"params": {"max_tokens": 0}}, r"lms\.x\.params\.max_tokens must be a positive integer"),
        ({"params": {"stop": [math.nan]}}, r"params\.stop\[0\] must be a finite number"),
        ({"params": {"messages": []}}, r"params cannot set messages"),
    ],
)
def test_errors_name_the_toml_key_and_the_value(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LMConfig.from_mapping({**OPENAI, **table}, where="lms.x")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LM_TIMEOUT": "inf"}, "LM_TIMEOUT='inf': read_timeout must be a finite number"),
        ({"LM_RPM": "0"}, "LM_RPM='0': rpm must be positive"),
        ({"LM_MAX_TOKENS": "-1"}, "LM_MAX_TOKENS must be a positive integer, got '-1'"),
        ({"LM_PARAMS": '{"stream": true}'}, "LM_PARAMS cannot set stream"),
    ],
)
def test_errors_name_the_environment_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m", **env})


@pytest.mark.parametrize("key", ["sk-xyzzy\n", " sk-xyzzy", "sk-xyz\u00e9zy", "sk-\x00xyzzy"])
def test_a_bad_api_key_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        LMConfig(**OPENAI, api_key=key)
    assert "xyz" not in str(info.value)


def test_none_max_tokens_in_params_still_means_no_cap() -> None:
    assert LMConfig(**OPENAI, params={"max_tokens": None}).params == {"max_tokens": None}


def test_params_are_copied_so_the_frozen_value_does_not_change_behind_its_back() -> None:
    params = {"temperature": 0.1}
    lm = LMConfig(**OPENAI, params=params)
    params["temperature"] = 0.9
    assert lm.params == {"temperature": 0.1}


def test_equal_configs_hash_equal() -> None:
    a = LMConfig(**OPENAI, params={"temperature": 0.1})
    b = LMConfig(**OPENAI, params={"temperature": 0.1})
    assert a == b
    assert hash(a) == hash(b)
    assert len({EngineConfig(), EngineConfig()}) == 1


def test_adaptive_bounds_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="minimum"):
        AdaptiveSettings(minimum=10, maximum=2)


def test_several_lms_without_a_default_get_no_implicit_default_program() -> None:
    config = EngineConfig.from_mapping(
        {
            "lms": {"a": {"provider": "simulated"}, "b": {"provider": "simulated"}},
            "programs": {"qa": {"source": "question -> answer", "lm": "a"}},
        }
    )
    assert set(config.programs) == {"qa"}


def test_the_only_lm_serves_the_implicit_default_program() -> None:
    config = EngineConfig(lms={"fast": LMConfig()})
    assert config.programs["default"].lm == "fast"


def test_a_provider_key_variable_does_not_override_a_files_own_key(tmp_path: Any) -> None:
    """OPENAI_API_KEY is a fallback for an LM without a key, not an override of the file's key."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "m"\napi_base = "http://upstream.test/v1"\n'
        'api_key = "sk-file"\n'
    )
    env = {"DSPY_TRIO_CONFIG": str(path), "OPENAI_API_KEY": "sk-other", "LM_MODEL": "m2"}
    assert EngineConfig.from_env(env).lms["default"].api_key == "sk-file"


def test_lm_api_base_alone_still_means_openai_when_nothing_chose_a_provider() -> None:
    lm = EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m"}).lms["default"]
    assert (lm.provider, lm.api_base) == ("openai", "http://upstream.test/v1")


def test_lm_api_base_without_a_model_names_the_variable_the_user_set() -> None:
    with pytest.raises(ConfigError, match=r"LM_API_BASE without LM_PROVIDER .* needs LM_MODEL"):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1"})


@pytest.mark.parametrize(
    "base", ["http://[::1", "http://[zz]/v1", "http://h:99999/v1", "http://h:abc/v1", "http://:80/v1"]
)
def test_an_api_base_that_is_not_a_usable_url_is_a_configuration_error(base: str) -> None:
    with pytest.raises(ConfigError, match="LM_API_BASE"):
        EngineConfig.from_env({"LM_PROVIDER": "openai", "LM_API_BASE": base, "LM_MODEL": "m"})
