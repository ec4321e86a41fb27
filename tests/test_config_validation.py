"""Config values validate themselves where they are written, and the errors name the TOML key or the
environment variable and the bad value (never the API key itself)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import trio

from dspy_trio.engine import (
    ConfigError,
    DSPySettings,
    EngineConfig,
    HTTPSettings,
    LMConfig,
    OpenAISettings,
    open_engine,
)
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


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("http", {"idle_check_interval": math.nan}),  # the reaper's first trio.sleep(nan) -> ValueError
        ("http", {"idle_check_interval": 0}),  # the reaper loops on trio.sleep(0): a busy loop
        ("http", {"read_timeout": math.nan}),
        ("http", {"read_timeout": 0}),  # every read times out at once
        ("http", {"read_timeout": "fast"}),  # wrong type, not checked at all
        ("http", {"max_connections": 0}),
        ("retry", {"base_delay": math.nan}),  # the first backoff is trio.sleep(nan) -> ValueError
        ("retry", {"budget_ratio": math.nan}),  # int(nan * n) -> ValueError in RetryBudget.try_spend
        ("retry", {"max_attempts": math.inf}),  # "attempts per call" that is not an integer
        ("retry", {"max_attempts": 2.5}),
        ("adaptive", {"initial": 0, "minimum": 0}),  # 1.0 / limit -> ZeroDivisionError
        ("adaptive", {"minimum": 10, "maximum": 2}),
        ("adaptive", {"decrease": 2.0}),  # "decrease" on overload would double the limit
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_nested_tables_refuse_values_that_cannot_work(table: str, values: dict[str, Any]) -> None:
    """Each nested table refuses what cannot work, not only negative numbers: NaN, 0, wrong types and
    inconsistent bounds would fail later at run time (or never: a busy loop)."""
    with pytest.raises(ConfigError):
        LMConfig.from_mapping({**OPENAI, table: values}, where="lms.x")


@pytest.mark.parametrize("table", ["http", "timeouts", "rate_limit", "retry", "adaptive"])
def test_a_nested_table_given_as_a_scalar_is_a_config_error(table: str) -> None:
    """``adaptive = true`` or ``http = 5`` in TOML is a ConfigError, not attrs' NotAnAttrsClassError
    (a ValueError from _check_numbers)."""
    with pytest.raises(ConfigError):
        LMConfig.from_mapping({**OPENAI, table: True}, where="lms.x")


@pytest.mark.parametrize(
    "params",
    [
        [1, 2],
        {"model": "other"},
        {"cache": True},
        {"api_base": "http://evil.test/v1"},
        {"transport": 1},
        {"messages": []},  # openai.py _body: body.update(params) replaces the prompt itself
        {"stream": True},  # a plain call then asks for SSE and fails to parse it
    ],
    ids=["list", "model", "cache", "api_base", "transport", "messages", "stream"],
)
def test_params_that_cannot_be_passed_to_the_backend_are_a_config_error(params: Any) -> None:
    """``params`` is splatted into the backend's constructor (openai.py from_config ``**config.params``):
    a list, or a key that is also a constructor argument, is refused by the config, not left to raise
    TypeError inside open_engine's build_lm."""
    with pytest.raises(ConfigError):
        LMConfig.from_mapping({**OPENAI, "params": params}, where="lms.x")


async def test_an_open_engine_with_reserved_params_fails_with_a_config_error() -> None:
    """Reserved params are refused when the LMConfig is built, before open_engine (where a raw TypeError
    would escape); either way the caller sees a ConfigError."""

    async def open_it() -> None:
        config = EngineConfig(
            lms={"default": LMConfig.from_mapping({**OPENAI, "params": {"model": "other"}})}
        )
        async with open_engine(config):
            pass

    with pytest.raises(ConfigError):
        await open_it()


async def test_a_nan_reaper_interval_does_not_crash_an_open_engine(autojump_clock: Any) -> None:
    """HTTPSettings(idle_check_interval=nan) is refused by the config, so no open_engine's upkeep task
    dies later with ValueError ("deadline must not be NaN") and takes the engine down."""

    async def open_for_a_second() -> None:
        lm = LMConfig.from_mapping({**OPENAI, "http": {"idle_check_interval": math.nan}})
        async with open_engine(EngineConfig(lms={"default": lm})):
            await trio.sleep(1)

    with pytest.raises(ConfigError):
        await open_for_a_second()


