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
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_tracker_totals(cls, totals: Mapping[str, Mapping[str, Any]]) -> Usage:
        """Build from ``dspy.utils.usage_tracker.UsageTracker.get_total_tokens()``."""

        def count(key: str) -> int:
            return sum(int(entry.get(key) or 0) for entry in totals.values())

        estimated = any(entry.get("estimated") for entry in totals.values())
        return cls(count("prompt_tokens"), count("completion_tokens"), dict(totals), estimated)


@attrs.frozen
class Timings:
    """Where a request's time went, in seconds of Trio's clock.

    Attributes:
        queued: Waiting for admission (a free in-flight slot).
        lm: Inside LM calls (all attempts, all predictors of the program).
        total: From the engine receiving the request to its outcome.
    """

    queued: float
    lm: float
    total: float

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
        truncated: Whether an LM call's answer stopped at its token limit (``max_tokens``): the
            outputs may be cut short.
    """

    request_id: str
    program: str
    outputs: Mapping[str, Any]
    usage: Usage
    timings: Timings
    attempts: int = 1
    truncated: bool = False
