"""Prometheus metrics of this process's place in the cluster, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ._cluster import ClusterStatistics


class ClusterCollector:
    """``dspy_trio_cluster_*``: degraded (1 while Redis is unreachable and limits are local), the
    processes sharing the quota, and Redis round-trips, failures and dropped background writes."""

    def __init__(self, statistics: Callable[[], ClusterStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        s = self._statistics()
        yield GaugeMetricFamily(
            "dspy_trio_cluster_degraded",
            "1 while Redis is unreachable and this process uses local limits (its share of the quota).",
            value=float(s.degraded),
        )
        yield GaugeMetricFamily(
            "dspy_trio_cluster_processes",
            "Processes (workers of all replicas) sharing the upstream quotas, at the last heartbeat.",
            value=s.processes,
        )
        yield CounterMetricFamily("dspy_trio_cluster_redis_calls", "Redis round-trips.", value=s.round_trips)
        yield CounterMetricFamily(
            "dspy_trio_cluster_redis_failures", "Redis calls that failed or timed out.", value=s.failures
        )
        yield CounterMetricFamily(
            "dspy_trio_cluster_writes_dropped",
            "Background writes (registrations, cool-down broadcasts) dropped.",
            value=s.writes_dropped,
        )