@pytest.mark.parametrize(
    "env",
    [
        {"LM_TIMEOUT": "nan"},
        {"LM_TIMEOUT": "0"},
        {"LM_MAX_TOKENS": "-1"},
        {"LM_MAX_TOKENS": "0"},
        {"LM_PARAMS": '{"temperature": NaN}'},  # json.loads accepts NaN; httpx refuses to send it
        {"LM_PARAMS": '{"max_tokens": -5}'},
        {"LM_PARAMS": '{"model": "x"}'},  # TypeError in build_lm: model given twice
        {"LM_PARAMS": '{"cache": true}'},
    ],
    ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()),
)
def test_bad_lm_environment_values_are_config_errors(env: dict[str, str]) -> None:
    """The default LM's variables (engine/_env.py default_lm_from_env) are checked like the file's keys:
    LM_TIMEOUT beyond its sign, LM_MAX_TOKENS and LM_PARAMS at all."""
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m", **env})


def test_switching_provider_by_env_does_not_send_the_old_providers_key_elsewhere(tmp_path: Any) -> None:
    """File: an OpenAI LM with its key and api_base. Env: LM_PROVIDER=anthropic, LM_MODEL=claude.
    Switching the provider drops the old one's key and api_base (engine/_env.py); inheriting them would
    send the OpenAI secret, as x-api-key, to the inherited base."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "gpt"\napi_base = "https://api.openai.com/v1"\n'
        'api_key = "sk-openai-secret"\n'
    )
    lm = EngineConfig.from_env(
        {"DSPY_TRIO_CONFIG": str(path), "LM_PROVIDER": "anthropic", "LM_MODEL": "claude"}
    ).lms["default"]
    assert lm.provider == "anthropic"
    assert getattr(lm.settings, "api_key", None) != "sk-openai-secret"
    assert getattr(lm.settings, "api_base", None) != "https://api.openai.com/v1"


@pytest.mark.parametrize("key", ["sk-abc\n", "sk-\u00e9t\u00e9"], ids=["trailing-newline", "non-ascii"])
def test_an_api_key_that_cannot_be_sent_is_a_config_error(key: str) -> None:
    """A key read from a file with its trailing newline, or a non-ASCII key, is refused by the config.
    Accepted, the first would fail every call in h11 (LocalProtocolError "Illegal header value"), mapped
    to a *retryable* connection error (3 attempts per call, retry budget spent); the second would raise a
    raw UnicodeEncodeError from build_lm inside open_engine."""
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m", "LM_API_KEY": key})


def test_threads_must_be_an_integer() -> None:
    """``threads = 1.5`` is refused by the config, not left to anyio.CapacityLimiter's raw TypeError in
    build_lm (ThreadedLM.__init__)."""
    with pytest.raises(ConfigError):
        LMConfig(model="openai/m", settings=DSPySettings(api_base="http://upstream.test/v1", threads=1.5))  # type: ignore[arg-type]


@pytest.mark.parametrize("api_base", ["localhost:8000/v1", "ftp://upstream.test/v1", "not a url"])
def test_an_api_base_that_is_not_an_http_url_is_a_config_error(api_base: str) -> None:
    """``api_base = "localhost:8000/v1"`` (the scheme forgotten) is refused by the config; accepted, every
    call would fail with httpx.UnsupportedProtocol, mapped to a retryable connection error (3 attempts
    per call)."""
    with pytest.raises(ConfigError):
        LMConfig(model="m", settings=OpenAISettings(api_base=api_base))


def test_lm_model_and_key_without_a_provider_do_not_silently_serve_the_simulated_lm() -> None:
    """LM_MODEL=gpt-4o-mini and LM_API_KEY=sk-... with LM_API_BASE forgotten is a ConfigError: a key and a
    model name are an unambiguous request for a real LM, and the simulated provider under the real
    model's name would serve made-up answers (only an info log line saying so)."""
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"LM_MODEL": "gpt-4o-mini", "LM_API_KEY": "sk-real"})


def test_frozen_config_values_are_hashable() -> None:
    """@attrs.frozen values promise a hash: ``params`` (and the lms/programs mappings) must not be plain
    dicts, or hash(LMConfig()) raises TypeError."""
    assert hash(LMConfig()) == hash(LMConfig())
    assert hash(EngineConfig()) == hash(EngineConfig())
