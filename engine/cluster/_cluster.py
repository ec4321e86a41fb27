"""A process's membership in a cluster: shared limits, cancel by id across processes, heartbeats, and
the background tasks that keep them (a write queue, a heartbeat, a pub/sub listener).

::

    async with open_cluster(config.cluster) as cluster:
        guard = UpstreamGuard("default", policy, limits=cluster)      # shared RPM/TPM and cool-down
        cluster.attach(engine._cancel_if)                             # cancels from other processes
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import coredis
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.retry import ExponentialBackoffRetryPolicy, NoRetryPolicy

from .. import _groups
from .._breaker import BreakerSettings, CircuitBreaker
from .._budget import BudgetLimit
from .._cluster_config import ClusterConfig
from .._limits import CoolDown
from ._breaker import KeptOpenings, SharedBreakerPeers, shared_breaker
from ._budget import SharedBudget
from ._cancel import CancelRelay, LocalCancel, OwnerDigest
from ._cooldown import SharedCoolDown
from ._flight import RemoteFlights
from ._heartbeat import Flushes, beat, leave, run_heartbeat
from ._quota import SharedQuota
from ._redis import RedisLink, RedisUnavailableError

logger = logging.getLogger("dspy_trio.engine.cluster")

_CLEANUP_TIMEOUT = 1.0


@attrs.frozen
class ClusterStatistics:
    """A snapshot of this process's view of the cluster.

    Attributes:
        process_id: This process (``host:pid:random``).
        degraded: Redis is unreachable; limits are local (quota / ``processes``).
        processes: Live processes sharing the quota, at the last heartbeat.
        round_trips: Redis calls made by this process (queued writes count one per batch).
        failures: Redis calls that failed or timed out.
        writes_dropped: Queued writes (registrations, broadcasts) dropped: queue full or Redis down.
    """

    process_id: str
    degraded: bool
    processes: int
    round_trips: int
    failures: int
    writes_dropped: int


class Cluster:
    """Shared state of the processes that use one Redis. Get one from :func:`open_cluster`.

    Implements the :class:`dspy_trio.engine._limits.Limits` port, so an ``UpstreamGuard`` built with it shares
    its quota and cool-down with every other process, and a tenant its rate window and budget.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.subscribed = trio.Event()  # set while cancels and cool-downs of others are heard
        self.relay = CancelRelay(link, OwnerDigest(_secret(link.config)), lambda: self.subscribed.is_set())
        self._quotas: dict[str, SharedQuota] = {}
        self._cooldowns: dict[str, SharedCoolDown] = {}
        self.flights: RemoteFlights | None = None  # single-flight and the cache across processes
        self._kept_openings = KeptOpenings(link)  # the openings Redis keeps, read at every heartbeat
        self._breakers: dict[str, SharedBreakerPeers] = self._kept_openings.peers
        self._budgets: dict[str, SharedBudget] = {}

    def __repr__(self) -> str:
        return f"<Cluster {self.link!r}>"

    def statistics(self) -> ClusterStatistics:
        link = self.link
        return ClusterStatistics(
            process_id=link.process_id,
            degraded=link.degraded,
            processes=link.processes,
            round_trips=link.round_trips,
            failures=link.failures,
            writes_dropped=link.writes_dropped,
        )

    def quota(self, upstream: str, rpm: float | None, tpm: float | None) -> SharedQuota:
        if upstream not in self._quotas:
            self._quotas[upstream] = SharedQuota(self.link, upstream, rpm, tpm)
        return self._quotas[upstream]

    def cooldown(self, upstream: str, *, max_wait: float = math.inf) -> CoolDown:
        if upstream not in self._cooldowns:
            self._cooldowns[upstream] = SharedCoolDown(self.link, upstream, max_wait=max_wait)
        cooldown = self._cooldowns[upstream]
        cooldown.max_wait = min(cooldown.max_wait, max_wait)  # the tightest cap asked for
        return cooldown

    def share_flights(
        self, *, lease_ttl: float, cache_ttl: float, cache: bool, max_entry_bytes: int
    ) -> RemoteFlights:
        """Single-flight (and, with ``cache``, the response cache) through this cluster's Redis; the
        announcements of other processes' flights are delivered to it (see ``_flight``)."""
        self.flights = RemoteFlights(
            self.link, lease_ttl=lease_ttl, cache_ttl=cache_ttl, cache=cache, max_entry_bytes=max_entry_bytes
        )
        return self.flights

    def breaker(self, upstream: str, settings: BreakerSettings, *, longest_open: float) -> CircuitBreaker:
        """The circuit breaker of ``upstream`` in this process, sharing its openings and probes with the
        same LM's breakers in every other process (see ``_breaker``). One per upstream.

        An opening Redis keeps (another process's breaker is open) is read in the background at once:
        the breaker opens within a round-trip."""
        breaker, peers = shared_breaker(self.link, upstream, settings, longest_open=longest_open)
        self._breakers[upstream] = peers
        if self.link.nursery is not None:
            self.link.nursery.start_soon(self._kept_openings.read, [peers])
        return breaker

    def _flushing(self) -> list[Flushes]:
        """What the heartbeat lets send its queued writes (every quota and budget) or read (the
        openings of breakers)."""
        return [*self._quotas.values(), *self._budgets.values(), self._kept_openings]

    def budget(self, tenant: str, limit: BudgetLimit) -> SharedBudget:
        if tenant not in self._budgets:
            self._budgets[tenant] = SharedBudget(self.link, tenant, limit)
        return self._budgets[tenant]

    def attach(self, cancel: LocalCancel) -> None:
        """Deliver cancels from other processes to ``cancel(request_id, owner_check)``: the engine's
        ``_cancel_if``, which cancels what this process runs under that id for the owners the check
        accepts."""
        self.relay.attach(cancel)

    async def cancel(self, request_id: str, *, owner: str | None = None) -> bool:
        """Cancel ``request_id`` in every process that runs it (see :meth:`CancelRelay.cancel`)."""
        return await self.relay.cancel(request_id, owner=owner)

    def _dispatch(self, message: Any) -> None:
        channel, data = message.get("channel"), message.get("data")
        if channel == self.relay.broadcast_channel:
            self.relay.heard_cancel(str(data))
        elif channel == self.relay.answer_channel:
            self.relay.heard_answer(str(data))
        elif channel == self.link.key("flight"):
            if self.flights is not None:
                self.flights.heard(str(data))
        elif channel == self.link.key("cooldown"):
            try:
                heard = json.loads(data)
                if heard.get("from") != self.link.process_id and heard.get("upstream") in self._cooldowns:
                    # A length only: an end ("until") would be read on this process's clock, which
                    # need not agree with the sender's (such a message has no "seconds": malformed).
                    self._cooldowns[heard["upstream"]].heard(float(heard["seconds"]))
            except (ValueError, TypeError, KeyError):
                logger.warning("ignored a malformed cool-down message: %s", _excerpt(data))
        elif channel == self.link.key("breaker"):
            try:
                heard = json.loads(data)
                if heard.get("from") != self.link.process_id and heard.get("lm") in self._breakers:
                    self._breakers[heard["lm"]].heard(heard)
            except (ValueError, TypeError, KeyError, AttributeError):
                logger.warning("ignored a malformed circuit-breaker message: %s", _excerpt(data))

    async def _listen(self) -> None:
        """Receive cancels for this process, cool-downs and circuit-breaker news from all, until cancelled.

        Subscribes only while Redis answers (the heartbeat notices when it does again); a subscription
        that breaks marks the link degraded and is made again after the next good heartbeat.
        """
        channels = [
            self.relay.broadcast_channel,
            self.relay.answer_channel,
            self.link.key("cooldown"),
            self.link.key("flight"),
            self.link.key("breaker"),
        ]
        retry = ExponentialBackoffRetryPolicy(
            (RedisConnectionError,), retries=3, base_delay=0.05, max_delay=0.5, jitter=True
        )
        while True:
            if self.link.degraded:
                await trio.sleep(self.link.config.heartbeat_interval)
                continue
            try:
                # Redis acknowledges the subscription within the cap of any other call (coredis's
                # own default, 1 s, would refuse a Redis that is slower but within call_timeout).
                pubsub = self.link.client.pubsub(
                    channels=channels,
                    ignore_subscribe_messages=True,
                    retry_policy=retry,
                    subscription_timeout=self.link.config.call_timeout,
                )
                async with pubsub:
                    self.subscribed.set()
                    if self._breakers:  # what was broadcast while this process was not listening
                        self.link.nursery.start_soon(self._kept_openings.read)  # type: ignore[union-attr]
                    async for message in pubsub:
                        self._dispatch(message)
            except trio.Cancelled:
                raise
            except Exception as exc:
                self.link.mark_down(f"subscriber: {type(exc).__name__}: {exc}")
            self.subscribed = trio.Event()
            await trio.sleep(self.link.config.heartbeat_interval)


