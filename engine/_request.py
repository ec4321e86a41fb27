"""One accepted request while the engine owns it: its cancel scopes, its outcome, and what it reports.

How a request ended decides its outcome, and only this module decides it (see :func:`outcome_of` and
:meth:`Request.settle_interrupted`):

- the engine's own cancel ended it: ``cancelled`` (``dspy_trio.engine.cancel(request_id)``, a fail-fast
batch) or
  ``shut_down`` (drain, engine closed);
- the caller's scope ended it: ``timed_out`` when the request's deadline (the caller's effective deadline
  when it was accepted) has passed, else ``abandoned`` (a client left, a consumer left a stream early);
  when both ended it and the caller's cause cannot be known (a request accepted in a scope that was
  already cancelled), the engine's own;
- an error ended it: ``rejected`` (overload), ``timed_out`` (an engine time limit), ``failed`` (any other).

A request runs in one or two tasks (a stream's admission in the consumer's task, its program in the
producer's), each stage in a cancel scope of its own. :meth:`Request.scoped` makes each new stage's scope
the one :meth:`Request.cancel` reaches, and cancels it at once if a cancel came between two stages, so
a cancel is never lost in the hand-over.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._errors import DeadlineExceededError, EngineClosedError, EngineError, Outcome, RequestAbandonedError
from ._programs import Program
from ._result import PredictionResult, Timings
from ._trace import RequestTrace

if TYPE_CHECKING:
    from ._fair_queue import Ticket
    from ._tenants import Tenant, TenantPass


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
    # The caller's effective deadline when the request was accepted: what tells timed_out from abandoned.
    caller_deadline: float
    # The scope of the stage running now; the engine cancels it to close or on cancel(request_id).
    scope: trio.CancelScope | None = None
    cancel_reason: EngineError | None = None
    admitted: float = math.nan
    outcome: Outcome | None = None
    error_code: str | None = None
    kind: str = "predict"
    owner: str | None = None
    # The caller's cache switches: never share or read the cache (a fresh call); store no answer.
    no_cache: bool = False
    no_store: bool = False
    # Parameters of every LM call the request makes (temperature, max_tokens, ...), over the LM's own.
    lm_params: Mapping[str, Any] | None = None
    trace: RequestTrace | None = None
    result: PredictionResult | None = None
    # Set once a stream is handed to its consumer: exceptions through its block are then the consumer's.
    consumer_owned: bool = False
    # The request's entry in the ledger while it is active.
    ledger_key: int = -1
    # Its tenant, its place in the admission queue, and what its tenant's limits granted it.
    tenant: Tenant | None = None
    ticket: Ticket | None = None
    tenant_pass: TenantPass | None = None

    def settle(self, outcome: Outcome, error_code: str | None = None) -> None:
        """Record the request's outcome; the first one recorded is the one that counts."""
        if self.outcome is None:
            self.outcome, self.error_code = outcome, error_code

    def settle_error(self, error: EngineError) -> None:
        """Record the outcome of a request that ended with ``error``."""
        self.settle(outcome_of(error), error.code)

    def cancel(self, reason: EngineError) -> None:
        """End the request with ``reason`` wherever it is (queued, running, streaming, between stages)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.scope is not None:
            self.scope.cancel()

    def scoped(self) -> trio.CancelScope:
        """A fresh cancel scope that :meth:`cancel` reaches, for one stage of the request (``with
        request.scoped():``; the scope itself, not a generator around it: it is entered per request).

        A cancel that arrived before the stage began cancels its scope at once.
        """
        scope = trio.CancelScope()
        self.scope = scope
        if self.cancel_reason is not None:
            scope.cancel()
        return scope

    def interruption(self) -> EngineError:
        """The error of a request whose scope the engine cancelled."""
        return self.cancel_reason or EngineClosedError("the engine shut down before the request finished")

    def timed_out(self, cancelled: trio.Cancelled | None = None) -> bool:
        """Whether the caller's scope that ended the request ended it for a deadline.

        The request's deadline is the caller's effective deadline at acceptance: it passed or not. A
        request accepted in a scope that was already cancelled has none (``-inf``); then Trio's own
        record of why (``Cancelled.source``) decides. (``source`` alone would not do: an inner deadline,
        such as a sleep's, that expires at the same instant as an explicit cancel is reported instead.)
        """
        if self.caller_deadline != -math.inf:
            return trio.current_time() >= self.caller_deadline
        return getattr(cancelled, "source", "deadline") == "deadline"

    def _engine_cancel_hides_the_callers(self, cancelled: trio.Cancelled | None) -> bool:
        """Whether the engine's own cancel is the only known cause of an interruption: the request was
        accepted in a scope already cancelled (no deadline to compare with), and the engine cancelled it
        too (drain, cancel by id), so the ``Cancelled`` that Trio reports is the engine's (the innermost
        cancelled scope), not the caller's."""
        return (
            self.cancel_reason is not None
            and self.caller_deadline == -math.inf
            and getattr(cancelled, "source", None) != "deadline"
        )

    def caller_interruption(self, cancelled: trio.Cancelled | None = None) -> EngineError:
        """The error a stream's consumer reads when the stream's own scope was cancelled by its caller."""
        if self.cancel_reason is not None and self._engine_cancel_hides_the_callers(cancelled):
            return self.cancel_reason
        if self.timed_out(cancelled):
            return DeadlineExceededError("the stream's deadline passed before it finished")
        return RequestAbandonedError("the stream's consumer left before it finished")

    def settle_interrupted(self, cancelled: trio.Cancelled | None = None) -> None:
        """Settle a request that ended without an outcome of its own: its caller's scope ended it (or the
        engine's cancel, when that is all that is known)."""
        if self.cancel_reason is not None and self._engine_cancel_hides_the_callers(cancelled):
            self.settle_error(self.cancel_reason)
        else:
            self.settle("timed_out" if self.timed_out(cancelled) else "abandoned")

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
            "tenant": self.tenant.name if self.tenant is not None else None,
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
            if self.trace.answers:  # the LMs that answered, in call order (fallbacks show here)
                record["lms"] = [call.lm for call in self.trace.answers]
        if self.result is not None:
            usage = self.result.usage
            record.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        if include_text:
            record["inputs"] = self.values
            if self.result is not None:
                record["outputs"] = dict(self.result.outputs)
        return record
