"""Configuration from the environment and from TOML files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest

from dspy_trio.engine import (
    AdaptiveSettings,
    CallTimeouts,
    ConfigError,
    EngineConfig,
    LMConfig,
    OpenAISettings,
    RateLimit,
    RetryPolicy,
    SimulatedSettings,
)
from dspy_trio.engine.lm import HTTPSettings, SimulatedLM


def test_nothing_configured_means_the_simulated_lm_and_the_default_program() -> None:
    config = EngineConfig.from_env({})
    assert config.lms["default"].provider == "simulated"
    assert config.programs["default"].source == "question -> answer"


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
    assert (
        lm.provider,
        lm.model,
        lm.settings.api_base,
        lm.settings.api_key,
        lm.settings.http.read_timeout,
    ) == (
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
    assert (config.lms["default"].provider, config.lms["default"].settings.api_key, config.max_in_flight) == (
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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LM_ADAPTER": "jsn"}, "LM_ADAPTER='jsn': adapter must be one of chat, json; got 'jsn'"),
        ({"DSPY_TRIO_ADAPTER": "xml"}, "DSPY_TRIO_ADAPTER='xml': adapter must be one of"),
        ({"LM_PROVIDER": "magic", "LM_MODEL": "m"}, "LM_PROVIDER='magic': provider must be one of"),
        ({"DSPY_TRIO_MAX_IN_FLIGHT": "0"}, "DSPY_TRIO_MAX_IN_FLIGHT='0': max_in_flight must be positive"),
        ({"DSPY_TRIO_MAX_QUEUED": "-1"}, "DSPY_TRIO_MAX_QUEUED='-1': max_queued must not be negative"),
        ({"DSPY_TRIO_DRAIN_TIMEOUT": "nan"}, "DSPY_TRIO_DRAIN_TIMEOUT='nan': drain_timeout must be a finite"),
        (
            {"LM_API_BASE": "127.0.0.1:8080/v1", "LM_MODEL": "m"},
            "LM_API_BASE='127.0.0.1:8080/v1': api_base must be an http",
        ),
        ({"LM_API_BASE": "http://h/v1", "LM_MODEL": "m", "LM_API_KEY": " k"}, "LM_API_KEY: api_key has lead"),
        ({"LM_PROVIDER": "dspy", "LM_MODEL": "m", "LM_STREAM_UPSTREAM": "1"}, "LM_STREAM_UPSTREAM='1': "),
        (
            {"LM_PROVIDER": "openai", "LM_MODEL": "m"},
            "an LM of provider 'openai' needs api_base (LM_API_BASE)",
        ),
        (
            {"DSPY_TRIO_REDIS_URL": "localhost:6379"},
            "DSPY_TRIO_REDIS_URL='localhost:6379': redis_url must be",
        ),
        ({"DSPY_TRIO_REDIS_URL": "http://:pw@h:1"}, "DSPY_TRIO_REDIS_URL='http://:***@h:1': redis_url"),
    ],
)
def test_a_bad_variable_is_named_with_its_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        EngineConfig.from_env(env)
    assert message in str(raised.value)
    assert "pw@" not in str(raised.value)


def test_a_config_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[engine]\nmax_in_flight = 3  # ½\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml': not UTF-8 \(byte 0xbd at position 30\)"):
        EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(latin1)})
    with pytest.raises(ConfigError, match=r"cannot read config file .*Is a directory"):
        EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(tmp_path)})


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@cache.internal:6380", "unix:///run/redis.sock"]
)
def test_redis_urls_of_every_scheme_are_accepted(url: str) -> None:
    assert EngineConfig.from_env({"DSPY_TRIO_REDIS_URL": url}).cluster.redis_url == url


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
        model="gpt-4o-mini",
        params={"temperature": 0.2},
        settings=OpenAISettings(api_base="https://api.openai.com/v1", api_key="secret"),
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


def test_each_lm_nests_its_real_policy_values(tmp_path: Path) -> None:
    path = tmp_path / "nested.toml"
    path.write_text(
        """
[lms.default]
provider = "openai"
model = "m"
api_base = "http://127.0.0.1:9/v1"

