"""Single-flight and the response cache, as a layer of LM calls: :class:`SharedLM` in front of an upstream.

The engine composes every LM call as program -> :class:`SharedLM` -> upstream guard (cool-down, rate
limits, retries) -> backend. The guard sits below, so that a shared call waits for a cool-down, takes
its quota and is retried once, for all its waiters. One call through the layer:

1. ``no_cache`` (the request's switch, or DSPy's per-call ``cache=False``): a fresh upstream call in the
   caller's own task, joining nothing and reading nothing (counted ``bypass``); its answer may be stored.
2. The call's key (:mod:`._call_key`). A fresh answer in the memory cache answers at once (``hit``).
3. With single-flight: the key's flight in this process is joined, or started (:mod:`._flight`); with a
   cluster, the flight first asks Redis for the cached answer or the key's lease (:mod:`.cluster._flight`).
4. Without single-flight: the Redis cache, if there is one, then the call in the caller's own task.

An upstream answer is stored only once the program's adapter parsed it (:mod:`._request_sharing`).
Answers given without an upstream call of their own report no usage (nothing was spent on them): their
tokens are counted as saved, in the request's result and in the metrics.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import _request_sharing
from ._answer_cache import MemoryAnswerCache, size_of
from ._cache_config import CacheConfig
from ._call_key import call_key, digest_secret
from ._errors import EngineClosedError
from ._flight import Flight, FlightLost, Source
from ._request_sharing import OUTSIDE, RequestSharing, Verdict
from ._sharing_statistics import SharingStatistics
from ._trace import detached, record_attempt, record_saved
from .cluster._flight import Lease, RemoteFlights
from .lm._base import Completion, DeltaSink, Message, TrioLM
from .lm._wrapped import WrappedLM

if TYPE_CHECKING:
    from ._engine_config import EngineConfig
    from .cluster import Cluster

logger = logging.getLogger("dspy_trio.engine")


# The name of a flight's task (given, so that Trio need not make one up for each flight).
_FLIGHT_TASK = f"{__name__}.Sharing._run"


def _tokens(completion: Completion) -> int:
    usage = completion.usage
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


def _whole_text(completion: Completion) -> str:
    return "".join(completion.texts)


class Sharing:
    """The engine's flights in progress, its memory cache, its link to the cluster's, and the counts.

    Args:
        config: The ``[cache]`` settings.
        nursery: Where flights run (the engine's; it must outlive every request). The layer of whole
            predictions (``_shared_predictions``) runs its flights there too.
        secret: The key of the calls' digests (:func:`._call_key.digest_secret`).
        remote: Single-flight and the cache across processes, with a cluster.
    """

    def __init__(
        self,
        config: CacheConfig,
        nursery: trio.Nursery,
        *,
        secret: bytes,
        remote: RemoteFlights | None = None,
    ) -> None:
        self.config = config
        self.secret = secret
        self.remote = remote
        # LM calls' answers (Completion) and whole predictions' (``_shared_predictions``), in one.
        self.memory: MemoryAnswerCache[object] | None = (
            MemoryAnswerCache(ttl=config.ttl, max_entries=config.max_entries, max_bytes=config.max_bytes)
            if config.backend == "memory"
            else None
        )
        self.nursery = nursery
        self._flights: dict[tuple[str, bool], Flight[Completion]] = {}
        self.other_flights: list[Sized] = []  # the layers above (whole predictions): their flights
        self._cache_on = config.backend != "off"
        self._remote_cache = remote is not None and remote.cache
        self._across = remote is not None and config.flights_across_processes
        self.counts: Counter[str] = Counter()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Sharing [{len(self._flights)} in flight | {dict(self.counts)}]>"

    def wrap(self, lms: Mapping[str, TrioLM]) -> dict[str, TrioLM]:
        """Each LM behind a :class:`SharedLM` of this registry."""
        return {name: SharedLM(name, lm, self) for name, lm in lms.items()}

    def statistics(self) -> SharingStatistics:
        counts, memory, remote = self.counts, self.memory, self.remote
        return SharingStatistics(
            cache_hits=counts["hit"],
            cache_misses=counts["miss"],
            cache_bypasses=counts["bypass"],
            coalesced=counts["coalesced"],
            upstream_calls_saved=counts["hit"] + counts["coalesced"],
            tokens_saved=counts["tokens_saved"],
            in_flight=len(self._flights) + sum(map(len, self.other_flights)),
            cache_entries=len(memory) if memory is not None else 0,
            cache_bytes=memory.bytes if memory is not None else 0,
            cache_evictions=memory.evictions if memory is not None else 0,
            corrupt_entries=remote.corrupt if remote is not None else 0,
            takeovers=remote.takeovers if remote is not None else 0,
            redis_fallbacks=remote.fallbacks if remote is not None else 0,
        )

    # --- counting ------------------------------------------------------------------------------------

    def _looked_up(self, result: str) -> None:
        if self._cache_on:
            self.counts[result] += 1

    def _saved(self, completion: Completion, *, cached: bool) -> Completion:
        """Count an answer given without an upstream call; it is returned without usage (none spent),
        with everything else it said (how its choices ended, so a cut answer still reads as cut)."""
        tokens = _tokens(completion)
        if not cached:
            self.counts["coalesced"] += 1
        self.counts["tokens_saved"] += tokens
        record_saved(cached=cached, tokens=tokens)
        return attrs.evolve(completion, usage={})

    # --- storing -------------------------------------------------------------------------------------

    def _verdict(self, key: str, completion: Completion, *, leased: bool = False) -> Verdict | None:
        """How the adapter's verdict on a new upstream answer stores it, or None when nothing would."""
        if self.memory is not None:
            memory = self.memory

            def put() -> None:
                size = size_of(completion)
                if size <= self.config.max_entry_bytes:
                    memory.put(key, completion, size)

            return Verdict(put)
        if leased:  # the flight's announcement stores it (and hands it to other processes)
            return Verdict()
        if self._remote_cache:
            remote = self.remote
            assert remote is not None
            return Verdict(lambda: remote.store_soon(key, completion))
        return None

    @staticmethod
    def _ticket(verdict: Verdict | None, completion: Completion, request: RequestSharing) -> None:
        if verdict is not None and _request_sharing.in_request():
            request.tickets.append(verdict.ticket(completion.texts, store=not request.no_store))

    # --- the paths of a call -------------------------------------------------------------------------

    async def fresh(
        self,
        inner: TrioLM,
        key: str,
        messages: Sequence[Message],
        params: Mapping[str, Any],
        sink: DeltaSink | None,
        request: RequestSharing,
        *,
        bypass: bool,
    ) -> Completion:
        """A call of the caller's own, in its task (``no_cache``, or single-flight off)."""
        if not bypass and self._remote_cache:
            assert self.remote is not None
            found = await self.remote.read(key)
            if found is not None:
                self._looked_up("hit")
                await _deliver_whole(sink, found)
                return self._saved(found, cached=True)
        self._looked_up("bypass" if bypass else "miss")
        completion = await inner.complete(messages, params, sink)
        self._ticket(self._verdict(key, completion), completion, request)
        return completion

    async def fly(
        self,
        inner: TrioLM,
        key: str,
        messages: Sequence[Message],
        params: Mapping[str, Any],
        sink: DeltaSink | None,
        request: RequestSharing,
    ) -> Completion:
        """The answer of the key's flight in this process: joined, or started. Blocks until it ends, or
        the caller's own scope is cancelled (the caller leaves the flight)."""
        streams = sink is not None
        while True:
            flight = self._flights.get((key, True))
            if not streams and flight is None:
                flight = self._flights.get((key, False))
            deadline = trio.current_effective_deadline()
            if flight is None or flight.scope.cancel_called:
                if self.closed:
                    raise EngineClosedError("the engine is shutting down")
                flight = Flight(key, streamed=streams, deadline=deadline)
                self._flights[(key, streams)] = flight
                waiter = flight.join(deadline, streams=streams)
                self.nursery.start_soon(self._run, flight, inner, messages, params, name=_FLIGHT_TASK)
            else:
                waiter = flight.join(deadline, streams=streams)
            try:
                completion = await flight.receive(waiter, sink)
            except FlightLost:
                await trio.lowlevel.checkpoint()  # raises the caller's own cancel, if that is why
                continue
            except BaseException:
                self._looked_up("miss")
                raise
            if sink is not None and waiter.cursor == 0:
                await _deliver_whole(sink, completion)
            return self._answered(flight, completion, request)

    def _answered(
        self, flight: Flight[Completion], completion: Completion, request: RequestSharing
    ) -> Completion:
        """What one waiter of ``flight`` counts and gets."""
        source: Source = flight.source
        if source == "cache":
            self._looked_up("hit")
            return self._saved(completion, cached=True)
        self._looked_up("miss")
        if source == "remote" or flight.answered > 1:
            return self._saved(completion, cached=False)
        record_attempt(flight.attempts)  # the first to get it: it paid for the call
        if flight.verdict is not None:
            self._ticket(flight.verdict, completion, request)
        return completion

    async def _run(
        self,
        flight: Flight[Completion],
        inner: TrioLM,
        messages: Sequence[Message],
        params: Mapping[str, Any],
    ) -> None:
        """A flight's task: the call (through Redis with a cluster), then, as a leader, the
        announcement."""
        _request_sharing.detach()  # the flight serves many requests: it carries none's switches
        trace = detached()  # and the attempts of its call are its own
        leases: list[Lease] = []
        call = inner.complete(messages, params, flight if flight.streamed else None)
        try:
            await flight.run(call if self.remote is None else self._through_redis(flight, call, leases))
        finally:
            # All of this before any waiter runs again: they find the flight gone and its counts set.
            flight.attempts = trace.attempts
            if self._flights.get((flight.key, flight.streamed)) is flight:
                del self._flights[(flight.key, flight.streamed)]
            if flight.completion is not None and flight.source == "upstream":
                flight.verdict = self._verdict(flight.key, flight.completion, leased=bool(leases))
        if leases:
            await self._announce(flight, leases[0])

    async def _through_redis(
        self, flight: Flight[Completion], call: Coroutine[Any, Any, Completion], leases: list[Lease]
    ) -> Completion:
        """``call``, or the answer of the cache or of another process, through Redis (see
        ``cluster._flight``); a lease taken is appended to ``leases``. ``call`` is closed unstarted when
        the answer came from elsewhere."""
        remote = self.remote
        assert remote is not None
        try:
            if self._across:

                async def make() -> Completion:
                    return await call

                completion, flight.source = await remote.produce(
                    flight.key, make, leases.append, read_cache=remote.cache
                )
                return completion
            if remote.cache and (found := await remote.read(flight.key)) is not None:
                flight.source = "cache"
                return found
            return await call
        finally:
            if inspect.getcoroutinestate(call) == inspect.CORO_CREATED:
                call.close()

    async def _announce(self, flight: Flight[Completion], lease: Lease) -> None:
        """Tell the other processes how the call this process led ended: its answer once the adapter
        accepted it (stored, or handed off), or that they must claim again. Blocks for at most half a
        lease TTL, for the verdict."""
        remote = self.remote
        assert remote is not None
        try:
            verdict = flight.verdict
            if flight.completion is not None and verdict is not None:
                with trio.move_on_after(remote.lease_ttl / 2):
                    await verdict.wait(flight.wait_all_left)
            good = verdict is not None and verdict.good
            answer = flight.completion if good else None
            remote.announce(flight.key, lease, answer, store=verdict is not None and verdict.storable)
        finally:
            remote.forget(lease)


async def _deliver_whole(sink: DeltaSink | None, completion: Completion) -> None:
    """A streaming caller of an answer that was not streamed to it gets it in one delta."""
    if sink is not None and (text := _whole_text(completion)):
        await sink.send(text)


class SharedLM(WrappedLM):
    """An LM whose calls go through the engine's sharing layer (see the module docstring).

    Args:
        name: The engine's name for the upstream (part of every key).
        inner: The LM that makes the upstream calls (the guarded backend).
        sharing: The engine's registry.
    """

    def __init__(self, name: str, inner: TrioLM, sharing: Sharing) -> None:
        super().__init__(inner)
        self.name = name
        self.sharing = sharing

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        """A call with no DSPy arguments of its own (see :meth:`complete_call`)."""
        return await self.complete_call(messages, params, sink, {})

    async def complete_call(
        self,
        messages: Sequence[Message],
        params: Mapping[str, Any],
        sink: DeltaSink | None,
        call_kwargs: Mapping[str, Any],
    ) -> Completion:
        """One call, shared with identical ones where allowed. Blocks until answered (see the module
        docstring for the paths)."""
        sharing = self.sharing
        config = sharing.config
        request = _request_sharing.current()
        if request.direct and sharing.remote is None and not sharing._flights:
            # A shared prediction's own call (it is shared and stored whole, one level up), and nothing
            # in flight it could join: the call itself, in this task.
            sharing._looked_up("miss")
            completion = await self.inner.complete(messages, params, sink)
            request.got(completion.texts)
            return completion
        scope = (request.owner or "") if config.scope == "key" else ""
        rollout_id = call_kwargs.get("rollout_id", self.kwargs.get("rollout_id"))
        key = call_key(
            sharing.secret, self.name, self.model, messages, params, scope=scope, rollout_id=rollout_id
        )
        bypass = request.no_cache or call_kwargs.get("cache") is False
        if (
            not bypass
            and sharing.memory is not None
            and isinstance(found := sharing.memory.get(key), Completion)
        ):
            sharing._looked_up("hit")
            await _deliver_whole(sink, found)
            completion = sharing._saved(found, cached=True)
        elif bypass or not config.single_flight:
            completion = await sharing.fresh(self.inner, key, messages, params, sink, request, bypass=bypass)
        else:
            completion = await sharing.fly(self.inner, key, messages, params, sink, request)
        if request is not OUTSIDE:
            request.got(completion.texts)
        return completion


def open_sharing(config: EngineConfig, nursery: trio.Nursery, cluster: Cluster | None) -> Sharing | None:
    """The sharing layer ``config.cache`` asks for (None when single-flight and the cache are both
    off), its flights run in ``nursery``, across processes through ``cluster`` when there is one."""
    cache = config.cache
    if not cache.enabled:
        return None
    remote = None
    if cluster is not None and (cache.backend == "redis" or cache.flights_across_processes):
        remote = cluster.share_flights(
            lease_ttl=cache.lease_ttl,
            cache_ttl=cache.ttl,
            cache=cache.backend == "redis",
            max_entry_bytes=cache.max_entry_bytes,
        )
        nursery.start_soon(remote.keep_leases)
    # The key of the calls' digests: the deployment's secret, as for the owners' digests of cancels.
    secret = config.cluster.secret or f"dspy-trio unset secret:{config.cluster.key_prefix}"
    return Sharing(cache, nursery, secret=digest_secret(secret), remote=remote)
