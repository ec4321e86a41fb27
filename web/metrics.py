"""``/metrics``: the engine's statistics as Prometheus text (prometheus-client), and the seed's JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import EngineStatistics

_OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled", "rejected", "invalid")


class _StatisticsCollector(Collector):
    def __init__(self, stats: EngineStatistics) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats
        requests = CounterMetricFamily("dspy_trio_requests", "Requests by outcome.", labels=["outcome"])
        for outcome in _OUTCOMES:
            requests.add_metric([outcome], getattr(s, outcome))
        yield requests
        errors = CounterMetricFamily(
            "dspy_trio_errors", "Requests that ended in an error, by code.", labels=["code"]
        )
        for code, count in sorted(s.errors_by_code.items()):
            errors.add_metric([code], count)
        yield errors
        yield GaugeMetricFamily("dspy_trio_in_flight", "Requests holding a slot.", value=s.in_flight)
        yield GaugeMetricFamily("dspy_trio_queued", "Requests waiting for a slot.", value=s.queued)
        yield GaugeMetricFamily("dspy_trio_max_in_flight", "The in-flight limit.", value=s.max_in_flight)
        yield GaugeMetricFamily("dspy_trio_max_queued", "The queue bound.", value=s.max_queued)
        yield CounterMetricFamily(
            "dspy_trio_request_seconds", "Summed duration of ended requests.", value=s.seconds_total
        )
        drops = CounterMetricFamily(
            "dspy_trio_stream_deltas", "Stream deltas dropped or coalesced.", labels=["fate"]
        )
        drops.add_metric(["dropped"], s.stream_deltas_dropped)
        drops.add_metric(["coalesced"], s.stream_deltas_coalesced)
        yield drops


def metrics_text(stats: EngineStatistics) -> tuple[bytes, str]:
    """The Prometheus exposition of ``stats`` and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatisticsCollector(stats))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_json(stats: EngineStatistics) -> dict[str, Any]:
    """The seed's fields, plus the engine's own counters."""
    errors = stats.failed + stats.timed_out
    ended = stats.ended
    return {
        "total_requests": stats.requests_total,
        "active_requests": stats.in_flight + stats.queued,
        "total_errors": errors,
        "total_timeouts": stats.timed_out,
        "average_duration_ms": round(stats.seconds_total / ended * 1000, 3) if ended else 0.0,
        "error_rate": round(errors / ended, 6) if ended else 0.0,
        "succeeded": stats.succeeded,
        "cancelled": stats.cancelled,
        "rejected": stats.rejected,
        "invalid": stats.invalid,
        "queued": stats.queued,
        "in_flight": stats.in_flight,
        "errors_by_code": dict(stats.errors_by_code),
    }
