"""The engine: admission, deadlines, and one outcome for every request.

A request runs in its caller's task, not in a task of the engine. That keeps the caller's cancel scope
(and so its deadline) in charge of all of it — validation, queue wait, every LM call — with no hop
between tasks: when an HTTP handler is cancelled because its client left, the ``trio.Cancelled`` lands
directly in the LM's socket read and the provider connection closes.

The engine still owns each request through its cancel scopes, registered in the ledger while the request
is active. Closing the engine refuses new requests, lets the active ones finish for ``drain_timeout``
seconds, then cancels the rest through those scopes; each of them ends with :class:`EngineClosedError`.

The engine itself only composes: bookkeeping is :mod:`._ledger`, a request's scopes and outcome
:mod:`._request`, running a program :mod:`._runner`, streams :mod:`._stream_request`, batches
:mod:`._batch`.
"""

from __future__ import annotations

import collections
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import trio

from . import _dspy, _groups
from ._admission import Admission
from ._batch import BatchItem, RunningBatch, open_batch
from ._breaker import CircuitBreaker
from ._coalesce import Sharing, open_sharing
from ._construction import NoPublicConstructor
from ._engine_config import EngineConfig
from ._errors import (
    EngineClosedError,
    InvalidInputError,
    OverloadedError,
    RequestCancelledError,
)
from ._fallback import FallbackCounts, FallbackLM
from ._fallback_config import breaker_settings, chain
from ._gate import Gate
from ._ledger import Ledger
from ._limits import Limits, LocalLimits
from ._metrics import EngineMetrics
from ._owners import OwnerCheck, owner_check
from ._programs import ProgramInfo, ProgramRegistry
from ._request import Request
from ._result import PredictionResult
from ._runner import ProgramRunner
from ._shared_predictions import SharedPredictions
from ._sharing_statistics import SharingCollector
from ._statistics import EngineStatistics
from ._stream_options import StreamOptions
from ._stream_request import open_stream
from ._streaming import EventStream
from ._tenants import Tenant, Tenants, TenantStatistics
from ._upstream import UpstreamGuard, UpstreamPolicy
from .cluster import Cluster, open_cluster
from .cluster._metrics import ClusterCollector
from .lm import GuardedLM, TrioLM

logger = logging.getLogger("dspy_trio.engine")

# Awaiting cleanup (cancelled requests ending, closing HTTP clients) is shielded but never unbounded.
_CLEANUP_TIMEOUT = 5.0


