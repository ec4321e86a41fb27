"""Which tenant an API key belongs to: the keys of ``[tenants.NAME]`` and those of ``DSPY_TRIO_API_KEYS``.

Every key is known by its SHA-256 digest only (a tenant's keys may be given as ``sha256:<hex>`` so that the
file holds no secret); a key presented by a client is hashed once and looked up, in constant time in
the number of keys (10,000 tenants cost one hash and one dictionary lookup per request, not 10,000
comparisons). What the lookup's time could tell is the position of a digest in a hash table, which says
nothing about any key.

A key of ``DSPY_TRIO_API_KEYS`` is a tenant of its own, of weight 1 and no limits of its own, called
``key-`` and the first 8 hex digits of its digest (a name that never shows the key; its owner can compute
it: ``printf %s KEY | sha256sum``). A key in two places is a ``ConfigError`` naming both places.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from dspy_trio.engine import ConfigError, TenantConfig
from dspy_trio.engine._tenant_config import check_tenants, key_digest


def api_key_tenant(digest: str) -> str:
    """The tenant name of a ``DSPY_TRIO_API_KEYS`` key, from its digest."""
    return f"key-{digest[:8]}"


class KeyRing:
    """API keys by digest, and the tenant of each. Build it with :meth:`build`."""

    __slots__ = ("_tenants",)

    def __init__(self, tenants: dict[str, str]) -> None:
        self._tenants = tenants  # digest -> tenant name

    def __repr__(self) -> str:
        return f"<KeyRing [{len(self._tenants)} keys]>"

    def __len__(self) -> int:
        return len(self._tenants)

    @classmethod
    def build(cls, api_keys: Iterable[str], tenants: Mapping[str, TenantConfig]) -> KeyRing:
        """The keys of ``DSPY_TRIO_API_KEYS`` (``api_keys``) and of every tenant.

        Raises:
            ConfigError: a key in two tenants, or in a tenant and ``DSPY_TRIO_API_KEYS``, named by both
                places (never the key); a tenant named like an API key's tenant.
        """
        by_digest: dict[str, str] = {}
        places: dict[str, str] = {}
        for index, key in enumerate(api_keys):
            digest = key_digest(key)
            places.setdefault(digest, f"DSPY_TRIO_API_KEYS[{index}]")
            by_digest[digest] = api_key_tenant(digest)
        check_tenants(tenants, places)
        key_tenants = set(by_digest.values())
        for name, tenant in tenants.items():
            if name in key_tenants:
                raise ConfigError(
                    f"tenants.{name}: the name of a DSPY_TRIO_API_KEYS key's tenant; choose another"
                )
            for digest in tenant.key_digests:
                by_digest[digest] = name
        return cls(by_digest)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of ``key``, or None when it is no key of this service. Never blocks."""
        return self._tenants.get(hashlib.sha256(key.encode()).hexdigest())
