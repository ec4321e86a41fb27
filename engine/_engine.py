"""The engine: admission, deadlines, and one outcome for every request.

A request runs in its caller's task, not in a task of the engine. That keeps the caller's cancel scope
(and so its deadline) in charge of all of it — validation, queue wait, every LM call — with no hop
between tasks: when an HTTP handler is cancelled because its client left, the ``trio.Cancelled`` lands
directly in the LM's socket read and the provider connection closes.

The engine still owns each request through a cancel scope it registers while the request is active.
Closing the engine refuses new requests, lets the active ones finish for ``drain_timeout`` seconds, then
cancels the rest through those scopes; each of them ends with :class:`EngineClosedError`.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import attrs
import dspy
import trio
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import track_usage

from . import _groups
from ._admission import Admission
from ._config import EngineConfig
from ._errors import EngineClosedError, EngineError, InvalidInputError, ProgramError
from ._programs import Program, ProgramInfo, ProgramRegistry
from ._result import PredictionResult, Timings, Usage
from ._statistics import EngineStatistics, Outcome
from ._trace import tracing
from .lm import TrioLM, build_lm

logger = logging.getLogger("engine")

# Awaiting cleanup (closing HTTP clients) is shielded but never unbounded.
_CLEANUP_TIMEOUT = 5.0

_ADAPTERS = {"chat": dspy.ChatAdapter, "json": dspy.JSONAdapter}


@attrs.define(eq=False)
class _ActiveRequest:
    request_id: str
    scope: trio.CancelScope


class Engine:
    """Runs DSPy programs under Trio with admission control. Get one from :func:`open_engine`.

    Safe to share between any number of tasks of the Trio run that opened it.
    """

    def __init__(self, config: EngineConfig, lms: Mapping[str, TrioLM], programs: ProgramRegistry) -> None:
        self.config = config
        self._lms = dict(lms)
        self._programs = programs
        self._admission = Admission(config.max_in_flight, config.max_queued)
        self._active: dict[int, _ActiveRequest] = {}
        self._ids = itertools.count()
        self._outcomes: Counter[Outcome] = Counter()
        self._errors: Counter[str] = Counter()
        self._closing = False
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Engine [Requests: {s.in_flight} in flight, {s.queued} queued | "
            f"{s.succeeded} ok, {s.failed} failed, {s.timed_out} timed out, {s.cancelled} cancelled, "
            f"{s.rejected} rejected]{' closing' if self._closing else ''}>"
        )

    @property
    def lms(self) -> Mapping[str, TrioLM]:
        """The engine's LM backends, by name."""
        return dict(self._lms)

    def programs(self) -> list[ProgramInfo]:
        """The served programs with their input and output fields."""
        return self._programs.infos()

    def statistics(self) -> EngineStatistics:
        """A frozen snapshot of the engine's counters and admission state."""
        admission = self._admission.statistics()
        return EngineStatistics.from_counters(
            self._outcomes, self._errors, admission=admission, closing=self._closing
        )

    async def predict(
        self,
        program: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
    ) -> PredictionResult:
        """Run ``program`` on ``inputs`` and return its outputs, usage and timings.

        Blocks while queued for a slot and while the program's LM calls run. The caller's cancel scope is
        the deadline: ``with trio.fail_after(5): await engine.predict(...)``; work whose deadline has
        passed is never started, and cancelling closes the upstream connection (Trio-native LMs).

        Args:
            program: A registered program name, e.g. ``"default"``.
            inputs: The program's input fields by name.
            request_id: An id to report the request under; one is generated if omitted.

        Raises:
            UnknownProgramError, InvalidInputError: the request is wrong; nothing was queued.
            OverloadedError: the queue is full; nothing was queued.
            EngineClosedError: the engine is closing.
            UpstreamError: the LM provider failed.
            ProgramError: the program failed (e.g. the LM's answer did not parse).
        """
        started = trio.current_time()
        caller_deadline = trio.current_effective_deadline()
        request_id = request_id or uuid.uuid4().hex
        try:
            resolved = self._programs.get(program)
            values = resolved.validate(inputs)
        except InvalidInputError:
            self._outcomes["invalid"] += 1
            raise
        if self._closing:
            self._outcomes["rejected"] += 1
            raise EngineClosedError("the engine is shutting down")

        active = _ActiveRequest(request_id, trio.CancelScope())
        key = next(self._ids)
        self._active[key] = active
        if len(self._active) == 1:
            self._idle = trio.Event()
        outcome: Outcome = "failed"
        try:
            result = await self._run_request(active, resolved, values, started)
            outcome = "succeeded"
            return result
        except trio.Cancelled:
            outcome = "timed_out" if trio.current_time() >= caller_deadline else "cancelled"
            raise
        except EngineError as exc:
            outcome = "rejected" if exc.code == "overloaded" else "failed"
            self._errors[exc.code] += 1
            raise
        finally:
            self._outcomes[outcome] += 1
            del self._active[key]
            if not self._active:
                self._idle.set()

    async def _run_request(
        self, active: _ActiveRequest, program: Program, values: dict[str, Any], started: float
    ) -> PredictionResult:
        with active.scope:
            await self._admission.acquire(active)
            admitted = trio.current_time()
            try:
                # A request whose deadline passed while it queued is never started.
                await trio.lowlevel.checkpoint_if_cancelled()
                outputs, usage, lm_seconds = await self._run_program(program, values)
            finally:
                self._admission.release(active, service_time=trio.current_time() - admitted)
            finished = trio.current_time()
            return PredictionResult(
                request_id=active.request_id,
                program=program.name,
                outputs=outputs,
                usage=usage,
                timings=Timings(queued=admitted - started, lm=lm_seconds, total=finished - started),
            )
        # Only reached when our own scope absorbed its cancellation: the engine closed under it.
        raise EngineClosedError("the engine shut down before the request finished")

    async def _run_program(
        self, program: Program, values: dict[str, Any]
    ) -> tuple[dict[str, Any], Usage, float]:
        adapter = _ADAPTERS[program.adapter or self.config.adapter]()
        settings = {
            "lm": self._lms[program.lm],
            "adapter": adapter,
            "disable_history": True,
            "max_trace_size": 0,
            "max_history_size": 0,
        }
        with dspy.context(**settings), track_usage() as tracker, tracing() as trace:
            try:
                prediction = await program.module.acall(**values)
            except BaseExceptionGroup as group:
                _raise_program_failure(program, _groups.collapse(group))
            except Exception as exc:
                _raise_program_failure(program, exc)
        usage = Usage.from_tracker_totals(tracker.get_total_tokens())
        return dict(prediction.items()), usage, trace.lm_seconds

    def _begin_close(self) -> None:
        self._closing = True

    async def _drain(self) -> None:
        """Refuse new requests, let active ones run for ``drain_timeout``, then cancel the rest.

        Blocks until every request that was active has ended (cancellation is bounded by
        ``_CLEANUP_TIMEOUT``).
        """
        self._begin_close()
        with trio.move_on_after(self.config.drain_timeout):
            await self._idle.wait()
        for active in self._active.values():
            active.scope.cancel()
        with trio.move_on_after(_CLEANUP_TIMEOUT) as cleanup:
            cleanup.shield = True
            await self._idle.wait()
        if cleanup.cancelled_caught:
            logger.error(
                "%d requests did not end within %ss of being cancelled", len(self._active), _CLEANUP_TIMEOUT
            )

    async def _close_lms(self) -> None:
        with trio.move_on_after(_CLEANUP_TIMEOUT) as cleanup:
            cleanup.shield = True
            for lm in self._lms.values():
                await lm.aclose()


