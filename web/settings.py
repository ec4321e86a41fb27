"""Settings of the HTTP service (the engine's own live in ``dspy_trio.engine.EngineConfig``).

Environment (read by :meth:`ServiceSettings.from_env`; ``dspy-trio serve`` flags override them)::

    DSPY_TRIO_HOST, DSPY_TRIO_PORT          where to listen (127.0.0.1:8000)
    DSPY_TRIO_WORKERS                       worker processes (1)
    DSPY_TRIO_API_KEYS                      comma-separated keys, each a tenant of its own; when set (or a
                                            [tenants.NAME] has keys), requests need
                                            "Authorization: Bearer KEY" (/health and /ready stay open)
    DSPY_TRIO_CORS_ORIGINS                  comma-separated origins allowed by CORS (none)
    DSPY_TRIO_ALLOWED_HOSTS                 comma-separated host names requests may name in Host besides
                                            localhost and the bound address ("*": any; see web/hosts.py)
    DSPY_TRIO_DEFAULT_TIMEOUT               seconds a request may take when it names none (60)
    DSPY_TRIO_MAX_TIMEOUT                   the most a request may ask for (300)
    DSPY_TRIO_MAX_BODY_BYTES                request body limit (1 MiB)
    DSPY_TRIO_MAX_INPUT_CHARS               limit on the text of all input fields together (100,000)
    DSPY_TRIO_MAX_JSON_DEPTH                nesting limit of JSON bodies and WebSocket frames (32)
    DSPY_TRIO_KEEP_ALIVE_TIMEOUT            seconds an idle keep-alive connection stays open (5)
    DSPY_TRIO_WS_PING_INTERVAL              seconds between WebSocket pings (20; 0 for none)
    DSPY_TRIO_DEAD_PEER_TIMEOUT             seconds after which TCP drops a peer that stopped answering
                                            (30; 0 leaves the kernel's defaults)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from dspy_trio.engine import ConfigError, EngineConfig

from .keys import KeyRing


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _number(*, integer: bool = False, minimum: float | None = None, maximum: float | None = None) -> Any:
    """An attrs validator: a finite number (an ``int`` when ``integer``), positive unless a ``minimum``
    is given, and at most ``maximum``. Errors name the field; :meth:`ServiceSettings.from_env` adds the
    variable."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        name = attribute.name
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if minimum is None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum:g}, got {value!r}")

    return check


