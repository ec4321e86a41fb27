"""What single-flight and the response cache did: a frozen snapshot, and its Prometheus metrics.

Counts are per LM call that reached the sharing layer (a waiter, not a flight): 1,000 identical calls
answered by one upstream call are 1 miss and 999 coalesced waiters, 999 upstream calls saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@attrs.frozen
class SharingStatistics:
    """A snapshot of the sharing layer.

    Attributes:
        cache_hits: LM calls answered from the response cache (0 while the cache is off).
        cache_misses: LM calls that looked in the cache and found nothing (coalesced ones included).
        cache_bypasses: LM calls that skipped the cache and in-flight calls (``no-cache``).
        coalesced: LM calls answered by an identical call in flight, here or in another process.
        upstream_calls_saved: LM calls answered without an upstream call of their own (hits and
            coalesced).
        tokens_saved: Tokens of those answers.
        in_flight: Shared upstream calls in flight in this process now.
        cache_entries, cache_bytes: The memory cache's size now (0 for other backends).
        cache_evictions: Answers the memory cache dropped to stay within its bounds.
        corrupt_entries: Stored answers that did not decode (treated as misses, deleted).
        takeovers: Calls this process took over after another process's lease expired.
        redis_fallbacks: Shared calls made without Redis because it failed or was down.
    """

    cache_hits: int = 0
    cache_misses: int = 0
    cache_bypasses: int = 0
    coalesced: int = 0
    upstream_calls_saved: int = 0
    tokens_saved: int = 0
    in_flight: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_evictions: int = 0
    corrupt_entries: int = 0
    takeovers: int = 0
    redis_fallbacks: int = 0


class SharingCollector:
    """``dspy_trio_cache_*`` and ``dspy_trio_coalesced_*``, read at scrape time."""

    def __init__(self, statistics: Callable[[], SharingStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        s = self._statistics()
        lookups = CounterMetricFamily(
            "dspy_trio_cache_requests", "LM calls by what the response cache did.", labels=["result"]
        )
        lookups.add_metric(["hit"], s.cache_hits)
        lookups.add_metric(["miss"], s.cache_misses)
        lookups.add_metric(["bypass"], s.cache_bypasses)
        yield lookups
        yield CounterMetricFamily(
            "dspy_trio_coalesced_waiters",
            "LM calls answered by an identical call in flight (single-flight), here or in another process.",
            value=s.coalesced,
        )
        yield CounterMetricFamily(
            "dspy_trio_upstream_calls_saved",
            "LM calls answered without an upstream call of their own (cache hits and coalesced).",
            value=s.upstream_calls_saved,
        )
        yield CounterMetricFamily(
            "dspy_trio_tokens_saved",
            "Tokens of the answers given without an upstream call.",
            value=s.tokens_saved,
        )
        yield GaugeMetricFamily(
            "dspy_trio_shared_calls_in_flight", "Shared upstream calls in flight now.", value=s.in_flight
        )
        yield GaugeMetricFamily(
            "dspy_trio_cache_entries", "Answers in the memory cache.", value=s.cache_entries
        )
        yield GaugeMetricFamily(
            "dspy_trio_cache_bytes", "Bytes of answers in the memory cache.", value=s.cache_bytes
        )
        yield CounterMetricFamily(
            "dspy_trio_cache_evictions", "Answers the memory cache dropped for room.", value=s.cache_evictions
        )
        yield CounterMetricFamily(
            "dspy_trio_cache_corrupt_entries",
            "Stored answers that did not decode (misses; deleted).",
            value=s.corrupt_entries,
        )
        yield CounterMetricFamily(
            "dspy_trio_shared_call_takeovers",
            "Calls taken over after another process's lease expired.",
            value=s.takeovers,
        )
        yield CounterMetricFamily(
            "dspy_trio_shared_call_redis_fallbacks",
            "Shared calls made without Redis because it failed or was down.",
            value=s.redis_fallbacks,
        )
