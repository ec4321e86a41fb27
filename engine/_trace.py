"""Per-request accounting that LM backends report into without knowing about the engine.

The engine opens a :class:`RequestTrace` around each request; Trio copies context variables into
child tasks, so every LM call the program makes, however deeply nested, adds to the same trace.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._result import LMCall

_NO_PARAMS: Mapping[str, Any] = {}


@attrs.define
class RequestTrace:
    """Mutable totals of one request's LM calls, and the parameters the request gives every one of them.

    Attributes:
        lm_seconds: Time inside LM calls.
        attempts: LM call attempts, retries included.
        truncated: Whether a call's answer stopped at its token limit (``max_tokens``).
        lm_params: Request parameters of every LM call the request makes (``temperature``,
            ``max_tokens``, ...): over the LM's own defaults and DSPy's per-call ones.
    """

    lm_seconds: float = 0.0
    lm_calls: int = 0
    attempts: int = 0
    cached_calls: int = 0  # LM calls answered from the response cache
    shared_calls: int = 0  # LM calls answered by an identical call in flight (this process or another)
    saved_tokens: int = 0  # tokens of those answers: no upstream call was made for them
    answers: list[LMCall] = attrs.field(factory=list)  # each LM call, named by the LM that answered
    truncated: bool = False
    lm_params: Mapping[str, Any] = _NO_PARAMS


_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "dspy_trio_request_trace", default=None
)


class tracing:  # lower case: used as ``with tracing() as trace``, like the function it replaced
    """Open a fresh trace for the code inside the block (and the tasks it starts).

    A plain class, not a generator context manager: it is entered once per request.
    """

    __slots__ = ("_token", "trace")

    def __init__(self, lm_params: Mapping[str, Any] | None = None) -> None:
        self.trace = RequestTrace(lm_params=lm_params or _NO_PARAMS)
        self._token: contextvars.Token[RequestTrace | None] | None = None

    def __enter__(self) -> RequestTrace:
        self._token = _current.set(self.trace)
        return self.trace

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None
        _current.reset(self._token)


def detached() -> RequestTrace:
    """A fresh trace for the rest of this task (its context is its own copy): for a task that serves
    many requests, such as a shared LM call, whose counts belong to none of them."""
    trace = RequestTrace()
    _current.set(trace)
    return trace


def record_lm_call(seconds: float) -> None:
    """Add one LM call of ``seconds`` to the current request's trace, if there is one."""
    trace = _current.get()
    if trace is not None:
        trace.lm_seconds += seconds
        trace.lm_calls += 1


def record_saved(*, cached: bool, tokens: int) -> None:
    """Count one LM call answered without an upstream call of its own (from the cache when ``cached``,
    else by an identical call in flight), worth ``tokens``, in the current request's trace."""
    trace = _current.get()
    if trace is not None:
        if cached:
            trace.cached_calls += 1
        else:
            trace.shared_calls += 1
        trace.saved_tokens += tokens


def record_attempt(count: int = 1) -> None:
    """Count one attempt of an LM call (retries make several; a shared call's count them all) in the
    current request's trace."""
    trace = _current.get()
    if trace is not None:
        trace.attempts += count


def record_lm_answer(call: LMCall) -> None:
    """Add one answered LM call (the LM that answered it) to the current request's trace, if any."""
    trace = _current.get()
    if trace is not None:
        trace.answers.append(call)


def record_finish(reasons: Sequence[str | None]) -> None:
    """Note how a call's choices ended: one that stopped at its token limit (``length``) marks the
    current request's trace ``truncated``."""
    if "length" in reasons and (trace := _current.get()) is not None:
        trace.truncated = True


def call_params() -> Mapping[str, Any]:
    """The parameters the current request gives every LM call (empty outside a request)."""
    trace = _current.get()
    return trace.lm_params if trace is not None else _NO_PARAMS
