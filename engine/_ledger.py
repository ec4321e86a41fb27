"""The one owner of request bookkeeping: which requests are active, and how each one ended.

Every request the engine is given is counted here exactly once: :meth:`Ledger.refused` for one refused
before it was accepted, :meth:`Ledger.track` for an accepted one (its outcome is booked when the block
ends, whatever ends it). The ledger also reaches every active request (cancel by id, cancel all on
shutdown) and tells when none is left (:meth:`Ledger.wait_idle`). What an ending *means* (which outcome)
is decided by :mod:`dspy_trio.engine._request`.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from ._errors import EngineError, Outcome
from ._metrics import EngineMetrics
from ._owners import OwnerCheck, anyone
from ._request import Request
from ._telemetry import log_request, request_log, span


class Ledger:
    """Active requests and the counters of ended ones.

    Args:
        metrics: Where each ended request is recorded.
        model_of: The upstream model name of a program (a metrics label).
        known_programs: Program names that may be metric labels; anything else is ``"unknown"``.
        log_text: Whether request log lines carry inputs and outputs.
    """

    def __init__(
        self,
        metrics: EngineMetrics,
        model_of: Callable[[str], str],
        known_programs: set[str],
        *,
        log_text: bool = False,
    ) -> None:
        self._metrics = metrics
        self._model_of = model_of
        self._known = known_programs
        self._log_text = log_text
        self._active: dict[int, Request] = {}
        self._keys = itertools.count()
        self._idle = trio.Event()
        self._idle.set()
        self.outcomes: Counter[Outcome] = Counter()
        self.errors: Counter[str] = Counter()
        self.stream_drops: Counter[str] = Counter()
        self.seconds_total = 0.0

    def __repr__(self) -> str:
        return f"<Ledger [{len(self._active)} active | {dict(self.outcomes)}]>"

    @property
    def active(self) -> int:
        """Requests accepted and not yet ended."""
        return len(self._active)

    def refused(
        self, program: str, outcome: Outcome, error: EngineError, *, count_error: bool = False
    ) -> None:
        """Count a request refused before it was accepted (bad input, closing, overload); with
        ``count_error``, also count its error code (as an overload refused later would be)."""
        self.outcomes[outcome] += 1
        if count_error:
            self.errors[error.code] += 1
        known = program if isinstance(program, str) and program in self._known else "unknown"
        self._metrics.record(known, self._model_of(known), outcome, error.code, None, None)

    @contextmanager
    def track(self, request: Request) -> Iterator[None]:
        """Own ``request`` for the block's duration and book its outcome exactly once at the end.

        An :class:`EngineError` leaving the block is the request's outcome, unless the request was
        handed to a consumer (a stream) by then: what the consumer's own code raises is not the stream's.
        A request that ends with no outcome of its own was ended by its caller's scope. A request may end
        before the block does (:meth:`end`: a stream whose producer finished while its consumer still
        reads buffered events holds nothing of the engine's any more).
        """
        key = next(self._keys)
        request.ledger_key = key
        self._active[key] = request
        if len(self._active) == 1:
            self._idle = trio.Event()
        try:
            with span(
                f"dspy_trio.{request.kind}", request_id=request.request_id, program=request.program.name
            ):
                yield
        except trio.Cancelled as exc:
            request.settle_interrupted(exc)
            raise
        except EngineError as exc:
            if not request.consumer_owned:
                request.settle_error(exc)
            raise
        finally:
            self.end(request)

    def end(self, request: Request) -> None:
        """Book ``request``'s outcome and stop tracking it, once; later calls do nothing."""
        if self._active.pop(request.ledger_key, None) is None:
            return
        request.settle_interrupted()
        if not self._active:
            self._idle.set()
        self._book(request)

    def _book(self, request: Request) -> None:
        assert request.outcome is not None
        self.outcomes[request.outcome] += 1
        if request.outcome != "rejected":
            self.seconds_total += trio.current_time() - request.started
        if request.error_code is not None:
            self.errors[request.error_code] += 1
        model = self._model_of(request.program.name)
        usage = request.result.usage if request.result else None
        self._metrics.record(
            request.program.name, model, request.outcome, request.error_code, request.timings(), usage
        )
        if request_log.isEnabledFor(logging.INFO):  # build the line only for a logger that writes it
            log_request(request.log_record(model, include_text=self._log_text))

    def cancel(
        self, request_id: str, reason: Callable[[], EngineError], *, allowed: OwnerCheck = anyone
    ) -> bool:
        """Cancel every active request with this id that ``allowed`` lets this cancel reach (see
        :mod:`dspy_trio.engine._owners`); return whether there was one."""
        found = False
        for request in list(self._active.values()):
            if request.request_id == request_id and allowed(request.owner):
                request.cancel(reason())
                found = True
        return found

    def cancel_all(self, reason: Callable[[], EngineError]) -> None:
        """Cancel every active request (shutdown)."""
        for request in list(self._active.values()):
            request.cancel(reason())

    async def wait_idle(self) -> None:
        """Block until no request is active."""
        await self._idle.wait()
