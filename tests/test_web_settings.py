"""ServiceSettings: every value checked when it is built; from the environment, the error names the
variable and its value (`dspy-trio serve` prints it as one line and exits 2: tests/test_cli.py)."""

from __future__ import annotations

import math

import pytest

from dspy_trio.engine import ConfigError
from dspy_trio.web.settings import ServiceSettings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DSPY_TRIO_PORT": "99999"}, "DSPY_TRIO_PORT='99999': port must be at most 65535, got 99999"),
        ({"DSPY_TRIO_PORT": "-1"}, "DSPY_TRIO_PORT='-1': port must be at least 0, got -1"),
        ({"DSPY_TRIO_PORT": "80.5"}, "DSPY_TRIO_PORT must be an integer, got '80.5'"),
        ({"DSPY_TRIO_PORT": "eighty"}, "DSPY_TRIO_PORT must be a number, got 'eighty'"),
        ({"DSPY_TRIO_WORKERS": "0"}, "DSPY_TRIO_WORKERS='0': workers must be positive, got 0"),
        (
            {"DSPY_TRIO_MAX_BODY_BYTES": "-5"},
            "DSPY_TRIO_MAX_BODY_BYTES='-5': max_body_bytes must be positive",
        ),
        ({"DSPY_TRIO_MAX_INPUT_CHARS": "1.5"}, "DSPY_TRIO_MAX_INPUT_CHARS must be an integer, got '1.5'"),
        (
            {"DSPY_TRIO_DEFAULT_TIMEOUT": "nan"},
            "DSPY_TRIO_DEFAULT_TIMEOUT='nan': default_timeout must be a finite",
        ),
        (
            {"DSPY_TRIO_MAX_TIMEOUT": "inf"},
            "DSPY_TRIO_MAX_TIMEOUT='inf': max_timeout must be a finite number",
        ),
        (
            {"DSPY_TRIO_KEEP_ALIVE_TIMEOUT": "0"},
            "DSPY_TRIO_KEEP_ALIVE_TIMEOUT='0': keep_alive_timeout must be",
        ),
        ({"DSPY_TRIO_MAX_JSON_DEPTH": "0"}, "DSPY_TRIO_MAX_JSON_DEPTH='0': max_json_depth must be positive"),
        (
            {"DSPY_TRIO_DEAD_PEER_TIMEOUT": "-1"},
            "DSPY_TRIO_DEAD_PEER_TIMEOUT='-1': dead_peer_timeout must be",
        ),
        ({"DSPY_TRIO_WS_PING_INTERVAL": "often"}, "DSPY_TRIO_WS_PING_INTERVAL must be a number, got 'often'"),
        ({"DSPY_TRIO_HOST": "my host"}, "host must be a host name or address, got 'my host'"),
        ({"LM_ADAPTER": "jsn"}, "LM_ADAPTER='jsn': adapter must be one of chat, json"),
    ],
)
def test_a_bad_variable_is_named_with_its_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ServiceSettings.from_env(env)
    assert message in str(raised.value)


def test_good_values_and_zero_for_none() -> None:
    settings = ServiceSettings.from_env(
        {
            "DSPY_TRIO_PORT": "0",
            "DSPY_TRIO_MAX_BODY_BYTES": "2e6",
            "DSPY_TRIO_WS_PING_INTERVAL": "0",
            "DSPY_TRIO_DEAD_PEER_TIMEOUT": "12.5",
        }
    )
    assert (settings.port, settings.max_body_bytes) == (0, 2_000_000)
    assert (settings.ws_ping_interval, settings.dead_peer_timeout) == (None, 12.5)
    assert ServiceSettings.from_env({}) == ServiceSettings()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 65536, "port must be at most 65535"),
        ("port", 80.0, "port must be an integer"),
        ("workers", True, "workers must be an integer"),
        ("default_timeout", math.nan, "default_timeout must be a finite number"),
        ("max_batch_items", 0, "max_batch_items must be positive"),
        ("ws_ping_interval", -1.0, "ws_ping_interval must be positive"),
        ("host", "", "host must be a host name or address"),
    ],
)
def test_built_in_python_the_field_is_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServiceSettings(**{field: value})  # type: ignore[arg-type]
