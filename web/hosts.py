"""Which ``Host`` a request may name: the defence against DNS rebinding of a server on loopback.

A web page's origin is its host name. A page on ``http://rebind.attacker.example:8000`` whose name the
attacker then points at ``127.0.0.1`` is *same-origin* with a server listening there: the browser lets
it call the server and read the answers, so neither CORS nor the WebSocket ``Origin`` check stops it.
What the page cannot change is the ``Host`` header, which names the attacker's host. So:

- A server bound only to loopback addresses (``127.0.0.0/8``, ``::1``; the default ``127.0.0.1``)
  answers only requests whose ``Host`` is ``localhost``, ``127.0.0.1``, ``[::1]``, the address it is
  bound to, or a name listed in ``allowed_hosts`` (``DSPY_TRIO_ALLOWED_HOSTS``: a local reverse proxy
  that forwards the public ``Host``). Others get ``421`` ``host_not_allowed`` and the connection closes
  (:mod:`dspy_trio.web.protocol`).
- A server bound elsewhere (``0.0.0.0``, a LAN address) is reached under names it cannot know: any
  ``Host`` is answered, unless ``allowed_hosts`` lists names; then only those, the loopback names and
  the address it is bound to (unless that is ``0.0.0.0`` or ``::``).
- ``*`` in ``allowed_hosts`` answers any ``Host``. A request without ``Host`` (HTTP/1.0) is answered:
  browsers always send one.

The port is not compared (the name is what a rebinding page cannot choose); names compare without case
and without a trailing dot. A request costs one dictionary lookup more.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def host_name(value: bytes) -> bytes:
    """The name in a ``Host`` value (``b"Example.com.:80"`` -> ``b"example.com"``, ``b"[::1]:80"`` ->
    ``b"[::1]"``): without its port and trailing dot, lower-cased."""
    if value.startswith(b"["):
        end = value.find(b"]")
        name = value[: end + 1] if end >= 0 else value
    else:
        name = value.partition(b":")[0]
    return name.rstrip(b".").lower()


def _as_host(name: str) -> bytes:
    """A configured name or a bound address as a ``Host`` names it (IPv6 literals in brackets)."""
    if ":" in name and not name.startswith("["):
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            pass
        else:
            name = f"[{name}]"
    return host_name(name.encode("idna" if not name.isascii() else "ascii"))


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified  # 0.0.0.0, ::
    except ValueError:
        return False


@attrs.frozen
class AllowedHosts:
    """The host names a server answers for (see the module's rules); build with :meth:`for_server`."""

    names: frozenset[bytes]

    def allows(self, host: bytes) -> bool:
        """Whether a request whose ``Host`` header is ``host`` may be answered."""
        return host_name(host) in self.names

    @classmethod
    def for_server(cls, bound: Iterable[str], allowed: Iterable[str] = ()) -> AllowedHosts | None:
        """The names a server bound to the addresses ``bound`` answers for, with the configured
        ``allowed`` names; None when it answers any ``Host``."""
        bound, allowed = list(bound), list(allowed)
        if "*" in allowed or (not allowed and not all(_loopback(address) for address in bound)):
            return None
        names = [*LOOPBACK_NAMES, *(address for address in bound if not _unspecified(address)), *allowed]
        return cls(frozenset(_as_host(name) for name in names))


__all__ = ["LOOPBACK_NAMES", "AllowedHosts", "host_name"]
