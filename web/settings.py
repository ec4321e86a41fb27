"""Settings of the HTTP service (the engine's own live in ``engine.EngineConfig``).

Environment (read by :meth:`ServiceSettings.from_env`; ``dspy-trio serve`` flags override them)::

    DSPY_TRIO_HOST, DSPY_TRIO_PORT          where to listen (127.0.0.1:8000)
    DSPY_TRIO_WORKERS                       worker processes (1)
    DSPY_TRIO_API_KEYS                      comma-separated keys; when set, requests need
                                            "Authorization: Bearer KEY" (/health and /ready stay open)
    DSPY_TRIO_CORS_ORIGINS                  comma-separated origins allowed by CORS (none)
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

import os
from collections.abc import Mapping

import attrs

from engine import ConfigError, EngineConfig


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


@attrs.frozen
class ServiceSettings:
    """How the service listens, protects itself and bounds requests.

    Attributes:
        engine: The engine's configuration.
        host, port: Where to listen; port 0 picks a free one.
        workers: Worker processes; each has its own engine, limits and metrics.
        api_keys: Accepted bearer keys; empty means no authentication.
        cors_origins: Origins allowed by CORS; empty means CORS headers are never sent.
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
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    default_timeout: float = 60.0
    max_timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    max_input_chars: int = 100_000
    max_json_depth: int = 32
    keep_alive_timeout: float = 5.0
    sse_keepalive: float = 15.0
    max_batch_items: int = 1000
    max_batch_concurrency: int = 64
    ws_max_requests: int = 16
    ws_ping_interval: float | None = 20.0
    dead_peer_timeout: float | None = 30.0

    def timeout_for(self, asked: float | None) -> float:
        """Seconds a request may run: what it asked for (already checked positive), capped at
        ``max_timeout``; ``default_timeout`` when it asked for nothing."""
        return float(min(asked or self.default_timeout, self.max_timeout))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceSettings:
        env = os.environ if env is None else env

        def number(key: str, default: float) -> float:
            try:
                return float(env[key]) if env.get(key) else default
            except ValueError as exc:
                raise ConfigError(f"{key} must be a number, got {env[key]!r}") from exc

        defaults = cls()
        return cls(
            engine=EngineConfig.from_env(env),
            host=env.get("DSPY_TRIO_HOST") or defaults.host,
            port=int(number("DSPY_TRIO_PORT", defaults.port)),
            workers=int(number("DSPY_TRIO_WORKERS", defaults.workers)),
            api_keys=_split(env.get("DSPY_TRIO_API_KEYS")),
            cors_origins=_split(env.get("DSPY_TRIO_CORS_ORIGINS")),
            default_timeout=number("DSPY_TRIO_DEFAULT_TIMEOUT", defaults.default_timeout),
            max_timeout=number("DSPY_TRIO_MAX_TIMEOUT", defaults.max_timeout),
            max_body_bytes=int(number("DSPY_TRIO_MAX_BODY_BYTES", defaults.max_body_bytes)),
            max_input_chars=int(number("DSPY_TRIO_MAX_INPUT_CHARS", defaults.max_input_chars)),
            max_json_depth=int(number("DSPY_TRIO_MAX_JSON_DEPTH", defaults.max_json_depth)),
            keep_alive_timeout=number("DSPY_TRIO_KEEP_ALIVE_TIMEOUT", defaults.keep_alive_timeout),
            ws_ping_interval=number("DSPY_TRIO_WS_PING_INTERVAL", defaults.ws_ping_interval or 0) or None,
            dead_peer_timeout=number("DSPY_TRIO_DEAD_PEER_TIMEOUT", defaults.dead_peer_timeout or 0) or None,
        )
