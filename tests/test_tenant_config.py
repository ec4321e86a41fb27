"""``[tenants.NAME]`` and ``[lms.NAME.price]`` from TOML: what they build, and the errors that name the
bad key (its place, never the key itself) for a key in two tenants, an empty key, a weight <= 0, a
price < 0."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from dspy_trio.engine import BudgetLimit, ConfigError, EngineConfig, Price, RateLimit, TenantConfig

SECRET = "sk-tenant-secret-0001"


def load(data: dict[str, Any], env: dict[str, str] | None = None) -> EngineConfig:
    return EngineConfig.from_mapping(data, env=env or {})


def test_a_tenant_table_builds_its_config_and_keeps_only_digests() -> None:
    hashed = "sha256:" + hashlib.sha256(b"other-key").hexdigest().upper()
    config = load(
        {
            "tenants": {
                "acme": {
                    "keys": [SECRET, hashed],
                    "keys_env": "ACME_KEYS",
                    "weight": 3,
                    "max_in_flight": 8,
                    "max_queued": 16,
                    "rate_limit": {"rpm": 600, "tpm": 100000},
                    "budget": {"usd": 50, "window": 3600},
                }
            },
            "lms": {"default": {"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}},
        },
        env={"ACME_KEYS": "k1,k2"},
    )
    acme = config.tenants["acme"]
    assert acme.key_digests == tuple(
        hashlib.sha256(k.encode()).hexdigest() for k in (SECRET, "other-key", "k1", "k2")
    )
    assert (acme.weight, acme.max_in_flight, acme.max_queued) == (3, 8, 16)
    assert acme.rate_limit == RateLimit(rpm=600, tpm=100000)
    assert acme.budget == BudgetLimit(usd=50, window=3600)
    assert config.lms["default"].price == Price(0.15, 0.6)
    assert SECRET not in repr(config)
    assert Price(0.15, 0.6).cost(1_000_000, 1_000_000) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"tenants": {"a": {"keys": [SECRET]}, "b": {"keys": ["x", SECRET]}}},
            r"tenants\.b\.keys\[1\] is the same key as tenants\.a\.keys\[0\] \(sha256:[0-9a-f]{12}…\)",
        ),
        ({"tenants": {"a": {"keys": ["k", ""]}}}, r"tenants\.a\.keys\[1\] is an empty key"),
        ({"tenants": {"a": {"keys": ["  "]}}}, r"tenants\.a\.keys\[0\] is an empty key"),
        ({"tenants": {"a": {"keys": [" k"]}}}, r"tenants\.a\.keys\[0\] has leading or trailing whitespace"),
        ({"tenants": {"a": {"keys": [1]}}}, r"tenants\.a\.keys\[0\] must be a string"),
        ({"tenants": {"a": {"keys": "k"}}}, r"tenants\.a\.keys must be a list"),
        ({"tenants": {"a": {"keys": ["sha256:abc"]}}}, r"tenants\.a\.keys\[0\] starts with sha256: but"),
        ({"tenants": {"a": {"weight": 0}}}, r"tenants\.a\.weight must be positive, got 0"),
        ({"tenants": {"a": {"weight": -2}}}, r"tenants\.a\.weight must be positive"),
        ({"tenants": {"a": {"weight": float("inf")}}}, r"tenants\.a\.weight must be a finite number"),
        ({"tenants": {"a": {"weight": 1e-320}}}, r"tenants\.a\.weight must be at least 0\.001"),
        ({"tenants": {"a": {"weight": 1001}}}, r"tenants\.a\.weight must be at most 1000"),
        ({"tenants": {"a": {"max_in_flight": 0}}}, r"tenants\.a\.max_in_flight must be positive"),
        ({"tenants": {"a": {"max_queued": -1}}}, r"tenants\.a\.max_queued must not be negative"),
        ({"tenants": {"a": {"rate_limit": {"rpm": 0}}}}, r"tenants\.a\.rate_limit\.rpm must be positive"),
        ({"tenants": {"a": {"budget": {"usd": -1}}}}, r"tenants\.a\.budget\.usd must not be negative"),
        ({"tenants": {"a": {"budget": {"usd": 1, "window": 0}}}}, r"tenants\.a\.budget\.window must be"),
        ({"tenants": {"a": {"budget": 5}}}, r"tenants\.a\.budget must be a table"),
        ({"tenants": {"a": {"wieght": 2}}}, r"tenants\.a: unknown key\(s\) wieght"),
        ({"tenants": {"a": {"keys_env": "NOPE"}}}, r"tenants\.a: keys_env names NOPE, which is not set"),
        ({"tenants": {"a": {"keys_env": "EMPTY"}}}, r"tenants\.a\.keys_env \(EMPTY\)\[1\] is an empty key"),
        ({"tenants": {"a": 3}}, r"tenants\.a must be a table"),
        (
            {"lms": {"default": {"price": {"input_per_mtok": -0.1}}}},
            r"lms\.default\.price\.input_per_mtok must not be negative",
        ),
        (
            {"lms": {"default": {"price": {"output_per_mtok": float("nan")}}}},
            r"lms\.default\.price\.output_per_mtok must be a finite number",
        ),
    ],
)
def test_bad_tenant_and_price_tables_are_config_errors_naming_the_key(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(data, env={"EMPTY": "k,"})
    assert SECRET not in str(info.value)


def test_a_tenant_config_made_in_python_is_checked_too() -> None:
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    with pytest.raises(ConfigError, match="is the same key as"):
        EngineConfig(
            tenants={"a": TenantConfig(key_digests=(digest,)), "b": TenantConfig(key_digests=(digest,))}
        )
    with pytest.raises(ConfigError, match="weight must be positive"):
        TenantConfig(weight=0)
