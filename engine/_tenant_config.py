"""One tenant's configuration (``[tenants.NAME]``): its API keys, its weight, its own limits and budget.

::

    [tenants.acme]
    keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    weight = 3
    max_in_flight = 32
    max_queued = 64
    rate_limit = { rpm = 600, tpm = 200000 }
    budget = { usd = 50, window = 86400 }

A key is given as itself, or as ``sha256:<hex>`` (the SHA-256 of the key, so that the file holds no
secret); ``keys_env`` names an environment variable holding more keys, comma-separated. The value keeps
only the keys' digests (:attr:`TenantConfig.key_digests`), never the keys. Bad input is a
``ConfigError`` naming the tenant and which key (its place in the list, never the key itself).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._budget import BudgetLimit
from ._errors import ConfigError
from ._lm_config import RateLimit
from ._tables import build, nested
from ._validate import number, optional

_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")


def key_digest(key: str) -> str:
    """The hex SHA-256 of an API key: how tenants know their keys."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_label(digest: str) -> str:
    """How an error or a log names a key without showing it: the first 12 hex digits of its digest."""
    return f"sha256:{digest[:12]}…"


def digests_of(keys: Iterable[Any], where: str) -> list[str]:
    """The digests of ``keys`` (each a key, or ``sha256:<hex>``).

    Raises:
        ConfigError: a key that is not a string, is empty, or has surrounding whitespace, named by its
            place (``where[i]``).
    """
    digests = []
    for index, key in enumerate(keys):
        if not isinstance(key, str):
            raise ConfigError(f"{where}[{index}] must be a string")
        if not key.strip():
            raise ConfigError(f"{where}[{index}] is an empty key")
        if key != key.strip():
            raise ConfigError(f"{where}[{index}] has leading or trailing whitespace")
        if match := _DIGEST.fullmatch(key):
            digests.append(match.group(1).lower())
        elif key.lower().startswith("sha256:"):
            raise ConfigError(f"{where}[{index}] starts with sha256: but is not 64 hex digits")
        else:
            digests.append(key_digest(key))
    return digests


# Weights between these bounds: any two are at most a million apart (one start in a million for the
# lighter is still progress), and a service divided by a weight stays a finite number (a weight of 1e-320
# made a virtual time infinite, and every tenant after it tie).
MIN_WEIGHT = 0.001
MAX_WEIGHT = 1000.0


def _not_tiny(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value < MIN_WEIGHT:
        raise ConfigError(f"{attribute.name} must be at least {MIN_WEIGHT:g}, got {value!r}")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _digests(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(d, str) and len(d) == 64 for d in value):
        raise ConfigError(f"{attribute.name} must be SHA-256 hex digests")


@attrs.frozen
class TenantConfig:
    """A tenant: who it is (its keys), its share, its own limits and its budget.

    Attributes:
        key_digests: SHA-256 hex digests of the tenant's API keys.
        weight: Its share of the engine when saturated, relative to the others (0.001 to 1,000).
        max_in_flight: Its requests running at once (None: only the engine's limit).
        max_queued: Its requests waiting for a slot (None: only the engine's limit).
        rate_limit: Its requests and tokens per minute.
        budget: USD it may spend per window (None: no budget).
    """

    key_digests: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_digests, repr=False)
    weight: float = attrs.field(default=1.0, validator=[number(above=0, maximum=MAX_WEIGHT), _not_tiny])
    max_in_flight: int | None = attrs.field(default=None, validator=optional(number(above=0, integer=True)))
    max_queued: int | None = attrs.field(default=None, validator=optional(number(minimum=0, integer=True)))
    rate_limit: RateLimit = nested(RateLimit)
    budget: BudgetLimit | None = nested(BudgetLimit, optional=True)

    @property
    def in_flight_cap(self) -> float:
        return math.inf if self.max_in_flight is None else self.max_in_flight

    @property
    def queued_cap(self) -> float:
        return math.inf if self.max_queued is None else self.max_queued

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, where: str, env: Mapping[str, str] | None = None
    ) -> TenantConfig:
        """Build from a ``[tenants.NAME]`` table (``keys``, ``keys_env``, ``weight``, ``max_in_flight``,
        ``max_queued``, ``[rate_limit]``, ``[budget]``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a table ([{where}]), got {data!r}")
        values = dict(data)
        env = os.environ if env is None else env
        keys = values.pop("keys", [])
        if not isinstance(keys, list | tuple):
            raise ConfigError(f"{where}.keys must be a list of keys")
        digests = digests_of(keys, f"{where}.keys")
        if (variable := values.pop("keys_env", None)) is not None:
            if not isinstance(variable, str) or not variable:
                raise ConfigError(f"{where}.keys_env must name an environment variable")
            raw = env.get(variable)
            if raw is None:
                raise ConfigError(f"{where}: keys_env names {variable}, which is not set")
            digests += digests_of(raw.split(","), f"{where}.keys_env ({variable})")
        if "key_digests" in values:
            raise ConfigError(f"{where}: unknown key(s) key_digests (keys go in keys, as sha256:<hex>)")
        values["key_digests"] = tuple(digests)
        return build(cls, values, where)


def check_tenants(tenants: Mapping[str, TenantConfig], extra: Mapping[str, str] | None = None) -> None:
    """Refuse a key that belongs to two tenants (or to a tenant and ``extra``: digest -> where it was
    given, e.g. ``DSPY_TRIO_API_KEYS[2]``).

    Raises:
        ConfigError: naming both places and the key's label (:func:`key_label`).
    """
    seen: dict[str, str] = dict(extra or {})
    for name, tenant in tenants.items():
        if not name:
            raise ConfigError("tenants: a tenant's name must not be empty")
        for index, digest in enumerate(tenant.key_digests):
            here = f"tenants.{name}.keys[{index}]"
            if (other := seen.get(digest)) is not None:
                raise ConfigError(
                    f"{here} is the same key as {other} ({key_label(digest)}): a key belongs to one tenant"
                )
            seen[digest] = here