def _optional(check: Callable[[object, attrs.Attribute[Any], Any], None]) -> Any:
    def optional(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(instance, attribute, value)

    return optional


def _host(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{attribute.name} must be a host name or address, got {value!r}")


_seconds = _number()
_count = _number(integer=True)
_port = _number(integer=True, minimum=0, maximum=65535)  # 0 picks a free port


@attrs.frozen
class ServiceSettings:
    """How the service listens, protects itself and bounds requests.

    Every value is checked when the settings are built: a bad one is a :class:`dspy_trio.engine.ConfigError`
    naming the field (or, from :meth:`from_env`, the variable and its value).

    Attributes:
        engine: The engine's configuration.
        host, port: Where to listen; port 0 picks a free one.
        workers: Worker processes; each has its own engine, limits and metrics.
        api_keys: Accepted bearer keys (``DSPY_TRIO_API_KEYS``), each a tenant of its own; with these
            empty and no tenant with keys (``[tenants.NAME]`` of the engine), no authentication.
        cors_origins: Origins allowed by CORS; empty means CORS headers are never sent.
        allowed_hosts: Host names a request's ``Host`` may carry besides ``localhost``, ``127.0.0.1``,
            ``[::1]`` and the bound address, which are all a server bound to loopback answers for
            otherwise (DNS rebinding: :mod:`dspy_trio.web.hosts`); ``*`` for any. Bound elsewhere, a
            server answers any ``Host`` unless names are listed.
        default_timeout: Seconds a request may run when it names no timeout.
        max_timeout: The most a request may ask for (``timeout_secs`` or ``X-Request-Timeout``).
        max_body_bytes: Request bodies and WebSocket frames larger than this get 413 (an error frame).
        max_input_chars: Inputs whose text is longer in total get 413 (an error frame).
        max_json_depth: JSON nested deeper than this gets 400 (an error frame), before it is parsed.
        keep_alive_timeout: Seconds an idle HTTP keep-alive connection stays open; also the most an
            answer sent before the request body arrived waits for that body.
        sse_keepalive: Seconds between SSE keep-alive comments while a stream is quiet.
        max_batch_items: Items one batch request may hold (more get 413).
        max_batch_concurrency: The most items of one batch that run at once.
        ws_max_requests: Concurrent requests one WebSocket may run.
        ws_ping_interval: Seconds between WebSocket keep-alive pings (Hypercorn's); None for none.
        dead_peer_timeout: Seconds after which the kernel drops a connection whose peer stopped
            answering without closing it (TCP keep-alive probes on idle connections,
            ``TCP_USER_TIMEOUT`` on busy ones); None leaves the kernel's defaults (about 15 minutes).
    """

    engine: EngineConfig = attrs.field(factory=EngineConfig)
    host: str = attrs.field(default="127.0.0.1", validator=_host)
    port: int = attrs.field(default=8000, validator=_port)
    workers: int = attrs.field(default=1, validator=_count)
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), validator=attrs.validators.deep_iterable(_host))
    default_timeout: float = attrs.field(default=60.0, validator=_seconds)
    max_timeout: float = attrs.field(default=300.0, validator=_seconds)
    max_body_bytes: int = attrs.field(default=1 << 20, validator=_count)
    max_input_chars: int = attrs.field(default=100_000, validator=_count)
    max_json_depth: int = attrs.field(default=32, validator=_count)
    keep_alive_timeout: float = attrs.field(default=5.0, validator=_seconds)
    sse_keepalive: float = attrs.field(default=15.0, validator=_seconds)
    max_batch_items: int = attrs.field(default=1000, validator=_count)
    max_batch_concurrency: int = attrs.field(default=64, validator=_count)
    ws_max_requests: int = attrs.field(default=16, validator=_count)
    ws_ping_interval: float | None = attrs.field(default=20.0, validator=_optional(_seconds))
    dead_peer_timeout: float | None = attrs.field(default=30.0, validator=_optional(_seconds))
    # Every accepted key and its tenant, built (and checked: a key in two places is a ConfigError) once.
    keys: KeyRing = attrs.field(
        init=False,
        repr=False,
        eq=False,
        default=attrs.Factory(
            lambda self: KeyRing.build(self.api_keys, self.engine.tenants), takes_self=True
        ),
    )

    def timeout_for(self, asked: float | None) -> float:
        """Seconds a request may run: what it asked for (already checked positive), capped at
        ``max_timeout``; ``default_timeout`` when it asked for nothing."""
        return float(min(asked or self.default_timeout, self.max_timeout))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read the ``DSPY_TRIO_*`` variables above (and the engine's, :meth:`EngineConfig.from_env`).

        Raises:
            engine.ConfigError: naming the variable and its value.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        fields = attrs.fields_dict(cls)
        for key, name in _VARIABLES.items():
            if not env.get(key):
                continue
            field = fields[name]
            values[name] = _parse(key, env[key], integer=field.type in ("int", int))
            if key in _ZERO_FOR_NONE and values[name] == 0:
                values[name] = None
            elif field.validator is not None:
                try:
                    field.validator(None, field, values[name])
                except ConfigError as exc:
                    raise ConfigError(f"{key}={env[key]!r}: {exc.message}") from exc
        if env.get("DSPY_TRIO_HOST"):
            values["host"] = env["DSPY_TRIO_HOST"]
        return cls(
            engine=EngineConfig.from_env(env),
            api_keys=_split(env.get("DSPY_TRIO_API_KEYS")),
            cors_origins=_split(env.get("DSPY_TRIO_CORS_ORIGINS")),
            allowed_hosts=_split(env.get("DSPY_TRIO_ALLOWED_HOSTS")),
            **values,
        )


# The numeric variables and the fields they set.
_VARIABLES = {
    "DSPY_TRIO_PORT": "port",
    "DSPY_TRIO_WORKERS": "workers",
    "DSPY_TRIO_DEFAULT_TIMEOUT": "default_timeout",
    "DSPY_TRIO_MAX_TIMEOUT": "max_timeout",
    "DSPY_TRIO_MAX_BODY_BYTES": "max_body_bytes",
    "DSPY_TRIO_MAX_INPUT_CHARS": "max_input_chars",
    "DSPY_TRIO_MAX_JSON_DEPTH": "max_json_depth",
    "DSPY_TRIO_KEEP_ALIVE_TIMEOUT": "keep_alive_timeout",
    "DSPY_TRIO_WS_PING_INTERVAL": "ws_ping_interval",
    "DSPY_TRIO_DEAD_PEER_TIMEOUT": "dead_peer_timeout",
}
_ZERO_FOR_NONE = frozenset({"DSPY_TRIO_WS_PING_INTERVAL", "DSPY_TRIO_DEAD_PEER_TIMEOUT"})  # 0: none


def _parse(key: str, text: str, *, integer: bool) -> float | int:
    """A variable's number (an integer: ``8000`` or ``1e6``, never ``80.5``), naming it when it is not one."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {text!r}") from None
    if not integer:
        return value
    if not value.is_integer():
        raise ConfigError(f"{key} must be an integer, got {text!r}")
    return int(value)