class Engine(metaclass=NoPublicConstructor):
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
        sharing: Sharing | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster  # shared limits, cool-downs and cancel across processes (engine.cluster)
        limits: Limits = cluster if cluster is not None else LocalLimits()
        self._breakers: dict[str, CircuitBreaker] = {}
        for name in lms:
            if (settings := breaker_settings(name, config.lms)) is not None:
                longest = config.lms[name].retry.max_retry_after if name in config.lms else settings.open_for
                self._breakers[name] = limits.breaker(name, settings, longest_open=longest)
        self._guards = {
            name: UpstreamGuard(
                name,
                config.lms[name].policy() if name in config.lms else UpstreamPolicy(),
                limits=limits,
                breaker=self._breakers.get(name),
            )
            for name in lms
        }
        # Every call to an upstream goes through its guard: the backends are wrapped, not changed.
        self._lms: dict[str, TrioLM] = {name: GuardedLM(lm, self._guards[name]) for name, lm in lms.items()}
        # Above the guards: identical calls share one call (and its retries, quota, cool-downs) or an answer.
        self.sharing = sharing
        if sharing is not None:
            self._lms = sharing.wrap(self._lms)
        # Programs call each LM through its fallback chain (just the LM when it has no fallbacks).
        self._fallbacks: FallbackCounts = collections.Counter()
        on_context_window = {name for name, lm in config.lms.items() if lm.fallback_on_context_window}
        chains: dict[str, TrioLM] = {
            name: FallbackLM(
                [(member, self._lms[member]) for member in chain(name, config.lms)],
                on_context_window=on_context_window,
                counts=self._fallbacks,
            )
            for name in lms
        }
        self._programs = programs
        self._admission = Admission(config.max_in_flight, config.max_queued)
        prices = {name: lm.price for name, lm in config.lms.items() if lm.price is not None}
        self._tenants = Tenants(config.tenants, limits=limits)
        self._gate = Gate(
            self._tenants, self._admission, prices, {info.name: info.lm for info in programs.infos()}
        )
        self._closing = False
        self._batches: dict[str, list[RunningBatch]] = {}  # batch id -> (owner, stop it): cancel by id
        # Above the LM calls: identical predictions of pure programs share the whole prediction.
        predictions = SharedPredictions(sharing) if sharing is not None else None
        self._runner = ProgramRunner(chains, config.adapter, predictions)
        self._program_lms = {info.name: info.lm for info in programs.infos()}
        self.metrics = EngineMetrics(self.statistics)
        self._ledger = Ledger(
            self.metrics,
            self._model_of,
            set(self._program_lms),
            log_text=config.log_text,
            settle=self._gate.settle,
        )
        if cluster is not None:
            self.metrics.registry.register(ClusterCollector(cluster.statistics))
        if sharing is not None:
            self.metrics.registry.register(SharingCollector(sharing.statistics))

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Engine [Requests: {s.in_flight} in flight, {s.queued} queued | "
            f"{s.succeeded} ok, {s.failed} failed, {s.timed_out} timed out, {s.abandoned} abandoned, "
            f"{s.cancelled} cancelled, {s.shut_down} shut down, {s.rejected} rejected]"
            f"{' closing' if self._closing else ''}>"
        )

    @property
    def lms(self) -> Mapping[str, TrioLM]:
        """The engine's LM backends by name, each wrapped in its upstream guard (:class:`GuardedLM`) and,
        unless single-flight and the cache are both off, the sharing layer (``SharedLM``)."""
        return dict(self._lms)

    def programs(self) -> list[ProgramInfo]:
        """The served programs with their input and output fields."""
        return self._programs.infos()

    def statistics(self) -> EngineStatistics:
        """A frozen snapshot of the engine's counters and admission state."""
        ledger = self._ledger
        return EngineStatistics.from_counters(
            ledger.outcomes,
            ledger.errors,
            admission=self._admission.statistics(),
            closing=self._closing,
            stream_deltas_dropped=ledger.stream_drops["dropped"],
            stream_deltas_coalesced=ledger.stream_drops["coalesced"],
            seconds_total=ledger.seconds_total,
            upstreams={name: guard.statistics() for name, guard in self._guards.items()},
            sharing=self.sharing.statistics() if self.sharing is not None else None,
            breakers={name: breaker.statistics() for name, breaker in self._breakers.items()},
            fallbacks=self._fallbacks,
            tenants=self._tenants.statistics(),
        )

    def tenant_statistics(self, tenant: str | None) -> TenantStatistics | None:
        """A snapshot of one tenant (None: ``default``), or None if it has had no request yet. Does not
        block."""
        return self._tenants.statistics_of(tenant)

    def cancel(self, request_id: str, *, owner: str | None = None) -> bool:
        """Cancel the request, stream or batch with this id in this process, wherever it is (queued,
        waiting, running, streaming).

        With an ``owner``, only what that owner started is cancelled (an ownerless request is not that
        owner's); without one, the application cancels whatever has the id (see :mod:`._owners`). A
        request ends with :class:`RequestCancelledError` (outcome ``cancelled``; on a stream, one
        :class:`ErrorEvent`, also when it was still queued), and its upstream connection is closed; a
        batch starts no more items and its items in flight end the same way. Returns whether anything
        was cancelled. Does not block.
        """
        return self._cancel_if(request_id, owner_check(owner))

    def _cancel_if(self, request_id: str, allowed: OwnerCheck) -> bool:
        """Cancel what has this id here and whose owner ``allowed`` accepts (a cluster's cancels from
        other processes come in here, with their own check of the owner's digest)."""
        reason = RequestCancelledError(f"request {request_id} was cancelled")
        found = self._ledger.cancel(request_id, lambda: reason, allowed=allowed)
        for started_by, stop in list(self._batches.get(request_id, ())):  # a whole batch, by its id
            if allowed(started_by):
                stop(reason)
                found = True
        return found

    async def cancel_anywhere(self, request_id: str, *, owner: str | None = None) -> bool:
        """Like :meth:`cancel`, and with a cluster also in every other worker and replica (under the same
        ownership rule, checked where the request runs).

        Returns whether anything was cancelled. Blocks, when nothing here has the id, for one bounded
        Redis round-trip and the other processes' answers (see :meth:`Cluster.cancel`).

        Raises:
            ClusterUnavailableError: Redis or another process did not answer, so whether the request
                runs elsewhere is unknown.
        """
        if self.cancel(request_id, owner=owner):
            return True
        return self.cluster is not None and await self.cluster.cancel(request_id, owner=owner)

    def precheck(self, program: str, inputs: Mapping[str, Any], *, tenant: str | None = None) -> None:
        """Raise now what :meth:`predict` or :meth:`stream` would raise before starting: for adapters
        that must choose a status before a streamed body begins (an HTTP status precedes the body).

        Counts nothing and reserves nothing: a request that passes may still find the queue full a
        moment later, and then gets the same errors from :meth:`stream`.

        Raises:
            UnknownProgramError, InvalidInputError: the request is wrong.
            EngineClosedError: the engine is closing.
            OverloadedError: the queue (the engine's or the tenant's) is full right now.
        """
        self._programs.get(program).validate(inputs)
        if self._closing:
            raise EngineClosedError("the engine is shutting down")
        self._gate.check(self._tenants.get(tenant))

    def refuse_if_overloaded(self, program: str, *, tenant: str | None = None) -> None:
        """Refuse a request for ``program`` now if the engine is overloaded, before anything else about
        it is looked at (a server calls it before parsing the body). Does not block.

        A refusal is counted (outcome ``rejected``, code ``overloaded``) as if :meth:`predict` had
        refused it; a request that passes is not counted here, and may still be refused later.

        Raises:
            OverloadedError: the queue (the engine's, or ``tenant``'s own) is full right now.
        """
        if self._closing or program not in self._program_lms:
            return  # the usual path reports these, with their own errors (closing, unknown program)
        try:
            who = self._tenants.get(tenant)
            self._gate.check(who)
        except InvalidInputError:
            return  # the usual path reports it
        except OverloadedError as exc:
            self._ledger.refused(program, "rejected", exc, count_error=True, tenant=who)
            raise

    @property
    def closing(self) -> bool:
        """Whether the engine refuses new requests (it is draining or closed)."""
        return self._closing

    def _model_of(self, program: str) -> str:
        return self._runner.model_of(self._program_lms.get(program))

    def _accept(
        self,
        program: str,
        inputs: Mapping[str, Any],
        request_id: str | None,
        *,
        owner: str | None = None,
        tenant: str | None = None,
        kind: str = "predict",
        no_cache: bool = False,
        no_store: bool = False,
        lm_params: Mapping[str, Any] | None = None,
    ) -> Request:
        """Check a new request; count it as invalid or rejected if it cannot be taken.

        An overloaded engine refuses before validating the inputs (the costly part of acceptance), so a
        refusal stays far cheaper than an acceptance when the engine is saturated.
        """
        started = trio.current_time()
        who: Tenant | None = None
        try:
            resolved = self._programs.get(program)
            who = self._tenants.get(tenant)
            if not self._closing:
                self._gate.check(who)
            values = resolved.validate(inputs)
        except InvalidInputError as exc:
            self._ledger.refused(program, "invalid", exc, tenant=who)
            raise
        except OverloadedError as exc:
            self._ledger.refused(program, "rejected", exc, count_error=True, tenant=who)
            raise
        if self._closing:
            error = EngineClosedError("the engine is shutting down")
            self._ledger.refused(program, "rejected", error, tenant=who)
            raise error
        return Request(
            request_id or uuid.uuid4().hex,
            resolved,
            values,
            started,
            trio.current_effective_deadline(),
            kind=kind,
            owner=owner,
            no_cache=no_cache,
            no_store=no_store,
            tenant=who,
            lm_params=dict(lm_params) if lm_params else None,
        )

    async def predict(
        self,
        program: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        owner: str | None = None,
        no_cache: bool = False,
        no_store: bool = False,
        tenant: str | None = None,
        lm_params: Mapping[str, Any] | None = None,
    ) -> PredictionResult:
        """Run ``program`` on ``inputs`` and return its outputs, usage and timings.

        Blocks while queued for a slot and while the program's LM calls run. The caller's cancel scope is
        the deadline: ``with trio.fail_after(5): await engine.predict(...)``; work whose deadline has
        passed is never started, and cancelling closes the upstream connection (Trio-native LMs).

        Args:
            program: A registered program name, e.g. ``"default"``.
            inputs: The program's input fields by name.
            request_id: An id to report the request under; one is generated if omitted.
            owner: Who started the request (e.g. an API key): a cancel that names an owner reaches it
                only for this one, here and from other processes (:meth:`cancel`). Under the cache's
                ``scope = "key"``, also who it shares answers and in-flight calls with.
            no_cache: Join no identical call in flight and read no cached answer: every LM call is a
                fresh upstream call (HTTP ``Cache-Control: no-cache``).
            no_store: Store none of its answers in the response cache (``Cache-Control: no-store``).
            tenant: Whose share of the engine it runs in, and whose limits, budget and usage it
                counts against (``[tenants.NAME]``; any other name is a tenant of weight 1 without
                limits; None: the tenant ``default``).
            lm_params: Request parameters of every LM call the program makes (``temperature``,
                ``max_tokens``, ``stop``, ``seed``, ...): they win over the LM's defaults and the
                program's own (and are part of what makes two LM calls identical).

        Raises:
            UnknownProgramError, InvalidInputError: the request is wrong; nothing was queued.
            OverloadedError: the queue is full; nothing was queued. Its kinds: the tenant's own
                queue is full (TenantOverloadedError), its rate limit (TenantRateLimitedError) or
                budget (BudgetExceededError) is spent, or the expected wait passes the deadline
                (DeadlineUnmeetableError).
            EngineClosedError: the engine is closing.
            RequestCancelledError: :meth:`cancel` ended it.
            UpstreamError: the LM provider failed.
            ProgramError: the program failed (e.g. the LM's answer did not parse).
        """
        request = self._accept(
            program,
            inputs,
            request_id,
            owner=owner,
            tenant=tenant,
            no_cache=no_cache,
            no_store=no_store,
            lm_params=lm_params,
        )
        with self._ledger.track(request):
            with request.scoped():
                await self._gate.enter(request)
                try:
                    # A request whose deadline passed while it queued is never started.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    outputs, usage = await self._runner.run(request)
                finally:
                    self._gate.leave(request)
                request.settle("succeeded")
                return self._runner.result(request, outputs, usage)
            # Only reached when our own scope absorbed its cancellation: closed, or cancelled by id.
            raise request.interruption()

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        owner: str | None = None,
        tenant: str | None = None,
        options: StreamOptions | None = None,
        no_cache: bool = False,
        no_store: bool = False,
        lm_params: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[EventStream]:
        """Run ``program`` on ``inputs``, streaming its output fields as they are generated.

        ::

            async with engine.stream("default", {"question": "..."}) as events:
                async for event in events:   # StatusEvent, FieldDelta..., then one FinalEvent or ErrorEvent
                    ...

        Entering blocks while the request is queued for a slot, so an overload is raised here, before any
        event. The program then runs in a task of the stream; leaving the block cancels it (closing the
        upstream connection) and leaves nothing running. Errors of the program, the LM or the consumer
        policy, and a cancel by the engine (:meth:`cancel`, shutdown; also while queued), arrive as one
        :class:`ErrorEvent`, never as an exception out of the entry or the iteration. The deadline of the
        scope around the block is the stream's: it passing is ``timed_out``; leaving early ``abandoned``.

        Args:
            program: A registered program name.
            inputs: The program's input fields by name.
            request_id: An id to report the request under; one is generated if omitted.
            owner: Who started the request (e.g. an API key): a cancel that names an owner reaches it
                only for this one, here and from other processes (:meth:`cancel`).
            tenant: Whose share, limits and budget it counts against (as for :meth:`predict`).
            options: Backpressure, buffer and coalescing; ``config.stream`` when omitted.
            no_cache, no_store: The cache switches, as for :meth:`predict`.
            lm_params: Request parameters of every LM call, as for :meth:`predict`.

        Raises:
            UnknownProgramError, InvalidInputError, OverloadedError, EngineClosedError: on entry, as for
                :meth:`predict`; nothing was started.
        """
        request = self._accept(
            program,
            inputs,
            request_id,
            owner=owner,
            tenant=tenant,
            kind="stream",
            no_cache=no_cache,
            no_store=no_store,
            lm_params=lm_params,
        )
        name, model = request.program.name, self._model_of(request.program.name)

        def first_delta(field: str) -> None:
            seconds = trio.current_time() - request.started
            self.metrics.record_first_token(name, model, field, seconds)

        async with open_stream(
            request,
            options or self.config.stream,
            ledger=self._ledger,
            gate=self._gate,
            runner=self._runner,
            on_first_delta=first_delta,
        ) as events:
            yield events

    def batch_stream(
        self,
        program: str,
        items: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        fail_fast: bool = False,
        request_id: str | None = None,
        owner: str | None = None,
        no_cache: bool = False,
        no_store: bool = False,
        tenant: str | None = None,
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[BatchItem]]:
        """Run ``program`` on every item, handing out each item's outcome as soon as it is ready.

        ::

            async with engine.batch_stream("default", items, concurrency=8) as outcomes:
                async for item in outcomes:          # BatchItem(index, result | error), completion order
                    ...

        At most ``concurrency`` items run at once and at most ``concurrency`` finished outcomes wait for
        the consumer; ``items`` may be a lazy iterable, read one item at a time. Each item is a request
        of its own (admission, statistics, the same outcomes as :meth:`predict`). Leaving the block
        cancels what is still running (those items are ``abandoned``). Item ``i`` runs under the id
        ``{request_id}-{i}``; :meth:`cancel` with ``request_id`` itself stops the whole batch (for its
        ``owner`` only, when the cancel names one). ``no_cache`` and ``no_store`` apply to every item
        (see :meth:`predict`). Every item counts against ``tenant``.

        Raises:
            InvalidInputError: on entry, if ``concurrency`` is not a positive integer.
        """
        return open_batch(
            functools.partial(self.predict, owner=owner, tenant=tenant, no_cache=no_cache, no_store=no_store),
            lambda item_id, reason: self._ledger.cancel(item_id, lambda: reason),
            program,
            items,
            concurrency=concurrency,
            fail_fast=fail_fast,
            request_id=request_id,
            owner=owner,
            running=self._batches,
        )

    async def batch(
        self,
        program: str,
        items: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        fail_fast: bool = False,
        request_id: str | None = None,
        owner: str | None = None,
        no_cache: bool = False,
        no_store: bool = False,
        tenant: str | None = None,
    ) -> list[BatchItem]:
        """Run ``program`` on every item; return one outcome per item, in input order.

        Blocks until every item has an outcome. One item's failure never loses the others; with
        ``fail_fast`` the first failure cancels the rest, which end as :class:`RequestCancelledError`.
        """
        items = list(items)
        outcomes: list[BatchItem | None] = [None] * len(items)
        async with self.batch_stream(
            program,
            items,
            concurrency=concurrency,
            fail_fast=fail_fast,
            request_id=request_id,
            owner=owner,
            no_cache=no_cache,
            no_store=no_store,
            tenant=tenant,
        ) as stream:
            async for item in stream:
                outcomes[item.index] = item
        cancelled = RequestCancelledError("not started: another item failed")
        return [item or BatchItem(index, error=cancelled) for index, item in enumerate(outcomes)]

    async def drain(self) -> None:
        """Refuse new requests, let active ones run for ``config.drain_timeout``, then cancel the rest
        (they end with :class:`EngineClosedError`, outcome ``shut_down``). Leaving :func:`open_engine`
        does this too; call it earlier to drain before the rest of a server shuts down. Idempotent.

        Blocks until every request that was active has ended. If the caller's scope is cancelled while
        it waits, the rest are cancelled at once and still awaited (shielded, for at most
        ``_CLEANUP_TIMEOUT`` seconds) before ``trio.Cancelled`` propagates.
        """
        self._closing = True
        try:
            with trio.move_on_after(self.config.drain_timeout):
                await self._ledger.wait_idle()
        finally:
            with trio.move_on_after(_CLEANUP_TIMEOUT) as cleanup:
                cleanup.shield = True
                self._ledger.cancel_all(
                    lambda: EngineClosedError("the engine shut down before the request finished")
                )
                await self._ledger.wait_idle()
            if cleanup.cancelled_caught:
                logger.error(
                    "%d requests did not end within %ss of being cancelled",
                    self._ledger.active,
                    _CLEANUP_TIMEOUT,
                )