[lms.default.http]
connect_timeout = 2
read_timeout = 30
write_timeout = 4
pool_timeout = 5
max_connections = 64
max_response_bytes = 2097152
max_event_bytes = 65536

[lms.default.timeouts]
attempt = 60
first_token = 10
stall = 5

[lms.default.rate_limit]
rpm = 500
tpm = 100000

[lms.default.retry]
max_attempts = 4
base_delay = 0.5
budget_floor = 3
window = 30

[lms.default.adaptive]
initial = 8
maximum = 64
"""
    )
    lm = EngineConfig.from_toml(path).lms["default"]
    assert lm.settings.http == HTTPSettings(
        connect_timeout=2,
        read_timeout=30,
        write_timeout=4,
        pool_timeout=5,
        max_connections=64,
        max_response_bytes=2 << 20,
        max_event_bytes=64 << 10,
    )
    assert lm.timeouts == CallTimeouts(attempt=60, first_token=10, stall=5)
    assert lm.rate_limit == RateLimit(rpm=500, tpm=100000)
    assert lm.retry == RetryPolicy(max_attempts=4, base_delay=0.5, budget_floor=3, window=30)
    assert lm.adaptive == AdaptiveSettings(initial=8, maximum=64)
    policy = lm.policy()
    assert (policy.rpm, policy.tpm, policy.attempt_timeout, policy.stall_timeout) == (500, 100000, 60, 5)
    assert policy.retry is lm.retry
    assert policy.adaptive is lm.adaptive


def test_the_old_environment_variables_still_set_the_nested_values() -> None:
    env = {
        "LM_API_BASE": "http://127.0.0.1:9/v1",
        "LM_MODEL": "m",
        "LM_TIMEOUT": "7",
        "LM_RPM": "60",
        "LM_TPM": "1000",
        "LM_MAX_ATTEMPTS": "2",
        "LM_ATTEMPT_TIMEOUT": "9",
    }
    lm = EngineConfig.from_env(env).lms["default"]
    assert lm.settings.http.read_timeout == 7
    assert lm.rate_limit == RateLimit(rpm=60, tpm=1000)
    assert lm.retry.max_attempts == 2
    assert lm.timeouts.attempt == 9


def test_adapter_and_model_parameters_from_the_environment() -> None:
    config = EngineConfig.from_env(
        {
            "LM_API_BASE": "http://127.0.0.1:9/v1",
            "LM_MODEL": "smol",
            "LM_ADAPTER": "json",
            "LM_PARAMS": '{"temperature": 0.1, "repeat_penalty": 1.1}',
            "LM_MAX_TOKENS": "256",
        }
    )
    assert config.adapter == "json"
    assert config.lms["default"].params == {"temperature": 0.1, "repeat_penalty": 1.1, "max_tokens": 256}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rpm": 5}, "moved into nested tables: rpm -> rate_limit.rpm"),
        (
            {"max_attempts": 2, "timeout": 3},
            "max_attempts -> retry.max_attempts, timeout -> http.read_timeout",
        ),
        ({"retry": {"max_attempts": 0}}, "max_attempts must be at least 1"),
        ({"retry": {"base_delay": -1}}, "retry.base_delay must not be negative"),
        ({"retry": {"tries": 2}}, "lm.retry: unknown key"),
        ({"rate_limit": {"rpm": 0}}, "rpm must be positive"),
        ({"provider": "magic"}, "provider must be one of simulated, openai, anthropic, dspy"),
        (
            {"api_key_env": "DSPY_TRIO_SURELY_UNSET"},
            "api_key_env names DSPY_TRIO_SURELY_UNSET, which is not set",
        ),
    ],
)
def test_bad_lm_tables_are_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LMConfig.from_mapping(table, env={})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LM_PARAMS": "[1, 2]"}, "LM_PARAMS must be a JSON object"),
        ({"LM_PARAMS": "{temperature: 1}"}, "LM_PARAMS must be a JSON object"),
        ({"LM_MAX_TOKENS": "many"}, "LM_MAX_TOKENS must be a number"),
        ({"LM_ADAPTER": "xml"}, "adapter must be one of chat, json"),
    ],
)
def test_bad_lm_environment_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_env(env)


def test_a_new_provider_is_one_registry_entry() -> None:
    """A provider is a settings type in its own module (here, a subclass of the simulated one's) plus
    one registry line: then the file, the environment and the engine all know it."""
    from dspy_trio.engine._providers import PROVIDERS

    @attrs.frozen
    class EchoSettings(SimulatedSettings):
        provider: ClassVar[str] = "echo"

    PROVIDERS[EchoSettings.provider] = EchoSettings
    try:
        config = LMConfig.from_mapping({"provider": "echo", "model": "echo/1", "token_delay": 0})
        assert (config.provider, config.settings) == ("echo", EchoSettings(token_delay=0))
        lm = config.build_lm()
        assert isinstance(lm, SimulatedLM)
        assert lm.model == "echo/1"
        from_env = EngineConfig.from_env({"LM_PROVIDER": "echo", "LM_MODEL": "e"}).lms["default"]
        assert isinstance(from_env.settings, EchoSettings)
    finally:
        del PROVIDERS["echo"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_config_path_that_never_ends_is_a_configuration_error_not_an_unbounded_read(
    tmp_path: Path,
) -> None:
    """A FIFO stands in for /dev/zero: it yields comment lines (valid TOML) until 16 MiB were taken,
    then ends (so the test itself stays bounded). A config file is a few KiB: a reader that takes that
    much is reading without a limit."""
    endless = tmp_path / "endless.toml"
    os.mkfifo(endless)
    writer = os.open(endless, os.O_RDWR | os.O_NONBLOCK)  # a writer is there: reading it never blocks
    done = threading.Event()
    written = 0

    def feed() -> None:
        nonlocal written
        line = b"# a comment line, as long as the file goes on\n" * 1000
        try:
            while written < 16 << 20 and not done.is_set():
                try:
                    written += os.write(writer, line)
                except BlockingIOError:
                    time.sleep(0.001)  # the reader is slower, or gone: wait for it or for the end
        finally:
            os.close(writer)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        with pytest.raises(ConfigError, match=r"endless\.toml"):
            EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(endless)})
    finally:
        done.set()
        feeder.join()


def test_lm_api_key_overrides_a_files_api_key_env_that_is_unset(tmp_path: Any) -> None:
    """The file says ``api_key_env`` names a variable that is unset here; the environment gives LM_API_KEY,
    which from_env documents as overriding the default LM: the override wins instead of from_toml failing
    before it is seen."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "m"\napi_base = "http://upstream.test/v1"\n'
        'api_key_env = "DSPY_TRIO_TEST_SURELY_UNSET_KEY"\n'
    )
    config = EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path), "LM_API_KEY": "sk-from-env"})
    assert config.lms["default"].settings.api_key == "sk-from-env"


