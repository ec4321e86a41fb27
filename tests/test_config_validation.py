"""Config values validate themselves where they are written, and the errors name the TOML key or the
environment variable and the bad value (never the API key itself)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dspy_trio.engine import ConfigError, DSPySettings, EngineConfig, HTTPSettings, LMConfig
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
        ({"provider": "dspy", "threads": 1.5}, r"lms\.x\.threads must be an integer"),
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
        LMConfig.from_mapping({**OPENAI, "api_key": key})
    assert "xyz" not in str(info.value)


def test_none_max_tokens_in_params_still_means_no_cap() -> None:
    assert LMConfig.from_mapping({**OPENAI, "params": {"max_tokens": None}}).params == {"max_tokens": None}


def test_params_are_copied_so_the_frozen_value_does_not_change_behind_its_back() -> None:
    params = {"temperature": 0.1}
    lm = LMConfig.from_mapping({**OPENAI, "params": params})
    params["temperature"] = 0.9
    assert lm.params == {"temperature": 0.1}


def test_equal_configs_hash_equal() -> None:
    a = LMConfig.from_mapping({**OPENAI, "params": {"temperature": 0.1}})
    b = LMConfig.from_mapping({**OPENAI, "params": {"temperature": 0.1}})
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
    assert EngineConfig.from_env(env).lms["default"].settings.api_key == "sk-file"


def test_lm_api_base_alone_still_means_openai_when_nothing_chose_a_provider() -> None:
    lm = EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m"}).lms["default"]
    assert (lm.provider, lm.settings.api_base) == ("openai", "http://upstream.test/v1")


def test_lm_api_base_without_a_model_names_the_variable_the_user_set() -> None:
    with pytest.raises(ConfigError, match=r"LM_API_BASE without LM_PROVIDER .* needs LM_MODEL"):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1"})


URL = "http://upstream.test/v1"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({**OPENAI, "threads": 4}, r"lms\.x\.threads applies to the dspy provider, not openai"),
        (
            {"provider": "simulated", "api_base": URL},
            r"lms\.x\.api_base applies to the openai, anthropic and dspy providers, not simulated",
        ),
        (
            {"provider": "anthropic", "model": "c", "first_token_delay": 0},
            r"lms\.x\.first_token_delay applies to the simulated provider, not anthropic",
        ),
        (
            {"provider": "dspy", "model": "openai/m", "stream_upstream": True},
            r"lms\.x\.stream_upstream applies to the openai and anthropic providers, not dspy",
        ),
        (
            {"provider": "simulated", "http": {"read_timeout": 3}},
            r"lms\.x\.http applies to the openai, anthropic and dspy providers, not simulated",
        ),
        (
            {"provider": "simulated", "api_key": "sk-do-not-show-me"},
            r"lms\.x\.api_key applies to the openai, anthropic and dspy providers, not simulated",
        ),
    ],
    ids=[
        "threads-on-openai",
        "api_base-on-simulated",
        "pacing-on-anthropic",
        "stream_upstream-on-dspy",
        "http-on-simulated",
        "api_key-on-simulated",
    ],
)
def test_a_key_of_another_provider_is_refused_by_name(table: dict[str, Any], message: str) -> None:
    """Each provider owns its keys: one given to an LM of another provider is a ConfigError naming the
    key, the providers that have it and the one that does not (never the key's value)."""
    with pytest.raises(ConfigError, match=message) as info:
        LMConfig.from_mapping(table, where="lms.x")
    assert "do-not-show" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LM_TIMEOUT": "7"},
            "LM_TIMEOUT='7': http.read_timeout applies to the openai, anthropic and dspy providers, not"
            " simulated",
        ),
        (
            {"LM_PROVIDER": "simulated", "LM_API_BASE": URL},
            f"LM_API_BASE='{URL}': api_base applies to the openai, anthropic and dspy providers, not"
            " simulated",
        ),
        (
            {"LM_PROVIDER": "dspy", "LM_MODEL": "openai/m", "LM_STREAM_UPSTREAM": "1"},
            "LM_STREAM_UPSTREAM='1': stream_upstream applies to the openai and anthropic providers, not dspy",
        ),
    ],
    ids=["LM_TIMEOUT-on-simulated", "LM_API_BASE-on-simulated", "LM_STREAM_UPSTREAM-on-dspy"],
)
def test_a_variable_setting_a_key_of_another_provider_is_refused_by_name(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_env(env)
    assert message in str(info.value)


def test_switching_the_provider_by_env_keeps_only_the_keys_the_new_one_has(tmp_path: Any) -> None:
    """The file's LM is an OpenAI one with its own key, base, stream_upstream and http table; the
    environment makes it a dspy one: the http table stays (dspy has one), the rest belonged to the
    other provider and goes, without an error about keys the user did not write for this provider."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "m"\napi_base = "http://upstream.test/v1"\n'
        'api_key = "sk-file"\nstream_upstream = true\n\n[lms.default.http]\nread_timeout = 3\n'
    )
    env = {"DSPY_TRIO_CONFIG": str(path), "LM_PROVIDER": "dspy", "LM_MODEL": "openai/m"}
    lm = EngineConfig.from_env(env).lms["default"]
    assert lm.provider == "dspy"
    assert lm.settings == DSPySettings(http=HTTPSettings(read_timeout=3))


def test_the_settings_must_be_a_registered_providers_and_params_cannot_take_their_keys() -> None:
    with pytest.raises(ConfigError, match="settings must be the settings of a registered provider"):
        LMConfig(settings=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="params cannot set first_token_delay"):
        LMConfig(params={"first_token_delay": 1})
    with pytest.raises(ConfigError, match="params cannot set threads"):
        LMConfig(model="openai/m", params={"threads": 2}, settings=DSPySettings())


@pytest.mark.parametrize(
    "base", ["http://[::1", "http://[zz]/v1", "http://h:99999/v1", "http://h:abc/v1", "http://:80/v1"]
)
def test_an_api_base_that_is_not_a_usable_url_is_a_configuration_error(base: str) -> None:
    with pytest.raises(ConfigError, match="LM_API_BASE"):
        EngineConfig.from_env({"LM_PROVIDER": "openai", "LM_API_BASE": base, "LM_MODEL": "m"})
