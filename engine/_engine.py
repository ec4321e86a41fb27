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

import contextlib
import itertools
import logging
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, NoReturn

import dspy
import trio
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import track_usage

from . import _groups
from ._admission import Admission
from ._batch import BatchItem, open_batch
from ._config import EngineConfig, StreamOptions
from ._errors import (
    EngineClosedError,
    EngineError,
    InvalidInputError,
    ProgramError,
    RequestCancelledError,
)
from ._event_buffer import EventBuffer
from ._limits import Limits
from ._lm_factory import build_lm
from ._metrics import EngineMetrics
from ._programs import Program, ProgramInfo, ProgramRegistry
from ._request import Request, outcome_of
from ._result import PredictionResult, Timings, Usage
from ._statistics import EngineStatistics, Outcome
from ._stream_events import ErrorEvent, FinalEvent, StatusEvent
from ._streaming import DeltaRouter, EventStream
from ._telemetry import log_request, request_log, span
from ._trace import RequestTrace, tracing
from ._upstream import UpstreamGuard, UpstreamPolicy
from .cluster import Cluster, open_cluster
from .cluster._metrics import ClusterCollector
from .lm import TrioLM

logger = logging.getLogger("engine")

# Awaiting cleanup (closing HTTP clients) is shielded but never unbounded.
_CLEANUP_TIMEOUT = 5.0

_ADAPTERS = {"chat": dspy.ChatAdapter, "json": dspy.JSONAdapter}


