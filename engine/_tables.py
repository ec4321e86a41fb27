"""Frozen configuration values built from TOML tables, with errors that name the key.

Every configuration value of the engine is an ``@attrs.frozen`` class whose fields are the keys of its
table. :func:`build` makes one from a table (a mapping): nested tables become the frozen values their
field declares with :func:`nested`, and a bad value is a ``ConfigError`` naming the whole TOML key
(``lms.big.http.read_timeout must be a finite number``) or the environment variable that set it
(``LM_TIMEOUT='inf': read_timeout must be ...``). The values check themselves (``_validate``); this
module only finds and names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ._errors import ConfigError

_T = TypeVar("_T")

_TABLE = "dspy_trio.table"  # field metadata: the frozen value a nested table becomes


def nested(kind: type[Any], *, optional: bool = False) -> Any:
    """A field holding a nested table (``[lms.NAME.retry]``): a ``kind`` value, its defaults unless
    given (None unless given, when ``optional``: present means on)."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, kind) and not (optional and value is None):
            raise ConfigError(f"{attribute.name} must be a table ({kind.__name__}), got {value!r}")

    if optional:
        return attrs.field(default=None, validator=check, metadata={_TABLE: kind})
    return attrs.field(factory=kind, validator=check, metadata={_TABLE: kind})


def one_of(options: tuple[str, ...]) -> Any:
    """A validator: the value is one of ``options``."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in options:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(options)}; got {value!r}")

    return check


def copy_mapping(value: Any) -> Any:
    """A converter: a mapping is copied, so that a frozen value does not change behind its back."""
    return dict(value) if isinstance(value, Mapping) else value


def fields_of(cls: type[Any]) -> set[str]:
    """The keys of ``cls``'s table."""
    return {field.name for field in attrs.fields(cls)}


def default_of(cls: type[Any], name: str) -> Any:
    """The default of ``cls``'s field ``name`` (a new one, for a factory)."""
    default: Any = attrs.fields_dict(cls)[name].default
    return default.factory() if isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]


def shallow(value: Any) -> dict[str, Any]:
    """A frozen value as its table, one level deep (nested values stay values)."""
    return {field.name: getattr(value, field.name) for field in attrs.fields(type(value))}


def named(exc: ConfigError, where: str, known: set[str], names: Mapping[str, str] | None) -> ConfigError:
    """``exc`` (whose message starts with the field it is about) with the TOML key or the variable that
    set the field in front: ``where`` + the field, or ``names[field]`` (``VARIABLE='value'``)."""
    field = exc.message.split(" ", 1)[0].split(".", 1)[0]
    if names and field in names:
        return ConfigError(f"{names[field]}: {exc.message}")
    joiner = "." if field in known and not where.endswith("*") else ": "
    return ConfigError(f"{where}{joiner}{exc.message}")


def build(
    cls: type[_T], values: Mapping[str, Any], where: str, *, names: Mapping[str, str] | None = None
) -> _T:
    """``cls(**values)``, nested tables built first.

    Args:
        where: The table's TOML key (``lms.big``), or ``LM_*`` for values from the environment.
        names: Field -> ``VARIABLE='value'``, for the fields an environment variable set.

    Raises:
        ConfigError: an unknown key, or a bad value, named.
    """
    values = dict(values)
    known = fields_of(cls)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        kind = field.metadata.get(_TABLE)
        if kind is None or field.name not in values:
            continue
        value = values[field.name]
        if isinstance(value, Mapping):
            values[field.name] = build(kind, value, f"{where}.{field.name}")
        elif value is not None and not isinstance(value, kind):
            raise ConfigError(f"{where}.{field.name} must be a table, got {value!r}")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise named(exc, where, known, names) from exc
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
