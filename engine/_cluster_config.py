"""The state shared by every worker and replica through Redis (``[cluster]``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigError
from ._validate import optional, positive


def _redis_url(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    # The URL is never shown: it may carry a password.
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ConfigError(
            f"{attribute.name} must be a redis://, rediss:// or unix:// URL, e.g. redis://127.0.0.1:6379/0"
        )


def _optional_secret(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    # The secret itself is never shown: only what is wrong with it.
    if value is None:
        return
    if not isinstance(value, str) or len(value) < 16:
        raise ConfigError(f"{attribute.name} must be a string of at least 16 characters")
    if value != value.strip():
        raise ConfigError(
            f"{attribute.name} has leading or trailing whitespace (a newline from a secret file?)"
        )


def shown_url(url: str) -> str:
    """``url`` without a password, for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}").geturl()


@attrs.frozen
class ClusterConfig:
    """State shared by every worker and replica through Redis (``[cluster]`` in TOML).

    Attributes:
        redis_url: ``redis://host:port/db``; None keeps every limit per process.
        key_prefix: Prefix of every Redis key and channel (one per deployment sharing a Redis).
        call_timeout: Seconds one Redis call may take (always also within the request's deadline);
            past it the process falls back to local limits until Redis answers again.
        heartbeat_interval: Seconds between heartbeats (how the processes sharing a quota are counted).
        secret: The key of the HMAC under which an owner (an API key) travels through Redis with a
            cancel; the same in every process of the deployment, at least 16 characters (e.g.
            ``openssl rand -hex 32``). Unset, the key is derived from
            ``key_prefix``, which anyone reading Redis knows: a warning says so at start.
    """

    redis_url: str | None = attrs.field(default=None, repr=False, validator=optional(_redis_url))
    key_prefix: str = "dspy-trio"
    call_timeout: float = attrs.field(default=0.5, validator=positive)
    heartbeat_interval: float = attrs.field(default=1.0, validator=positive)
    secret: str | None = attrs.field(default=None, repr=False, validator=_optional_secret)
