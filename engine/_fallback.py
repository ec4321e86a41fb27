"""Fallbacks: a call to an LM that fails with a retryable upstream error, after that LM's own retries,
or at once when its circuit breaker is open, goes to the next LM of its chain.

::

    program -> FallbackLM(primary, backup, ...) -> GuardedLM(primary)  [breaker, limits, retries] -> backend
                                                -> GuardedLM(backup)   [its own]                   -> backend

Every LM of the chain is called through its own guard, so each brings its own breaker, rate limits,
quota, cool-down and retries; all of it runs in the caller's task, inside the caller's deadline (a
deadline that passes between two LMs ends the call there, as ``trio.Cancelled``).

When a call falls back (the reason is the label of ``dspy_trio_fallbacks_total``):

- ``breaker_open``: the LM's breaker is open (nothing was sent);
- ``rate_limited``: a 429 after its retries, or a ``Retry-After`` / quota wait that does not fit the
  deadline; ``server_error``: 5xx and 529; ``connection``; ``timeout``: an attempt or first-token
  timeout;
- ``bad_response``: the upstream answered with something that is not a completion (a malformed body or
  stream, an HTML page, a compression bomb): not retried on the same LM, but another may answer;
- ``context_window``: the prompt does not fit the LM's context window, only when that LM has
  ``fallback_on_context_window``.

Never on the caller's own errors: a 400-class answer is the caller's to fix, and a 401/403 (the LM's
credentials) is logged at ERROR instead of being hidden behind a fallback that works.

A stream falls back only before its first delta reached the consumer: once text went out, an answer
that breaks off ends with its error (a second LM's answer spliced onto the first would be neither).

The LM that answered each call is recorded in the request's trace (:class:`LMCall`), and so in the
result, the stream's final event and the HTTP ``Server-Timing`` header.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import attrs
import trio

from ._errors import (
    CircuitOpenError,
    EngineError,
    RateLimitWaitError,
    UpstreamContextWindowError,
    UpstreamError,
    UpstreamResponseError,
)
from ._result import LMCall, SkippedLM
from ._trace import record_lm_answer
from .lm import TrioLM
from .lm._base import Completion, DeltaSink, Message, request_params
from .lm._wrapped import WrappedLM

logger = logging.getLogger("dspy_trio.engine.fallback")

# Seconds between two log lines about one LM's refused credentials.
AUTH_LOG_INTERVAL = 10.0

# (from, to, reason) -> calls that fell back so: ``dspy_trio_fallbacks_total``.
FallbackCounts = Counter[tuple[str, str, str]]

_MISSING = object()


def fallback_reason(error: EngineError, *, on_context_window: bool) -> str | None:
    """Why a call that failed with ``error`` goes to the next LM, or None when it must not."""
    if isinstance(error, CircuitOpenError):
        return "breaker_open"
    if isinstance(error, UpstreamContextWindowError):
        return "context_window" if on_context_window else None
    if isinstance(error, RateLimitWaitError):
        return "rate_limited"
    if isinstance(error, UpstreamError) and error.retryable:
        return error.retry_cause
    if isinstance(error, UpstreamResponseError) and error.status is None:
        return "bad_response"
    return None


class _Delivered:
    """A sink that notes whether any text went through it."""

    __slots__ = ("_sink", "delivered")

    def __init__(self, sink: DeltaSink) -> None:
        self._sink = sink
        self.delivered = False

    async def send(self, text: str) -> None:
        self.delivered = True
        await self._sink.send(text)


class FallbackLM(WrappedLM):
    """A call to the first LM of ``chain`` that answers (see the module docstring).

    DSPy sees the first LM (its model, its default parameters and capabilities). A fallback gets the
    call's own parameters over *its* defaults: what the call sets beyond the first LM's defaults.

    Args:
        chain: ``(name, lm)`` pairs in the order they are tried; each ``lm`` is guarded on its own.
        on_context_window: Names of the LMs whose context-window errors fall back.
        counts: Where fallbacks are counted, by (from, to, reason); shared by an engine's chains.
    """

    def __init__(
        self,
        chain: Sequence[tuple[str, TrioLM]],
        *,
        on_context_window: Collection[str] = (),
        counts: FallbackCounts | None = None,
    ) -> None:
        if not chain:
            raise ValueError("a fallback chain needs at least one LM")
        self.name, self.first = chain[0]
        super().__init__(self.first)  # DSPy sees the first LM: its model, parameters, capabilities
        self.chain = tuple(chain)
        self.on_context_window = frozenset(on_context_window)
        self.counts: FallbackCounts = counts if counts is not None else Counter()
        self._auth_logged: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<FallbackLM {' -> '.join(name for name, _ in self.chain)}>"

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        """The first answer of the chain (see :meth:`complete_call`)."""
        return await self.complete_call(messages, params, sink, {})

    async def complete_call(
        self,
        messages: Sequence[Message],
        params: Mapping[str, Any],
        sink: DeltaSink | None,
        call_kwargs: Mapping[str, Any],
    ) -> Completion:
        """The first answer of the chain. Blocks for every LM it tries. The call's own DSPy arguments
        (``rollout_id``, ``cache``: set on the call or on a copy of this LM, as DSPy's BestOfN and
        Refine do) go to each LM of the chain, whose sharing layer keys on them.

        Raises:
            EngineError: the last LM's error, or the first error that must not fall back.
        """
        started = trio.current_time()
        call_kwargs = _dspy_arguments(self.kwargs, call_kwargs)
        if len(self.chain) == 1:
            completion = await self.first.complete_call(messages, params, sink, call_kwargs)
            record_lm_answer(_answered(self.name, self.first, started, completion, ()))
            return completion
        watched = _Delivered(sink) if sink is not None else None
        skipped: list[SkippedLM] = []
        last = len(self.chain) - 1
        opened, soonest = 0, math.inf  # LMs whose open breaker refused the call; their soonest probe
        for index, (name, lm) in enumerate(self.chain):
            try:
                completion = await lm.complete_call(
                    messages, self._params(lm, params, index), watched, call_kwargs
                )
            except EngineError as error:
                reason = self._reason(name, lm, error, index)
                if isinstance(error, CircuitOpenError):
                    soonest = min(soonest, error.retry_after or 0.0)
                    if index == last and len(skipped) == opened:
                        raise self._every_breaker_open(error, soonest) from None
                    opened += 1
                if reason is None or index == last or (watched is not None and watched.delivered):
                    raise
                await trio.lowlevel.checkpoint_if_cancelled()  # a deadline that passed ends it here
                self.counts[(name, self.chain[index + 1][0], reason)] += 1
                skipped.append(SkippedLM(name, reason))
                continue
            record_lm_answer(_answered(name, lm, started, completion, tuple(skipped)))
            return completion if index == 0 else attrs.evolve(completion, model=lm.model)
        raise AssertionError("unreachable: the last LM's error is raised")  # pragma: no cover

    def _every_breaker_open(self, last: CircuitOpenError, soonest: float) -> CircuitOpenError:
        """The error of a call every LM's open breaker refused: its ``retry_after`` is the soonest of
        their probes (the caller may come back then), not the last LM's."""
        if soonest >= (last.retry_after or 0.0):
            return last
        return CircuitOpenError(
            f"{' -> '.join(name for name, _ in self.chain)}: the circuit breaker of every LM of the chain "
            f"is open; the first probe goes in {soonest:.3g}s",
            model=last.model,
            retry_after=soonest,
        )

    def _params(self, lm: TrioLM, params: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        """The call's parameters for the chain's LM number ``index``: the call's own settings over
        that LM's defaults."""
        if index == 0:
            return params
        defaults = self.kwargs
        own = {key: value for key, value in params.items() if defaults.get(key, _MISSING) != value}
        return request_params(lm.kwargs, own)

    def _reason(self, name: str, lm: TrioLM, error: EngineError, index: int) -> str | None:
        reason = fallback_reason(error, on_context_window=name in self.on_context_window)
        if (
            reason is None
            and index < len(self.chain) - 1
            and isinstance(error, UpstreamResponseError)
            and error.status in (401, 403)
        ):
            self._log_refused_credentials(name, error.status, self.chain[index + 1][0])
        return reason

    def _log_refused_credentials(self, name: str, status: int, following: str) -> None:
        now = trio.current_time()
        if now - self._auth_logged.get(name, -AUTH_LOG_INTERVAL) < AUTH_LOG_INTERVAL:
            return
        self._auth_logged[name] = now
        logger.error(
            "LM %s: the upstream refused its credentials (HTTP %d): calls fail instead of falling back "
            "to %s, so that the broken key is seen; fix lms.%s.api_key",
            name,
            status,
            following,
            name,
        )

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing: the chain's LMs are maintained where they were opened."""
        task_status.started()

    async def aclose(self) -> None:
        """Nothing: the chain's LMs are closed where they were opened."""


def _answered(
    name: str, lm: TrioLM, started: float, completion: Completion, skipped: tuple[SkippedLM, ...]
) -> LMCall:
    usage = completion.usage
    return LMCall(
        lm=name,
        model=str(lm.model),
        seconds=trio.current_time() - started,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        skipped=skipped,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_DSPY_ARGUMENTS = ("rollout_id", "cache")


def _dspy_arguments(defaults: Mapping[str, Any], call_kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The DSPy arguments of one call that are not request parameters: the call's own over the
    chain's defaults (a copy's ``rollout_id`` lives in its ``kwargs``)."""
    if not any(name in defaults for name in _DSPY_ARGUMENTS):
        return call_kwargs
    return {**{name: defaults[name] for name in _DSPY_ARGUMENTS if name in defaults}, **call_kwargs}
