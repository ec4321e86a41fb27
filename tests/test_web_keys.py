"""The key ring: which tenant an API key belongs to, from ``[tenants]`` and ``DSPY_TRIO_API_KEYS``."""

from __future__ import annotations

import hashlib

import pytest

from dspy_trio.engine import ConfigError, EngineConfig
from dspy_trio.web.keys import KeyRing, api_key_tenant

SECRET = "sk-the-secret-key-0001"


def tenants(data: dict[str, object]) -> EngineConfig:
    return EngineConfig.from_mapping({"tenants": data}, env={})


def test_keys_find_their_tenant_and_unknown_keys_none() -> None:
    hashed = "sha256:" + hashlib.sha256(b"hashed-key").hexdigest()
    config = tenants({"acme": {"keys": [SECRET, hashed]}, "beta": {"keys": ["b-key"], "weight": 2}})
    ring = KeyRing.build(["plain-1", "plain-2"], config.tenants)
    assert ring.tenant_of(SECRET) == "acme"
    assert ring.tenant_of("hashed-key") == "acme"
    assert ring.tenant_of("b-key") == "beta"
    assert ring.tenant_of("plain-1") == api_key_tenant(hashlib.sha256(b"plain-1").hexdigest())
    assert ring.tenant_of("plain-1") != ring.tenant_of("plain-2")
    assert ring.tenant_of("plain-1").startswith("key-")  # type: ignore[union-attr]
    for wrong in ("", "sk-the-secret-key-000", SECRET + " ", "sha256:" + hashed[7:]):
        assert ring.tenant_of(wrong) is None
    assert len(ring) == 5
    assert SECRET not in repr(ring)


def test_a_key_in_a_tenant_and_in_dspy_trio_api_keys_is_named_by_both_places() -> None:
    config = tenants({"acme": {"keys": ["other", SECRET]}})
    with pytest.raises(
        ConfigError, match=r"tenants\.acme\.keys\[1\] is the same key as DSPY_TRIO_API_KEYS\[2\]"
    ) as info:
        KeyRing.build(["a", "b", SECRET], config.tenants)
    assert SECRET not in str(info.value)


def test_a_tenant_named_like_an_api_keys_tenant_is_refused() -> None:
    name = api_key_tenant(hashlib.sha256(b"k").hexdigest())
    with pytest.raises(ConfigError, match=f"tenants.{name}: the name of a DSPY_TRIO_API_KEYS key's tenant"):
        KeyRing.build(["k"], tenants({name: {"keys": ["x"]}}).tenants)
