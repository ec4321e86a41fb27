"""Merging the metrics of an instance's workers (web/workers.py): what a scrape of any worker shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dspy_trio.web.workers import _json_counts, merge_json, merge_prometheus, read_snapshots, retire


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


def test_json_tenants_of_every_worker_are_merged_by_name() -> None:
    """Per tenant, the workers' counts are summed (requests by outcome, tokens, cost, in flight and
    queued), its weight is its weight (a setting, not a count); a dead worker's gauges leave with it."""

    def worker(succeeded: int, in_flight: int, cost: float) -> dict[str, Any]:
        tenant = {
            "weight": 3,
            "in_flight": in_flight,
            "queued": 1,
            "requests": {"succeeded": succeeded},
            "prompt_tokens": 10 * succeeded,
            "completion_tokens": 5 * succeeded,
            "cost_usd": cost,
        }
        return {"total_requests": succeeded, "active_requests": 0, "tenants": {"acme": tenant}}

    merged = merge_json(
        [worker(2, 1, 0.5), worker(3, 0, 0.25)], retired=_json_counts({"json": worker(4, 7, 1.0)})
    )
    assert merged["tenants"]["acme"] == {
        "weight": 3,
        "in_flight": 1,
        "queued": 2,
        "requests": {"succeeded": 9},
        "prompt_tokens": 90,
        "completion_tokens": 45,
        "cost_usd": 1.75,
    }


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_worker(directory: Path, pid: int, requests: int, in_flight: int) -> None:
    registry = CollectorRegistry()
    Counter("dspy_trio_requests", "Requests.", ["outcome"], registry=registry).labels("succeeded").inc(
        requests
    )
    Gauge("dspy_trio_in_flight", "In flight.", registry=registry).set(in_flight)
    json_fields = {
        "total_requests": requests + in_flight,
        "active_requests": in_flight,
        "succeeded": requests,
        "in_flight": in_flight,
        "average_duration_ms": 10.0,
        "error_rate": 0.0,
        "errors_by_code": {"x": 1},
    }
    payload = {"pid": pid, "prometheus": generate_latest(registry).decode(), "json": json_fields}
    (directory / f"{pid}.json").write_text(json.dumps(payload))


def instance(directory: Path) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, Any]]:
    texts, json_fields, retired = read_snapshots(directory)
    return samples(merge_prometheus(texts, retired=retired.prometheus)), merge_json(
        json_fields, retired=retired.json
    )


SUCCEEDED = ("dspy_trio_requests_total", (("outcome", "succeeded"),))


def test_a_dead_workers_counts_stay_in_the_instance_sum(tmp_path: Path) -> None:
    """Counters of the instance never go backwards when a worker dies and another replaces it (a
    scrape saw 195, then 65: Prometheus ``rate()`` reads that as a reset). Its gauges leave with it."""
    dead = dead_pid()
    write_worker(tmp_path, os.getpid(), 65, in_flight=2)
    write_worker(tmp_path, dead, 130, in_flight=3)  # died; its supervisor has not noticed yet
    text, fields = instance(tmp_path)
    assert text[SUCCEEDED] == 195
    assert text[("dspy_trio_in_flight", ())] == 2
    assert (fields["succeeded"], fields["in_flight"], fields["workers"]) == (195, 2, 1)

    retire(tmp_path, dead)  # the supervisor noticed: folded into the instance's retired counts
    assert not (tmp_path / f"{dead}.json").exists()
    retire(tmp_path, dead)  # twice is once
    text, fields = instance(tmp_path)
    assert text[SUCCEEDED] == 195
    assert (fields["succeeded"], fields["total_requests"], fields["errors_by_code"]) == (195, 200, {"x": 2})

    write_worker(tmp_path, os.getppid(), 5, in_flight=0)  # the replacement, counting from 0
    text, fields = instance(tmp_path)
    assert text[SUCCEEDED] == 200
    assert (fields["succeeded"], fields["workers"]) == (200, 2)
    assert fields["average_duration_ms"] == 10.0


def test_a_breaker_state_is_the_worst_of_the_workers_not_their_sum() -> None:
    """Two workers with the breaker open (2) and one half-open (1): the instance shows open (2), not 5."""
    texts = []
    for state in (2, 2, 1):
        registry = CollectorRegistry()
        Gauge("dspy_trio_breaker_state", "State.", ["lm"], registry=registry).labels("primary").set(state)
        texts.append(generate_latest(registry).decode())
    merged = samples(merge_prometheus(texts))
    assert merged[("dspy_trio_breaker_state", (("lm", "primary"),))] == 2
