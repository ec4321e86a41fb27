"""The ``[cache]`` section: single-flight of identical LM calls, and the response cache.

::

    [cache]
    single_flight = true       # identical LM calls in flight at once share one upstream call (default)
    backend = "memory"         # "off" (default) | "memory" (this process, LRU) | "redis" (the [cluster] one)
    ttl = 3600                 # seconds an answer stays in the cache
    scope = "key"              # "key": shared only among requests of one API key; "global": by everyone
    max_entries = 10000        # memory: LRU bounds
    max_bytes = 67108864
    max_entry_bytes = 1048576  # an answer larger than this is never stored
    across_processes = true    # with [cluster]: single-flight through Redis too (the default;
                               # false keeps it within each process)
    lease_ttl = 5.0            # with [cluster]: seconds a process's claim on an identical call lasts
                               # unless renewed

``DSPY_TRIO_CACHE`` (``off``, ``memory``, ``redis``) overrides ``backend``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ._errors import ConfigError
from ._tables import one_of
from ._validate import number, positive, positive_int

CacheBackend = Literal["off", "memory", "redis"]
CacheScope = Literal["key", "global"]

BACKENDS: tuple[CacheBackend, ...] = ("off", "memory", "redis")
SCOPES: tuple[CacheScope, ...] = ("key", "global")


def _flag(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


@attrs.frozen
class CacheConfig:
    """How identical LM calls are shared (``[cache]`` in TOML).

    "Identical" is decided per LM call: the LM, the model, the messages and the request parameters
    (what DSPy keys its own cache on, minus credentials and transport settings), and, under
    ``scope = "key"``, the caller's API key.

    Attributes:
        single_flight: Identical calls in flight at the same time share one upstream call (with a
            ``[cluster]``, also across processes).
        backend: ``off``, ``memory`` (per process, LRU) or ``redis`` (the ``[cluster]`` Redis, shared
            by every worker and replica).
        ttl: Seconds a stored answer is served.
        scope: ``key``: answers and in-flight calls are shared only among requests of the same API key
            (all requests when no keys are configured); ``global``: among all requests.
        max_entries: The memory cache's bound on answers (least recently used go first).
        max_bytes: The memory cache's bound on the answers' size.
        max_entry_bytes: Answers larger than this are not stored (nor handed to another process).
        across_processes: With a ``[cluster]``, identical calls in flight in other processes are
            shared too (through Redis: one round trip per LM call that finds no answer in the process,
            which the ``redis`` cache's lookup is anyway). None (the default): true.
        lease_ttl: Seconds a process's claim on a call lasts in Redis unless renewed (it renews its
            claims every third of it); a process that died is taken over once its heartbeats have
            stopped for three intervals, or its claims have expired, whichever comes first.
    """

    single_flight: bool = attrs.field(default=True, validator=_flag)
    backend: CacheBackend = attrs.field(default="off", validator=one_of(BACKENDS))
    ttl: float = attrs.field(default=3600.0, validator=positive)
    scope: CacheScope = attrs.field(default="key", validator=one_of(SCOPES))
    max_entries: int = attrs.field(default=10_000, validator=positive_int)
    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=positive_int)
    max_entry_bytes: int = attrs.field(default=1024 * 1024, validator=positive_int)
    across_processes: bool | None = attrs.field(default=None, validator=attrs.validators.optional(_flag))
    lease_ttl: float = attrs.field(default=5.0, validator=number(minimum=0.05, maximum=3600))

    def __attrs_post_init__(self) -> None:
        if self.max_entry_bytes > self.max_bytes:
            raise ConfigError(
                f"max_entry_bytes must be at most max_bytes ({self.max_bytes}), got {self.max_entry_bytes}"
            )

    @property
    def enabled(self) -> bool:
        """Whether LM calls go through the sharing layer at all."""
        return self.single_flight or self.backend != "off"

    @property
    def flights_across_processes(self) -> bool:
        """Whether single-flight reaches other processes when there is a ``[cluster]``."""
        if not self.single_flight:
            return False
        return True if self.across_processes is None else self.across_processes

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CacheConfig:
        """Build from the ``[cache]`` table.

        Raises:
            ConfigError: an unknown key or a bad value, named ``cache.KEY``.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"cache must be a table, got {data!r}")
        known = {field.name for field in attrs.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"cache: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            raise ConfigError(f"cache.{exc.message}") from exc