def _excerpt(data: Any, limit: int = 200) -> str:
    """``data`` for a log line: its repr, cut to ``limit`` characters (a message may be megabytes)."""
    text = repr(data[: limit + 1] if isinstance(data, str | bytes) else data)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(data) if isinstance(data, str | bytes) else len(text)} characters)"


def _secret(config: ClusterConfig) -> bytes:
    """The key of the owners' digests: the configured secret, else one derived from the key prefix
    (the same in every process, so cancels still work, but known to anyone who reads Redis)."""
    if config.secret:
        return config.secret.encode()
    return f"dspy-trio unset secret:{config.key_prefix}".encode()


@asynccontextmanager
async def open_cluster(
    config: ClusterConfig, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[Cluster]:
    """Join the cluster of processes sharing ``config.redis_url`` for the block.

    Blocks on entry for at most a few ``call_timeout``: a first heartbeat and the pub/sub subscription.
    An unreachable Redis does not fail the entry: the process starts degraded (local limits) and joins
    when Redis answers. Leaving the block stops the background tasks and removes this process from
    the count.

    Args:
        config: The cluster settings (``redis_url`` must be set).
        clock: Wall time, read only for the calendar windows of tenants' budgets (the quota runs on
            Redis's own clock); tests pass ``trio.current_time``.
    """
    if not config.redis_url:
        raise ValueError("open_cluster needs a redis_url")
    # coredis logs every failed connection attempt with a traceback at ERROR; Redis's health is reported
    # here instead, once per change (RedisLink.mark_down / mark_up) and as the degraded gauge.
    logging.getLogger("coredis").setLevel(logging.CRITICAL)
    if not config.secret:
        logger.warning(
            "[cluster] secret (DSPY_TRIO_CLUSTER_SECRET) is not set: the owners' digests that cancels "
            "carry through Redis are keyed by the key prefix, so anyone who can read Redis can test a "
            "guessed API key against them; set the same random secret in every replica"
        )
    client: coredis.Redis[str] = coredis.Redis.from_url(
        config.redis_url,
        decode_responses=True,
        connect_timeout=config.call_timeout,
        retry_policy=NoRetryPolicy(),
    )
    try:
        async with client:
            link = RedisLink(client, config, clock)
            cluster = Cluster(link)
            with suppress(RedisUnavailableError):
                await beat(link)
            async with _groups.open_service_nursery() as nursery:
                link.nursery = nursery
                nursery.start_soon(link.run_writer)
                nursery.start_soon(run_heartbeat, link, cluster._flushing)
                nursery.start_soon(cluster._listen)
                if not link.degraded:
                    with trio.move_on_after(4 * config.call_timeout):
                        await cluster.subscribed.wait()
                try:
                    yield cluster
                finally:
                    with trio.move_on_after(_CLEANUP_TIMEOUT) as cleanup:
                        cleanup.shield = True
                        for budget in cluster._budgets.values():  # spend not yet written
                            await budget.flush(idle_after=0.0)
                        await leave(link)
    except BaseExceptionGroup as group:
        raise _groups.collapse(group) from None
