"""One gate for HTTP and WebSocket: API keys, CORS preflight, and the WebSocket Origin policy.

Rules (docs/security.md states them):

- With ``api_keys`` configured, every request except ``/health``, ``/ready``, the playground, the API's
  description (``/docs``, ``/openapi.json``) and the static files needs ``Authorization: Bearer KEY`` (a
  WebSocket may pass ``?api_key=KEY``). The key, compared in constant time, is the request's *owner*:
  only the same key may cancel it. Without keys the owner is ``""`` for everyone, so anyone may cancel
  (as anyone may call).
- A CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is never authenticated: browsers
  send it without credentials.
- A WebSocket handshake from a browser (it has an ``Origin``) is refused unless that origin is the
  server's own or one of ``cors_origins``; clients that send no ``Origin`` (non-browser) are allowed.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from .errors import HTTPError
from .settings import ServiceSettings


class Headers(Protocol):
    """Case-insensitive request headers (werkzeug's)."""

    def get(self, key: str) -> str | None: ...

    def __contains__(self, key: str, /) -> bool: ...


# The probes, the playground, and the API's description (/docs, whose Swagger UI asks for the key).
OPEN_PATHS = frozenset({"/health", "/ready", "/", "/docs", "/openapi.json"})


def _public(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _matching_key(given: str, keys: tuple[str, ...]) -> str | None:
    # Compare against every key (no early exit) so the time does not tell which prefix matched.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    return next((key for key, ok in zip(keys, matches, strict=True) if ok), None)


def _same_origin(origin: str, host: str | None) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == (host or "").lower()


def authorize(
    settings: ServiceSettings,
    *,
    method: str,
    path: str,
    headers: Headers,
    query: Mapping[str, str] | None = None,
    websocket: bool = False,
) -> str:
    """Admit a request or raise; return its owner key ("" when no keys are configured).

    Args:
        settings: Keys and CORS origins.
        method, path, headers: The request's.
        query: Its query arguments (``api_key`` is read from them for WebSockets only).
        websocket: Whether this is a WebSocket handshake (the Origin policy applies).

    Raises:
        HTTPError: 403 ``origin_not_allowed`` for a WebSocket from a foreign origin; 401
            ``invalid_api_key`` when a key is required and missing or wrong.
    """
    if websocket:
        origin = headers.get("Origin")
        if origin and origin not in settings.cors_origins and not _same_origin(origin, headers.get("Host")):
            raise HTTPError(
                403,
                f"WebSocket connections from origin {origin!r} are not allowed",
                type="permission_error",
                code="origin_not_allowed",
            )
    if not settings.api_keys or _public(path):
        return ""
    if method == "OPTIONS" and "Access-Control-Request-Method" in headers:
        return ""  # a CORS preflight carries no credentials
    scheme, _, given = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" and websocket and query is not None:
        given = query.get("api_key", "")
    elif scheme.lower() != "bearer":
        given = ""
    key = _matching_key(given.strip(), settings.api_keys) if given else None
    if key is None:
        raise HTTPError(
            401,
            "a valid API key is required (Authorization: Bearer KEY)",
            type="authentication_error",
            code="invalid_api_key",
        )
    return key
