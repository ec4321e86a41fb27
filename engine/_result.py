"""What a finished prediction hands back: outputs, token usage and timings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class Usage:
    """Tokens a request consumed, summed over every LM call the program made.

    Attributes:
        prompt_tokens: Tokens sent to the LM.
        completion_tokens: Tokens the LM generated.
        by_model: The raw usage entries DSPy's usage tracker collected, per model name.
        estimated: Whether some of the counts are the engine's estimate (~4 characters a token)
            because a provider reported none, e.g. a stream from a server that sends no usage chunk.
        saved_tokens: Tokens of the answers the request got without an upstream call of its own (from
            the response cache, or shared with an identical call in flight); not in the counts above.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    estimated: bool = False
    saved_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_tracker_totals(cls, totals: Mapping[str, Mapping[str, Any]], *, saved_tokens: int = 0) -> Usage:
        """Build from ``dspy.utils.usage_tracker.UsageTracker.get_total_tokens()``."""

        def count(key: str) -> int:
            return sum(int(entry.get(key) or 0) for entry in totals.values())

        estimated = any(entry.get("estimated") for entry in totals.values())
        return cls(count("prompt_tokens"), count("completion_tokens"), dict(totals), estimated, saved_tokens)


@attrs.frozen
class SkippedLM:
    """An LM a call skipped, or gave up on, before another LM of its fallback chain answered.

    Attributes:
        lm: The LM's name (a key of ``EngineConfig.lms``).
        reason: Why: ``breaker_open``, ``rate_limited``, ``server_error``, ``connection``, ``timeout``,
            ``bad_response`` or ``context_window``.
    """

    lm: str
    reason: str


@attrs.frozen
class LMCall:
    """One LM call of a request, named by the LM that answered it.

    Attributes:
        lm: The LM that answered (a key of ``EngineConfig.lms``).
        model: Its model.
        seconds: The call's duration, fallbacks and retries included.
        prompt_tokens, completion_tokens: What the answering LM reported.
        skipped: The LMs of its fallback chain tried before it, in order (empty when the first answered).
    """

    lm: str
    model: str
    seconds: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    skipped: tuple[SkippedLM, ...] = ()


@attrs.frozen
class Timings:
    """Where a request's time went, in seconds of Trio's clock.

    Attributes:
        queued: Waiting for admission (a free in-flight slot).
        lm: Inside LM calls (all attempts, all predictors of the program).
        total: From the engine receiving the request to its outcome.
        lm_calls: LM calls the program made.
        cached_calls: Of those, the ones answered from the response cache.
        shared_calls: Of those, the ones answered by an identical call in flight (single-flight), in
            this process or another.
    """

    queued: float
    lm: float
    total: float
    lm_calls: int = 0
    cached_calls: int = 0
    shared_calls: int = 0

    @property
    def cached(self) -> bool:
        """Whether every LM call of the request was answered from the cache (and it made one)."""
        return 0 < self.lm_calls == self.cached_calls

    @property
    def overhead(self) -> float:
        """Time spent neither queued nor inside the LM: the engine's and DSPy's own work."""
        return max(0.0, self.total - self.queued - self.lm)


@attrs.frozen
class PredictionResult:
    """The outcome of a successful ``Engine.predict``.

    Attributes:
        request_id: The request's id (the caller's, or one the engine generated).
        program: The name of the program that ran.
        outputs: The prediction's output fields, by name.
        usage: Token usage of every LM call of the request.
        timings: Where the time went.
        attempts: LM call attempts the request made, retries included (0 if it made no LM call).
        lm_calls: Each LM call of the request, in order, with the LM that answered it.
        truncated: Whether an LM call's answer stopped at its token limit (``max_tokens``): the
            outputs may be cut short.
    """

    request_id: str
    program: str
    outputs: Mapping[str, Any]
    usage: Usage
    timings: Timings
    attempts: int = 1
    lm_calls: tuple[LMCall, ...] = ()

    @property
    def lms(self) -> tuple[str, ...]:
        """The LMs that answered the request's calls, each once, in the order they first did."""
        return tuple(dict.fromkeys(call.lm for call in self.lm_calls))

    truncated: bool = False
