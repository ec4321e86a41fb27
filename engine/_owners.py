"""Who may cancel what: the one ownership rule, for requests, streams and batches, in this process and in
every other process of a cluster.

A request, stream or batch may be started with an ``owner`` (the web layer passes the caller's API key).
A cancel that names an owner reaches only what that same owner started; an ownerless request is nobody's,
so it is not reached by a cancel that names an owner. A cancel that names no owner is the application's
own (an embedding program, the engine's shutdown) and reaches everything.

A cancel that comes from another process carries a keyed digest of the owner instead of the owner itself
(``dspy_trio.engine.cluster``): the check is the same, made on the digests, in the process that runs the
request.
"""

from __future__ import annotations

from collections.abc import Callable

# Given the owner a request was started with (None: ownerless), whether this cancel may reach it.
OwnerCheck = Callable[[str | None], bool]


def anyone(started_by: str | None) -> bool:
    """The application's own cancel: reaches every request."""
    return True


def owner_check(owner: str | None) -> OwnerCheck:
    """The check of a cancel on behalf of ``owner`` (None: the application itself)."""
    if owner is None:
        return anyone

    def same_owner(started_by: str | None) -> bool:
        return started_by is not None and started_by == owner

    return same_owner
