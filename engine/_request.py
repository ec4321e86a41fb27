"""One accepted request while the engine owns it: its cancel scope, its outcome, and what it reports."""

from __future__ import annotations

import math
from typing import Any

import attrs
import trio

from ._errors import EngineClosedError, EngineError
from ._programs import Program
from ._result import PredictionResult, Timings
from ._statistics import Outcome
from ._trace import RequestTrace


def outcome_of(error: EngineError) -> Outcome:
    """The outcome a request ended by ``error`` is counted under."""
    return error.outcome


@attrs.define(eq=False)
class Request:
    """A request from acceptance to outcome."""

    request_id: str
    program: Program
    values: dict[str, Any]
    started: float
    caller_deadline: float
    # The engine cancels this scope to close or on cancel(request_id); the reason says which.
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cancel_reason: EngineError | None = None
    admitted: float = math.nan
    outcome: Outcome | None = None
    error_code: str | None = None
    kind: str = "predict"
    trace: RequestTrace | None = None
    result: PredictionResult | None = None

    def settle(self, outcome: Outcome, error_code: str | None = None) -> None:
        """Record the request's outcome; the first one recorded is the one that counts."""
        if self.outcome is None:
            self.outcome, self.error_code = outcome, error_code

    def cancel(self, reason: EngineError) -> None:
        """End the request with ``reason`` wherever it is (queued, running, streaming)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.scope.cancel()

    def interruption(self) -> EngineError:
        """The error of a request whose scope the engine cancelled."""
        return self.cancel_reason or EngineClosedError("the engine shut down before the request finished")

    def settle_interrupted(self) -> None:
        """Settle a request that ended without an outcome of its own: its caller's scope ended it."""
        self.settle("timed_out" if trio.current_time() >= self.caller_deadline else "cancelled")

    def timings(self) -> Timings | None:
        """Where the time went: the result's, or so far for a request that got a slot, else None."""
        if self.result is not None:
            return self.result.timings
        if math.isnan(self.admitted):
            return None
        lm = self.trace.lm_seconds if self.trace else 0.0
        now = trio.current_time()
        return Timings(queued=self.admitted - self.started, lm=lm, total=now - self.started)

    def log_record(self, model: str, *, include_text: bool) -> dict[str, Any]:
        """The request's log line: ids, outcome, timings, attempts, tokens (and text if asked)."""
        record: dict[str, Any] = {
            "event": "request",
            "request_id": self.request_id,
            "kind": self.kind,
            "program": self.program.name,
            "model": model,
            "outcome": self.outcome,
            "error": self.error_code,
        }
        if (timings := self.timings()) is not None:
            record.update(
                queued_ms=round(timings.queued * 1000, 3),
                lm_ms=round(timings.lm * 1000, 3),
                total_ms=round(timings.total * 1000, 3),
            )
        if self.trace is not None:
            record["attempts"] = self.trace.attempts
        if self.result is not None:
            usage = self.result.usage
            record.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        if include_text:
            record["inputs"] = self.values
            if self.result is not None:
                record["outputs"] = dict(self.result.outputs)
        return record
