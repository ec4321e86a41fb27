"""The configuration of fallbacks and circuit breakers: checking ``[lms.NAME] fallbacks``, resolving
each LM's chain, and which LMs get a breaker.

An LM's chain is the LM, then each of its ``fallbacks`` in order, each followed by its own fallbacks
(depth first, each LM once): ``a.fallbacks = ["b", "c"]`` and ``b.fallbacks = ["d"]`` make a's chain
``a, b, d, c``. A fallback that names an unknown LM, the LM itself, or closes a cycle is a
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from ._breaker import BreakerSettings
from ._errors import ConfigError


class _ChainedLM(Protocol):
    """What this module reads of an ``LMConfig``."""

    @property
    def fallbacks(self) -> tuple[str, ...]: ...

    @property
    def breaker(self) -> BreakerSettings | None: ...


def to_names(value: Any) -> Any:
    """``fallbacks`` as a tuple (TOML gives a list); anything else is left for the validator."""
    return tuple(value) if isinstance(value, list | tuple) else value


def names(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A validator: a sequence of distinct, non-empty LM names."""
    if not isinstance(value, tuple) or not all(isinstance(name, str) and name for name in value):
        raise ConfigError(f'{attribute.name} must be a list of LM names, e.g. ["backup"]; got {value!r}')
    if len(set(value)) != len(value):
        raise ConfigError(f"{attribute.name} names an LM twice: {list(value)!r}")


def check_fallbacks(lms: Mapping[str, _ChainedLM]) -> None:
    """Refuse fallbacks that name an unknown LM, the LM itself, or form a cycle.

    Raises:
        ConfigError: naming the ``lms.NAME.fallbacks`` key at fault.
    """
    for name, lm in lms.items():
        for other in lm.fallbacks:
            if other == name:
                raise ConfigError(f"LM {name!r}: fallbacks (lms.{name}.fallbacks) names the LM itself")
            if other not in lms:
                known = ", ".join(sorted(lms))
                raise ConfigError(
                    f"LM {name!r}: fallbacks (lms.{name}.fallbacks) names {other!r}, which is not a "
                    f"configured LM (configured: {known})"
                )
    for name in lms:
        _walk(name, lms, (name,))


def _walk(name: str, lms: Mapping[str, _ChainedLM], path: tuple[str, ...]) -> None:
    for other in lms[name].fallbacks:
        if other in path:
            cycle = " -> ".join((*path[path.index(other) :], other))
            raise ConfigError(f"LM {name!r}: fallbacks (lms.{name}.fallbacks) form a cycle: {cycle}")
        _walk(other, lms, (*path, other))


def chain(name: str, lms: Mapping[str, _ChainedLM]) -> tuple[str, ...]:
    """The LMs a call to ``name`` tries, in order: ``name`` first (see the module docstring). LMs
    missing from ``lms`` (backends given to the engine without a config) have no fallbacks."""
    order: list[str] = []

    def visit(current: str) -> None:
        if current in order:
            return
        order.append(current)
        config = lms.get(current)
        for other in config.fallbacks if config is not None else ():
            visit(other)

    visit(name)
    return tuple(order)


def breaker_settings(name: str, lms: Mapping[str, _ChainedLM]) -> BreakerSettings | None:
    """The breaker of LM ``name``: its own table; else the defaults when it is part of a fallback chain
    (it has fallbacks, or is one); else none. ``enabled = false`` turns it off."""
    config = lms.get(name)
    settings = config.breaker if config is not None else None
    if settings is None and _chained(name, lms):
        settings = BreakerSettings()
    return settings if settings is not None and settings.enabled else None


def _chained(name: str, lms: Mapping[str, _ChainedLM]) -> bool:
    config = lms.get(name)
    if config is not None and config.fallbacks:
        return True
    return any(name in other.fallbacks for other in lms.values())
