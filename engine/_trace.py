"""Per-request accounting that LM backends report into without knowing about the engine.

The engine opens a :class:`RequestTrace` around each request; Trio copies context variables into
child tasks, so every LM call the program makes, however deeply nested, adds to the same trace.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import attrs


@attrs.define
class RequestTrace:
    """Mutable totals of one request's LM calls."""

    lm_seconds: float = 0.0
    attempts: int = 0


_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "dspy_trio_request_trace", default=None
)


@contextmanager
def tracing() -> Iterator[RequestTrace]:
    """Open a fresh trace for the code inside the block (and the tasks it starts)."""
    trace = RequestTrace()
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)


def record_lm_call(seconds: float) -> None:
    """Add one LM call of ``seconds`` to the current request's trace, if there is one."""
    trace = _current.get()
    if trace is not None:
        trace.lm_seconds += seconds


def record_attempt() -> None:
    """Count one attempt of an LM call (retries make several) in the current request's trace."""
    trace = _current.get()
    if trace is not None:
        trace.attempts += 1