async def close_lms(lms: Iterable[TrioLM]) -> None:
    """Close every LM at once, each shielded and bounded on its own, whether or not the caller is cancelled:
    one LM whose ``aclose`` fails (logged) or hangs never keeps the others open. Blocks for at most
    ``_CLEANUP_TIMEOUT`` seconds."""

    async def close(lm: TrioLM) -> None:
        with trio.move_on_after(_CLEANUP_TIMEOUT) as cleanup:
            cleanup.shield = True
            try:
                await lm.aclose()
            except Exception:
                logger.exception("closing LM %r failed", lm)
        if cleanup.cancelled_caught:
            logger.error("closing LM %r took longer than %ss; left behind", lm, _CLEANUP_TIMEOUT)

    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for lm in lms:
                nursery.start_soon(close, lm)


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
    :class:`EngineClosedError`, and the LMs' connections are closed. Leaving it because the enclosing
    scope was cancelled skips the graceful wait but not the rest: in-flight requests are cancelled at once
    and awaited, and the LMs closed, shielded and bounded. Exceptions from the block propagate as they
    are, never wrapped in an exception group.

    Args:
        config: The configuration; ``EngineConfig.from_env()`` when omitted.
        lms: LM instances to use instead of building them from ``config.lms`` (by the same names);
            the engine closes them on exit too.

    Raises:
        ConfigError: the configuration cannot be used.
    """
    config = EngineConfig.from_env() if config is None else config
    _dspy.cache_type_adapters()  # same prompts and parses, one pydantic TypeAdapter per type
    _dspy.cache_signature_fields()  # and a signature's fields split once, not at every access
    given = dict(lms or {})
    backends: dict[str, TrioLM] = dict(given)
    try:
        for name, lm_config in config.lms.items():
            if name not in given:
                backends[name] = lm_config.build_lm(cache=config.dspy_cache)
        programs = ProgramRegistry.build(config.programs)
    except BaseException:
        await close_lms(backends.values())  # an engine that failed to open still closes what it holds
        raise
    simulated = [name for name, c in config.lms.items() if c.provider == "simulated" and name not in given]
    if simulated:
        logger.info("LM %s: the built-in simulated LM (no real LM configured)", ", ".join(simulated))
    shared: AbstractAsyncContextManager[Cluster | None] = (
        open_cluster(config.cluster) if config.cluster.redis_url else nullcontext()
    )
    try:
        async with shared as cluster, _groups.open_service_nursery() as upkeep:
            sharing = open_sharing(config, upkeep, cluster)
            engine = Engine._create(config, backends, programs, cluster=cluster, sharing=sharing)
            if cluster is not None:
                cluster.attach(engine._cancel_if)
            for backend in backends.values():  # each LM's maintain(), e.g. reaping closed connections
                await upkeep.start(backend.maintain)
            try:
                yield engine
            finally:
                await engine.drain()
                if sharing is not None:
                    sharing.closed = True
    finally:
        await close_lms(backends.values())
