"""Keeping exception groups out of the public API.

Nurseries wrap what escapes them in ``BaseExceptionGroup``. Callers of the engine should see the one
error that happened (``except OverloadedError:`` must work), so every public entry point that owns a
nursery, or runs user code that may, collapses a group with a single meaningful leaf back to that leaf.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the single exception a caller should see for ``group``.

    The only non-``Cancelled`` leaf when there is exactly one; otherwise a ``Cancelled`` leaf when the
    group holds nothing else (so cancellation keeps propagating); otherwise the group itself, which
    then really does describe several independent failures.
    """
    leaves = _leaves(group)
    real = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real:
        return leaves[0]
    return group


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for the background tasks of a context manager that yields to its caller.

    The nursery is cancelled when the ``async with`` block ends, and an exception escaping it reaches
    the caller as itself rather than wrapped in an exception group (see :func:`collapse`).
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise collapse(group) from None
