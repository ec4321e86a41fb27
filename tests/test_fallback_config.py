"""Fallbacks and breakers in the configuration: every bad value is a ConfigError naming its key, chains
resolve depth first, and which LMs get a breaker."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from dspy_trio.engine import BreakerSettings, ConfigError, EngineConfig, LMConfig
from dspy_trio.engine._fallback_config import breaker_settings, chain


def lms(**fallbacks: Any) -> dict[str, Any]:
    return {name: {"fallbacks": list(names)} for name, names in fallbacks.items()}


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (lms(a=["nope"]), r"fallbacks \(lms\.a\.fallbacks\) names 'nope', which is not a configured LM"),
        (lms(a=["a"]), r"fallbacks \(lms\.a\.fallbacks\) names the LM itself"),
        (lms(a=["b"], b=["a"]), r"lms\.b\.fallbacks\) form a cycle: a -> b -> a"),
        (lms(a=["b"], b=["c"], c=["a"]), r"form a cycle: a -> b -> c -> a"),
        (lms(a=["b", "b"], b=[]), r"lms\.a\.fallbacks names an LM twice"),
        ({"a": {"fallbacks": "b"}, "b": {}}, r"lms\.a\.fallbacks must be a list of LM names"),
        ({"a": {"fallbacks": [1]}, "b": {}}, r"lms\.a\.fallbacks must be a list of LM names"),
        ({"a": {"fallbacks": [""]}}, r"lms\.a\.fallbacks must be a list of LM names"),
        (
            {"a": {"fallback_on_context_window": "yes"}},
            r"lms\.a\.fallback_on_context_window must be true or false",
        ),
        ({"a": {"breaker": {"failure_ratio": 0}}}, r"lms\.a\.breaker\.failure_ratio must be positive, got 0"),
        ({"a": {"breaker": {"failure_ratio": 1.01}}}, r"lms\.a\.breaker\.failure_ratio must be at most 1"),
        ({"a": {"breaker": {"min_calls": 0}}}, r"lms\.a\.breaker\.min_calls must be positive"),
        ({"a": {"breaker": {"min_calls": 2.5}}}, r"lms\.a\.breaker\.min_calls must be an integer"),
        ({"a": {"breaker": {"window": math.inf}}}, r"lms\.a\.breaker\.window must be a finite number"),
        ({"a": {"breaker": {"open_for": -1}}}, r"lms\.a\.breaker\.open_for must be positive"),
        ({"a": {"breaker": {"open_for": math.nan}}}, r"lms\.a\.breaker\.open_for must be a finite number"),
        ({"a": {"breaker": {"half_open_calls": 0}}}, r"lms\.a\.breaker\.half_open_calls must be positive"),
        ({"a": {"breaker": {"enabled": 1}}}, r"lms\.a\.breaker\.enabled must be true or false"),
        ({"a": {"breaker": {"probes": 2}}}, r"lms\.a\.breaker: unknown key\(s\) probes"),
        ({"a": {"breaker": True}}, r"lms\.a\.breaker must be a table, got True"),
    ],
)
def test_bad_fallbacks_and_breakers_are_config_errors_naming_the_key(
    tables: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_mapping({"lms": tables})


def test_the_python_api_checks_the_same() -> None:
    with pytest.raises(ConfigError, match=r"lms\.a\.fallbacks\) names 'b'"):
        EngineConfig(lms={"a": LMConfig(fallbacks=("b",))}, programs={})
    with pytest.raises(ConfigError, match="cycle"):
        EngineConfig(lms={"a": LMConfig(fallbacks=["b"]), "b": LMConfig(fallbacks=["a"])}, programs={})
    with pytest.raises(ConfigError, match="breaker must be a table"):
        LMConfig(breaker={"min_calls": 3})  # type: ignore[arg-type]


def test_a_toml_file_with_fallbacks_and_a_breaker(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(
        """
[lms.default]
fallbacks = ["large", "backup"]
fallback_on_context_window = true

[lms.default.breaker]
failure_ratio = 0.25
min_calls = 20
window = 30
open_for = 15
half_open_calls = 2

[lms.large]
fallbacks = ["backup"]

[lms.backup]
[lms.backup.breaker]
enabled = false

[lms.alone]
"""
    )
    config = EngineConfig.from_toml(path)
    default = config.lms["default"]
    assert default.fallbacks == ("large", "backup")
    assert default.fallback_on_context_window is True
    assert default.breaker == BreakerSettings(
        failure_ratio=0.25, min_calls=20, window=30, open_for=15, half_open_calls=2
    )
    assert chain("default", config.lms) == ("default", "large", "backup")
    assert breaker_settings("default", config.lms) == default.breaker
    assert breaker_settings("large", config.lms) == BreakerSettings()  # in a chain: the defaults
    assert breaker_settings("backup", config.lms) is None  # turned off
    assert breaker_settings("alone", config.lms) is None  # in no chain, no table: none


def test_chains_go_depth_first_and_name_each_lm_once() -> None:
    config = EngineConfig(
        lms={
            "a": LMConfig(fallbacks=("b", "c")),
            "b": LMConfig(fallbacks=("d", "c")),
            "c": LMConfig(fallbacks=("d",)),
            "d": LMConfig(),
        },
        programs={},
    )
    assert chain("a", config.lms) == ("a", "b", "d", "c")
    assert chain("c", config.lms) == ("c", "d")
    assert chain("d", config.lms) == ("d",)
    assert chain("unconfigured", config.lms) == ("unconfigured",)


def test_an_lm_outside_any_chain_gets_a_breaker_only_from_its_own_table() -> None:
    config = EngineConfig(lms={"default": LMConfig(breaker=BreakerSettings(min_calls=3))})
    assert breaker_settings("default", config.lms) == BreakerSettings(min_calls=3)
    assert breaker_settings("default", EngineConfig().lms) is None
