"""HTTP's view of the response cache and single-flight: ``Cache-Control`` in, ``Cache-Status`` out.

A request opts out with ``Cache-Control: no-cache`` (join no identical call in flight, read no cached
answer: a fresh upstream call) and ``no-store`` (store none of its answers); other directives are
ignored. A successful prediction says what happened in ``Cache-Status`` (RFC 9211), under the cache's
name ``dspy-trio``:

- ``dspy-trio; hit``: every LM call was answered from the cache;
- ``dspy-trio; fwd=partial``: some were;
- ``dspy-trio; fwd=miss``: none (``fwd=bypass`` while the cache is off);
- ``dspy-trio; fwd=request``: the request said ``no-cache``;

with ``; collapsed`` when some LM call shared an identical call in flight (single-flight).
"""

from __future__ import annotations

from dspy_trio.engine import Engine, Timings

CACHE_NAME = "dspy-trio"


def cache_switches(value: str | None) -> tuple[bool, bool]:
    """``(no_cache, no_store)`` from a request's ``Cache-Control`` value (any case; other directives and
    their values ignored)."""
    if not value:
        return False, False
    directives = {part.split("=", 1)[0].strip().lower() for part in value.split(",")}
    return "no-cache" in directives, "no-store" in directives


def cache_status(timings: Timings, *, no_cache: bool, cache_on: bool) -> str:
    """The ``Cache-Status`` of a successful prediction with these timings."""
    if timings.cached:
        return f"{CACHE_NAME}; hit"
    if no_cache:
        forward = "request"
    elif timings.cached_calls:
        forward = "partial"
    else:
        forward = "miss" if cache_on else "bypass"
    collapsed = "; collapsed" if timings.shared_calls else ""
    return f"{CACHE_NAME}; fwd={forward}{collapsed}"


def cache_status_of(engine: Engine, timings: Timings, *, no_cache: bool) -> str | None:
    """The ``Cache-Status`` of a prediction ``engine`` answered, or None when single-flight and the
    cache are both off."""
    if engine.sharing is None:
        return None
    return cache_status(timings, no_cache=no_cache, cache_on=engine.config.cache.backend != "off")
