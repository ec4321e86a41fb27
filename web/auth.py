"""Who may call: API keys, CORS preflight, and the WebSocket Origin policy, for HTTP and WebSocket alike.

The front door (:mod:`dspy_trio.web.door`) calls :func:`authorize` once per request, with the route the
path matched. Rules (docs/security.md states them):

- With keys configured (``api_keys``, or a tenant's ``keys``), every request needs
  ``Authorization: Bearer KEY`` (a WebSocket may pass ``?api_key=KEY``) except on the routes the route
  table marks ``open`` (:data:`dspy_trio.web.routes.ROUTES`: ``/health``, ``/ready``, the playground,
  the API's description ``/docs`` and ``/openapi.json``, the static files); a path no route matches
  needs a key too (so a 401 comes before a 404). The key, looked up by its SHA-256 digest
  (:mod:`dspy_trio.web.keys`), is the request's *owner*: only the same key may cancel it (the engine
  checks, :mod:`dspy_trio.engine._owners`); its tenant is whose share, limits and budget the request
  counts against. Without keys the owner is ``""`` for everyone, so anyone may cancel (as anyone may
  call), and the tenant None (the engine's ``default``).
- A CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is never authenticated: browsers
  send it without credentials.
- A WebSocket handshake from a browser (it has an ``Origin``) is refused unless that origin is the
  server's own or one of ``cors_origins``; clients that send no ``Origin`` (non-browser) are allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from .errors import HTTPError
from .routing import Route
from .settings import ServiceSettings


class Headers(Protocol):
    """A request's headers by lower-case name (the first value of a repeated header, as werkzeug reads)."""

    def get(self, key: str) -> str | None: ...

    def __contains__(self, key: str, /) -> bool: ...


def _same_origin(origin: str, host: str | None) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == (host or "").lower()


def origin_refusal(settings: ServiceSettings, headers: Headers, what: str = "requests") -> HTTPError | None:
    """The 403 ``origin_not_allowed`` of a browser's request (it has an ``Origin``) from a page that is
    neither the server's own origin nor one of ``cors_origins``; None for any other request."""
    origin = headers.get("origin")
    if origin and origin not in settings.cors_origins and not _same_origin(origin, headers.get("host")):
        return HTTPError(
            403,
            f"{what} from origin {origin[:200]!r} are not allowed",
            type="permission_error",
            code="origin_not_allowed",
        )
    return None


def authorize(
    settings: ServiceSettings,
    route: Route | None,
    *,
    method: str,
    headers: Headers,
    query: Mapping[str, str] | None = None,
    websocket: bool = False,
) -> tuple[str, str | None]:
    """Admit a request or raise; return its owner key and its tenant (``""`` and None when no keys are
    configured, or on an open route). Never blocks.

    Args:
        settings: Keys and CORS origins.
        route: The route the request's path matched (None: no route, a key is needed).
        method, headers: The request's (header names in lower case).
        query: Its query arguments (``api_key`` is read from them for WebSockets only).
        websocket: Whether this is a WebSocket handshake (the Origin policy applies).

    Raises:
        HTTPError: 403 ``origin_not_allowed`` for a WebSocket from a foreign origin; 401
            ``invalid_api_key`` when a key is required and missing or wrong.
    """
    if websocket and (refusal := origin_refusal(settings, headers, "WebSocket connections")) is not None:
        raise refusal
    if not len(settings.keys) or (route is not None and route.open):
        return "", None
    if method == "OPTIONS" and "access-control-request-method" in headers:
        return "", None  # a CORS preflight carries no credentials
    scheme, _, given = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" and websocket and query is not None:
        given = query.get("api_key", "")
    elif scheme.lower() != "bearer":
        given = ""
    key = given.strip()
    tenant = settings.keys.tenant_of(key) if key else None
    if tenant is None:
        raise HTTPError(
            401,
            "a valid API key is required (Authorization: Bearer KEY)",
            type="authentication_error",
            code="invalid_api_key",
        )
    return key, tenant