def test_lm_api_base_alone_does_not_turn_a_files_anthropic_lm_into_openai(tmp_path: Any) -> None:
    """Pointing the file's Anthropic LM at a proxy with LM_API_BASE alone keeps it Anthropic: the
    documented default (LM_API_BASE without LM_PROVIDER means "openai") is for when nothing else chose a
    provider, and must not fail with "LM_PROVIDER=openai needs LM_MODEL", about a variable the user never
    set."""
    path = tmp_path / "c.toml"
    path.write_text('[lms.default]\nprovider = "anthropic"\nmodel = "claude-x"\napi_key = "sk-ant"\n')
    config = EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path), "LM_API_BASE": "http://proxy.test"})
    assert config.lms["default"].provider == "anthropic"
    assert config.lms["default"].settings.api_base == "http://proxy.test"


def test_a_file_with_only_named_lms_and_programs_loads() -> None:
    """[lms.fast] + [programs.qa] lm = "fast" (no LM called "default") loads: the implicit default
    program, whose LM is "default", is added only when its LM exists (engine/_engine_config.py), so there
    is no "program 'default' uses LM 'default', which is not configured" about a program the user never
    wrote."""
    config = EngineConfig.from_mapping(
        {
            "lms": {"fast": {"provider": "simulated"}},
            "programs": {"qa": {"source": "question -> answer", "lm": "fast"}},
        }
    )
    assert config.programs["qa"].lm == "fast"
