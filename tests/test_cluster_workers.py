"""Merging the metrics of an instance's workers (web/workers.py): what a scrape of any worker shows."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from web.workers import merge_json, merge_prometheus


def worker_text(requests: int, seconds: list[float], processes: int) -> str:
    registry = CollectorRegistry()
    counter = Counter("dspy_trio_requests", "Requests.", ["outcome"], registry=registry)
    counter.labels("succeeded").inc(requests)
    histogram = Histogram("dspy_trio_total_seconds", "Total.", buckets=(0.1, 1.0), registry=registry)
    for value in seconds:
        histogram.observe(value)
    Gauge("dspy_trio_cluster_processes", "Processes.", registry=registry).set(processes)
    return generate_latest(registry).decode()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_and_histograms_are_summed_and_the_shared_process_count_is_not() -> None:
    merged = samples(merge_prometheus([worker_text(3, [0.05, 2.0], 4), worker_text(5, [0.5], 4)]))
    assert merged[("dspy_trio_requests_total", (("outcome", "succeeded"),))] == 8
    assert merged[("dspy_trio_total_seconds_bucket", (("le", "0.1"),))] == 1
    assert merged[("dspy_trio_total_seconds_bucket", (("le", "1.0"),))] == 2
    assert merged[("dspy_trio_total_seconds_bucket", (("le", "+Inf"),))] == 3
    assert merged[("dspy_trio_total_seconds_count", ())] == 3
    assert merged[("dspy_trio_cluster_processes", ())] == 4  # every worker sees the same 4


def test_json_counts_are_summed_and_averages_weighted_by_ended_requests() -> None:
    a = {
        "total_requests": 10,
        "active_requests": 0,
        "total_errors": 1,
        "average_duration_ms": 100.0,
        "error_rate": 0.1,
        "errors_by_code": {"x": 1},
    }
    b = {
        "total_requests": 31,
        "active_requests": 1,
        "total_errors": 0,
        "average_duration_ms": 200.0,
        "error_rate": 0.0,
        "errors_by_code": {"x": 2, "y": 1},
    }
    merged = merge_json([a, b])
    assert merged["total_requests"] == 41
    assert merged["active_requests"] == 1
    assert merged["average_duration_ms"] == round((100 * 10 + 200 * 30) / 40, 3)
    assert merged["error_rate"] == round(1 / 40, 6)
    assert merged["errors_by_code"] == {"x": 3, "y": 1}
    assert merged["workers"] == 2
