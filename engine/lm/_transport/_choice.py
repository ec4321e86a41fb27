"""Which transport serves a base URL: the lean one, or httpx for what the lean one does not cover.

The lean transport speaks HTTP/1.1 straight to the origin. httpx is chosen instead when:

- an HTTP proxy applies to the URL: ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` (either case) is
  set for its scheme and ``NO_PROXY`` does not exempt its host (decided with the standard library's
  reading of the proxy variables; ``NO_PROXY`` as curl reads it);
- HTTP/2 is asked for;
- ``client = "httpx"`` is asked for explicitly (``HTTPSettings.client``).
"""

from __future__ import annotations

import urllib.request
from typing import Literal
from urllib.parse import urlsplit

TransportName = Literal["auto", "lean", "httpx"]


def proxy_for(url: str) -> str | None:
    """The proxy URL the environment sets for ``url``, or None (none set, or ``NO_PROXY`` exempts it)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    if _exempt(parts.hostname or "", parts.port, proxies.get("no", "")):
        return None
    return proxy


def _exempt(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` exempts ``host``: ``*``, the host itself, a parent domain (``example.com``
    or ``.example.com``), or ``host:port``."""
    host = host.lower().strip("[]")
    for entry in (part.strip().lower() for part in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and port is not None and entry_port != str(port):
            continue
        name = name.lstrip(".").strip("[]")
        if host == name or host.endswith("." + name):
            return True
    return False


def choose(url: str, transport: TransportName = "auto", *, http2: bool = False) -> Literal["lean", "httpx"]:
    """``"lean"`` or ``"httpx"`` for requests to ``url`` (see the module docstring)."""
    if transport == "httpx" or http2:
        return "httpx"
    if transport == "lean":
        return "lean"
    return "httpx" if proxy_for(url) is not None else "lean"
