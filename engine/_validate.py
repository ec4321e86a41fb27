"""attrs validators for the engine's frozen configuration values.

Every value checks itself when it is built, so a bad number is refused where it is written (a TOML
key, an environment variable, a constructor argument) instead of failing later at run time: NaN is
not a sleep, 0 connections is not a pool, ``inf`` attempts never end. Each failure is a
:class:`ConfigError` naming the field and the bad value (never a secret's value); ``_tables.build``
prefixes the TOML table or the environment variable.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    integer: bool = False,
) -> Validator:
    """A finite number (an ``int`` when ``integer``) within the given bounds (inclusive ``minimum`` /
    ``maximum``, exclusive ``above`` / ``below``)."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        name = attribute.name
        if integer and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if not _is_number(value):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if minimum is not None and not value >= minimum:
            raise ConfigError(f"{name} must {_at_least(minimum)}, got {value!r}")
        if above is not None and not value > above:
            bound = "be positive" if above == 0 else f"be greater than {above:g}"
            raise ConfigError(f"{name} must {bound}, got {value!r}")
        if maximum is not None and not value <= maximum:
            raise ConfigError(f"{name} must be at most {maximum:g}, got {value!r}")
        if below is not None and not value < below:
            raise ConfigError(f"{name} must be less than {below:g}, got {value!r}")

    return check


def _at_least(minimum: float) -> str:
    if minimum == 0:
        return "not be negative"
    return f"be at least {minimum:g}"


def optional(validator: Validator) -> Validator:
    """``validator``, or None."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            validator(instance, attribute, value)

    return check


positive = number(above=0)
non_negative = number(minimum=0)
positive_int = number(above=0, integer=True)
non_negative_int = number(minimum=0, integer=True)
optional_positive = optional(positive)


def http_url(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """An http(s) URL a connection can be opened to: a host (an IPv6 address in brackets must be one)
    and, if given, a port from 1 to 65535. What ``urlsplit`` raises on (an unclosed ``[``) and what it
    only raises on later (``.port``) are refused here, so a bad URL is a ConfigError, not a traceback at
    the first call."""
    if not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a URL, got {value!r}")
    problem = None
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError: not a number, or out of 0-65535
        host = parts.hostname
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
            problem = "not an http:// or https:// URL"
        elif not host:
            problem = "no host"
        elif port == 0:
            problem = "port 0"
        elif ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                problem = f"{host!r} in brackets is not an IPv6 address"
    if problem is not None:
        raise ConfigError(
            f"{attribute.name} must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1;"
            f" got {value!r} ({problem})"
        )


def header_value(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A string that can be sent in an HTTP header as it is (an API key). The value is never shown:
    only what is wrong with it."""
    if not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a string")
    if value != value.strip():
        raise ConfigError(
            f"{attribute.name} has leading or trailing whitespace (a newline from a secret file?)"
        )
    if not (value.isascii() and value.isprintable()):
        raise ConfigError(f"{attribute.name} has characters that cannot be sent in an HTTP header")


def json_compliant(value: Any, where: str) -> None:
    """Refuse what cannot be sent as JSON: NaN and infinities (which ``json.loads`` and TOML accept),
    and keys that are not strings.

    Raises:
        ConfigError: naming ``where`` and the bad value.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where} has a key that is not a string: {key!r}")
            json_compliant(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            json_compliant(item, f"{where}[{index}]")