class Engine:
    """Runs DSPy programs under Trio with admission control. Get one from :func:`open_engine`.

    Safe to share between any number of tasks of the Trio run that opened it.
    """

    def __init__(
        self,
        config: EngineConfig,
        lms: Mapping[str, TrioLM],
        programs: ProgramRegistry,
        *,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster  # shared limits, registry and cancel across processes (engine.cluster)
        self._lms = dict(lms)
        self._programs = programs
        self._admission = Admission(config.max_in_flight, config.max_queued)
        self._active: dict[int, Request] = {}
        self._ids = itertools.count()
        self._outcomes: Counter[Outcome] = Counter()
        self._errors: Counter[str] = Counter()
        self._stream_drops: Counter[str] = Counter()
        self._seconds_total = 0.0
        self._closing = False
        self._idle = trio.Event()
        self._idle.set()
        self.metrics = EngineMetrics(self.statistics)
        self._program_models = {info.name: info.lm for info in programs.infos()}
        self._program_names = set(self._program_models)
        limits: Limits | None = cluster
        self._guards = {
            name: UpstreamGuard(
                name, config.lms[name].policy() if name in config.lms else UpstreamPolicy(), limits=limits
            )
            for name in self._lms
        }
        for name, lm in self._lms.items():
            lm.guard = self._guards[name]
        if cluster is not None:
            self.metrics.registry.register(ClusterCollector(cluster.statistics))

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
            self._outcomes,
            self._errors,
            admission=admission,
            closing=self._closing,
            stream_deltas_dropped=self._stream_drops["dropped"],
            stream_deltas_coalesced=self._stream_drops["coalesced"],
            seconds_total=self._seconds_total,
            upstreams={name: guard.statistics() for name, guard in self._guards.items()},
        )

    def cancel(self, request_id: str) -> bool:
        """Cancel the request with this id wherever it is (queued, waiting, running, streaming).

        It ends with :class:`RequestCancelledError` (an :class:`ErrorEvent` on a stream), and its
        upstream connection is closed. Returns whether such a request was active.
        """
        found = False
        for request in self._active.values():
            if request.request_id == request_id:
                request.cancel(RequestCancelledError(f"request {request_id} was cancelled"))
                found = True
        return found

    async def cancel_anywhere(self, request_id: str, *, owner: str | None = None) -> bool:
        """Like :meth:`cancel`, and with a cluster also in the worker or replica that runs the request.

        Blocks for at most two bounded Redis round-trips when the request is not in this process.
        """
        if self.cancel(request_id):
            return True
        return self.cluster is not None and await self.cluster.cancel(request_id, owner=owner)

    def precheck(self, program: str, inputs: Mapping[str, Any]) -> None:
        """Raise now what :meth:`predict` or :meth:`stream` would raise before starting: for adapters
        that must choose a status before a streamed body begins (an HTTP status precedes the body).

        Counts nothing and reserves nothing: a request that passes may still find the queue full a
        moment later, and then gets the same errors from :meth:`stream`.

        Raises:
            UnknownProgramError, InvalidInputError: the request is wrong.
            EngineClosedError: the engine is closing.
            OverloadedError: the queue is full right now.
        """
        self._programs.get(program).validate(inputs)
        if self._closing:
            raise EngineClosedError("the engine is shutting down")
        self._admission.check()

    @property
    def closing(self) -> bool:
        """Whether the engine refuses new requests (it is draining or closed)."""
        return self._closing

    def _accept(
        self, program: str, inputs: Mapping[str, Any], request_id: str | None, kind: str = "predict"
    ) -> Request:
        """Check a new request; count it as invalid or rejected if it cannot be taken."""
        started = trio.current_time()
        try:
            resolved = self._programs.get(program)
            values = resolved.validate(inputs)
        except InvalidInputError as exc:
            self._refused(program, "invalid", exc)
            raise
        if self._closing:
            error = EngineClosedError("the engine is shutting down")
            self._refused(program, "rejected", error)
            raise error
        return Request(
            request_id or uuid.uuid4().hex,
            resolved,
            values,
            started,
            trio.current_effective_deadline(),
            kind=kind,
        )

    def _refused(self, program: str, outcome: Outcome, error: EngineError) -> None:
        """Count a request refused before it was accepted (bad input, closing)."""
        self._outcomes[outcome] += 1
        known = program if isinstance(program, str) and program in self._program_names else "unknown"
        self.metrics.record(known, self._model_of(known), outcome, error.code, None, None)

    def _model_of(self, program: str) -> str:
        name = self._program_models.get(program)
        return str(self._lms[name].model) if name in self._lms else ""

    @contextmanager
    def _tracked(self, request: Request) -> Iterator[None]:
        """Own ``request`` for the block's duration and count its outcome exactly once at the end."""
        key = next(self._ids)
        self._active[key] = request
        if len(self._active) == 1:
            self._idle = trio.Event()
        if self.cluster is not None:
            self.cluster.registry.started(request.request_id, deadline=request.caller_deadline)
        try:
            with span(
                f"dspy_trio.{request.kind}", request_id=request.request_id, program=request.program.name
            ):
                yield
        except trio.Cancelled:
            request.settle_interrupted()
            raise
        except EngineError as exc:
            request.settle(outcome_of(exc), exc.code)
            raise
        finally:
            request.settle_interrupted()
            assert request.outcome is not None
            self._outcomes[request.outcome] += 1
            if request.outcome != "rejected":
                self._seconds_total += trio.current_time() - request.started
            if request.error_code is not None:
                self._errors[request.error_code] += 1
            del self._active[key]
            if self.cluster is not None:
                self.cluster.registry.ended(request.request_id)
            if not self._active:
                self._idle.set()
            self._report(request)

    def _report(self, request: Request) -> None:
        """Metrics and the log line of an ended request."""
        model = self._model_of(request.program.name)
        usage = request.result.usage if request.result else None
        assert request.outcome is not None
        self.metrics.record(
            request.program.name, model, request.outcome, request.error_code, request.timings(), usage
        )
        if request_log.isEnabledFor(logging.INFO):  # build the line only for a logger that writes it
            log_request(request.log_record(model, include_text=self.config.log_text))

    async def _admit(self, request: Request) -> None:
        await self._admission.acquire(request)
        request.admitted = trio.current_time()

    def _release(self, request: Request) -> None:
        self._admission.release(request, service_time=trio.current_time() - request.admitted)

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
        request = self._accept(program, inputs, request_id)
        with self._tracked(request):
            with request.scope:
                await self._admit(request)
                try:
                    # A request whose deadline passed while it queued is never started.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    outputs, usage = await self._run_program(request)
                finally:
                    self._release(request)
                request.settle("succeeded")
                return self._result(request, outputs, usage)
            # Only reached when our own scope absorbed its cancellation: closed, or cancelled by id.
            raise request.interruption()

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        options: StreamOptions | None = None,
    ) -> AsyncIterator[EventStream]:
        """Run ``program`` on ``inputs``, streaming its output fields as they are generated.

        ::

            async with engine.stream("default", {"question": "..."}) as events:
                async for event in events:   # StatusEvent, FieldDelta..., then one FinalEvent or ErrorEvent
                    ...

        Entering blocks while the request is queued for a slot, so an overload is raised here, before any
        event. The program then runs in a task of the stream; leaving the block cancels it (closing the
        upstream connection) and leaves nothing running. Errors of the program, the LM or the consumer
        policy arrive as one :class:`ErrorEvent` event, never as an exception out of the iteration.

        Args:
            program: A registered program name.
            inputs: The program's input fields by name.
            request_id: An id to report the request under; one is generated if omitted.
            options: Backpressure, buffer and coalescing; ``config.stream`` when omitted.

        Raises:
            UnknownProgramError, InvalidInputError, OverloadedError, EngineClosedError: on entry, as for
                :meth:`predict`; nothing was started.
        """
        request = self._accept(program, inputs, request_id, kind="stream")
        options = options or self.config.stream
        buffer = EventBuffer(
            options.buffer_size,
            options.backpressure,
            consumer_timeout=options.consumer_timeout if options.backpressure == "timeout" else math.inf,
            coalesce_chars=options.coalesce_chars,
            coalesce_ms=options.coalesce_ms,
        )
        events = EventStream(request.request_id, buffer)
        with self._tracked(request):
            with request.scope:
                await self._admit(request)
            if request.scope.cancelled_caught:
                raise request.interruption()
            try:
                async with _groups.open_service_nursery() as nursery:
                    nursery.start_soon(self._produce, request, events)
                    yield events
            finally:
                self._stream_drops["dropped"] += buffer.dropped
                self._stream_drops["coalesced"] += buffer.coalesced

    def batch_stream(
        self,
        program: str,
        items: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        fail_fast: bool = False,
        request_id: str | None = None,
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[BatchItem]]:
        """Run ``program`` on every item, handing out each item's outcome as soon as it is ready.

        ::

            async with engine.batch_stream("default", items, concurrency=8) as outcomes:
                async for item in outcomes:          # BatchItem(index, result | error), completion order
                    ...

        At most ``concurrency`` items run at once and at most ``concurrency`` finished outcomes wait for
        the consumer; ``items`` may be a lazy iterable, read one item at a time. Each item is a request
        of its own (admission, statistics). Leaving the block cancels what is still running.

        Raises:
            InvalidInputError: on entry, if ``concurrency`` is not a positive integer.
        """
        return open_batch(
            self, program, items, concurrency=concurrency, fail_fast=fail_fast, request_id=request_id
        )

    async def batch(
        self,
        program: str,
        items: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        fail_fast: bool = False,
        request_id: str | None = None,
    ) -> list[BatchItem]:
        """Run ``program`` on every item; return one outcome per item, in input order.

        Blocks until every item has an outcome. One item's failure never loses the others; with
        ``fail_fast`` the first failure cancels the rest, which end as :class:`RequestCancelledError`.
        """
        items = list(items)
        outcomes: list[BatchItem | None] = [None] * len(items)
        async with self.batch_stream(
            program, items, concurrency=concurrency, fail_fast=fail_fast, request_id=request_id
        ) as stream:
            async for item in stream:
                outcomes[item.index] = item
        cancelled = RequestCancelledError("not started: another item failed")
        return [item or BatchItem(index, error=cancelled) for index, item in enumerate(outcomes)]

    async def _produce(self, request: Request, events: EventStream) -> None:
        """The producer task of a stream: runs the program, fills the buffer, sets the terminal event."""
        buffer = events.buffer
        request.scope = trio.CancelScope()  # the admission wait used the first one
        try:
            with request.scope:
                await buffer.put(StatusEvent("running", queued=request.admitted - request.started))
                json = (request.program.adapter or self.config.adapter) == "json"
                program, model = request.program.name, self._model_of(request.program.name)

                def first_delta(field: str) -> None:
                    seconds = trio.current_time() - request.started
                    self.metrics.record_first_token(program, model, field, seconds)

                router = DeltaRouter(request.program.module, buffer, json=json, on_first_delta=first_delta)
                try:
                    outputs, usage = await self._run_program(request, send_stream=router)
                    await router.finish()
                except EngineError as exc:
                    events.terminal = ErrorEvent(exc)
                    request.settle(outcome_of(exc), exc.code)
                else:
                    result = self._result(request, outputs, usage)
                    events.terminal = FinalEvent(result, dropped=buffer.dropped, coalesced=buffer.coalesced)
                    request.settle("succeeded")
            if request.scope.cancelled_caught:
                error = request.interruption()
                events.terminal = ErrorEvent(error)
                request.settle(outcome_of(error), error.code)
        finally:
            self._release(request)
            buffer.close()

    def _result(self, request: Request, outputs: dict[str, Any], usage: Usage) -> PredictionResult:
        trace = request.trace or RequestTrace()
        request.result = PredictionResult(
            request_id=request.request_id,
            program=request.program.name,
            outputs=outputs,
            usage=usage,
            timings=Timings(
                queued=request.admitted - request.started,
                lm=trace.lm_seconds,
                total=trio.current_time() - request.started,
            ),
            attempts=trace.attempts,
        )
        return request.result

    async def _run_program(
        self, request: Request, *, send_stream: DeltaRouter | None = None
    ) -> tuple[dict[str, Any], Usage]:
        program, values = request.program, request.values
        adapter = _ADAPTERS[program.adapter or self.config.adapter]()
        settings = {
            "lm": self._lms[program.lm],
            "adapter": adapter,
            "send_stream": send_stream,
            "disable_history": True,
            "max_trace_size": 0,
            "max_history_size": 0,
        }
        with dspy.context(**settings), track_usage() as tracker, tracing() as trace:
            request.trace = trace
            try:
                prediction = await program.module.acall(**values)
            except BaseExceptionGroup as group:
                _raise_program_failure(program, _groups.collapse(group))
            except Exception as exc:
                _raise_program_failure(program, exc)
        usage = Usage.from_tracker_totals(tracker.get_total_tokens())
        return dict(prediction.items()), usage

    async def drain(self) -> None:
        """Refuse new requests, let active ones run for ``config.drain_timeout``, then cancel the rest
        (they end with :class:`EngineClosedError`). Leaving :func:`open_engine` does this too; call it
        earlier to drain before the rest of a server shuts down. Idempotent.

        Blocks until every request that was active has ended (cancellation is bounded by
        ``_CLEANUP_TIMEOUT``).
        """
        self._closing = True
        with trio.move_on_after(self.config.drain_timeout):
            await self._idle.wait()
        for active in self._active.values():
            active.cancel(EngineClosedError("the engine shut down before the request finished"))
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

    Building programs and LMs happens on entry (imports and file reads block briefly). The engine runs
    no background task of its own: requests run in their callers' tasks and a stream's producer in a
    nursery scoped to the stream's block. Leaving the block ends all work cleanly: new requests are
    refused, in-flight ones get ``config.drain_timeout`` seconds to finish and are then cancelled with
    :class:`EngineClosedError`, and the LMs' connections are closed. Exceptions from the block propagate
    as they are, never wrapped in an exception group.

    Args:
        config: The configuration; ``EngineConfig.from_env()`` when omitted.
        lms: LM instances to use instead of building them from ``config.lms`` (by the same names);
            the engine closes them on exit too.

    Raises:
        ConfigError: the configuration cannot be used.
    """
    config = EngineConfig.from_env() if config is None else config
    given = dict(lms or {})
    backends = {
        name: given[name] if name in given else build_lm(lm_config, cache=config.dspy_cache)
        for name, lm_config in config.lms.items()
    }
    backends.update(given)
    simulated = [name for name, c in config.lms.items() if c.provider == "simulated" and name not in given]
    if simulated:
        logger.info("LM %s: the built-in simulated LM (no real LM configured)", ", ".join(simulated))
    async with contextlib.AsyncExitStack() as stack:
        cluster = (
            await stack.enter_async_context(open_cluster(config.cluster))
            if config.cluster.redis_url
            else None
        )
        engine = Engine(config, backends, ProgramRegistry.build(config.programs), cluster=cluster)
        if cluster is not None:
            cluster.attach(engine.cancel)
        try:
            yield engine
        finally:
            await engine.drain()
            await engine._close_lms()