def _raise_program_failure(program: Program, exc: BaseException) -> NoReturn:
    """Raise what a failure of ``program`` looks like to the engine's caller: engine errors and
    cancellation as they are, anything else as a :class:`ProgramError` caused by it."""
    if isinstance(exc, EngineError) or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, AdapterParseError):
        message = f"program {program.name!r}: the LM's answer did not fit the signature: {exc}"
    else:
        message = f"program {program.name!r} failed: {type(exc).__name__}: {exc}"
    raise ProgramError(message) from exc


@asynccontextmanager
async def open_engine(
    config: EngineConfig | None = None,
    *,
    lms: Mapping[str, TrioLM] | None = None,
) -> AsyncIterator[Engine]:
    """Open an engine for the duration of the ``async with`` block.

    ::

        async with open_engine(EngineConfig.from_env()) as engine:
            result = await engine.predict("default", {"question": "What is Trio?"})

    Building programs and LMs happens on entry (imports and file reads block briefly). Leaving the
    block ends all work cleanly: new requests are refused, in-flight ones get ``config.drain_timeout``
    seconds to finish and are then cancelled with :class:`EngineClosedError`, and the LMs' connections
    are closed. Exceptions from the block propagate as they are, never wrapped in an exception group.

    Args:
        config: The configuration; ``EngineConfig.from_env()`` when omitted.
        lms: LM instances to use instead of building them from ``config.lms`` (by the same names);
            the engine closes them on exit too.

    Raises:
        ConfigError: the configuration cannot be used.
    """
    config = EngineConfig.from_env() if config is None else config
    backends = {
        name: (lms or {}).get(name) or build_lm(lm_config, cache=config.dspy_cache)
        for name, lm_config in config.lms.items()
    }
    for name, lm in (lms or {}).items():
        backends.setdefault(name, lm)
    simulated = [
        name for name, c in config.lms.items() if c.provider == "simulated" and name not in (lms or {})
    ]
    if simulated:
        logger.info("LM %s: the built-in simulated LM (no real LM configured)", ", ".join(simulated))
    engine = Engine(config, backends, ProgramRegistry.build(config.programs))
    async with _groups.open_service_nursery() as nursery:
        engine._nursery = nursery
        try:
            yield engine
        finally:
            await engine._drain()
            await engine._close_lms()
