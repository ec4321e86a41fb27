"""Several worker processes on one port: supervision, and ``/metrics`` for the whole instance.

The parent (``dspy-trio serve --workers N``) starts N workers (``SO_REUSEPORT``: the kernel spreads
connections), restarts one that dies while the others keep serving, and on SIGTERM/SIGINT tells every
worker to drain and waits for all of them.

Each worker writes a snapshot of its metrics (Prometheus text and the JSON fields) into a directory of the
instance every second and just before it answers ``/metrics``; whichever worker a scrape reaches merges
the snapshots of the live workers, so a scrape sees the instance, not one worker.

The instance's counters never go backwards: when a worker dies, the supervisor folds the counters and
histograms of its last snapshot into the instance's ``retired.json`` (its gauges leave with it), and a
scrape adds them to the live workers' (a dead worker's snapshot that is not folded yet counts the same
way). A scraper's ``rate()`` sees no reset; the increments of the dead worker's last second are lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from dspy_trio.engine import Engine

from .metrics import metrics_json, metrics_text

logger = logging.getLogger("dspy_trio.web")

WORKERS_DIR = "DSPY_TRIO_WORKERS_DIR"  # set by the parent for its workers
SNAPSHOT_INTERVAL = 1.0
_OPENING_POLL = 0.05  # seconds between looks for the engine while a worker starts
# Shared by every worker (the same Redis view), or a state (a breaker's): the instance shows the
# largest value (the worst state), not a sum.
_NOT_SUMMED = {"dspy_trio_cluster_processes", "dspy_trio_breaker_state"}
_RESTART_DELAY = 0.5  # seconds between a worker's death and its replacement (no tight crash loop)
RETIRED = "retired.json"  # what the dead workers of the instance counted
_CUMULATIVE = {"counter", "histogram", "summary"}  # Prometheus families a dead worker's count stays in
# JSON fields that are a worker's state now, not a count: they leave with it.
_JSON_GAUGES = {"active_requests", "queued", "in_flight"}
_JSON_SETTINGS = {"weight"}  # a tenant's: the same in every worker, not a count
_RETIRED_PIDS = 256  # folded pids remembered (a scrape may still hold the file of one just folded)


# --- the parent --------------------------------------------------------------------------------------


def supervise(argv: Sequence[str], workers: int) -> int:
    """Run ``workers`` serving processes until SIGTERM/SIGINT; restart any that dies before that.

    Blocks until every worker has drained and exited. Returns the highest exit code of the last workers.
    """
    directory = tempfile.mkdtemp(prefix="dspy-trio-workers-")
    command = [sys.executable, "-m", "dspy_trio.web.cli", *argv, "--worker-of", str(workers)]
    env = {**os.environ, WORKERS_DIR: directory}
    stopping = False

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env)

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children = [start() for _ in range(workers)]
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while not stopping:
            for index, child in enumerate(children):
                code = child.poll()
                if code is not None and not stopping:
                    logger.error("worker %d exited with %s: starting another", child.pid, code)
                    retire(Path(directory), child.pid)
                    time.sleep(_RESTART_DELAY)
                    if not stopping:
                        children[index] = start()
            time.sleep(0.1)
        return max(child.wait() for child in children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(directory, ignore_errors=True)


@attrs.frozen
class Retired:
    """What the dead workers of an instance counted: Prometheus text (counters and histograms only) and
    the JSON counts (with ``ended`` and ``duration_ms_total`` for the averages), and their pids."""

    pids: tuple[int, ...] = ()
    prometheus: str = ""
    json: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def read(cls, directory: Path) -> Retired:
        try:
            data = json.loads((directory / RETIRED).read_text())
            return cls(tuple(int(p) for p in data["pids"]), str(data["prometheus"]), dict(data["json"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def plus(self, snapshot: Mapping[str, Any]) -> Retired:
        """These counts and a dead worker's last snapshot."""
        pid = int(snapshot.get("pid", 0))
        text = merge_prometheus([self.prometheus, cumulative_prometheus(str(snapshot.get("prometheus", "")))])
        return Retired(
            (*self.pids, pid)[-_RETIRED_PIDS:], text.decode(), _sum_counts(self.json, _json_counts(snapshot))
        )


def retire(directory: Path, pid: int) -> None:
    """Fold the last snapshot of the dead worker ``pid`` into the instance's retired counts (written
    before the snapshot is removed, so that a scrape in between counts it once). Idempotent."""
    path = directory / f"{pid}.json"
    retired = Retired.read(directory)
    try:
        snapshot = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if pid not in retired.pids:
        folded = retired.plus(snapshot)
        partial = directory / f".{RETIRED}.tmp"
        partial.write_text(
            json.dumps({"pids": folded.pids, "prometheus": folded.prometheus, "json": folded.json})
        )
        partial.replace(directory / RETIRED)
    with contextlib.suppress(OSError):
        path.unlink()


def cumulative_prometheus(text: str) -> str:
    """Only the counters, histograms and summaries of an exposition text (what a dead worker counted)."""
    if not text:
        return ""
    families = [f for f in text_string_to_metric_families(text) if f.type in _CUMULATIVE]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def _json_counts(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A worker's JSON fields as counts: no gauges, and the averages as totals."""
    fields = dict(snapshot.get("json", {}))
    ended = int(fields.get("total_requests", 0)) - int(fields.get("active_requests", 0))
    counts = {
        k: v for k, v in fields.items() if k not in _JSON_GAUGES | {"average_duration_ms", "error_rate"}
    }
    if "tenants" in counts:  # a tenant's requests in flight and queued leave with the worker too
        counts["tenants"] = {
            name: {k: v for k, v in tenant.items() if k not in _JSON_GAUGES}
            for name, tenant in counts["tenants"].items()
        }
    counts["ended"] = ended
    counts["duration_ms_total"] = float(fields.get("average_duration_ms", 0.0)) * ended
    return counts


def _sum_counts(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` and ``b`` summed field by field, nested tables too (a tenant's counts); a setting that every
    worker has alike (a tenant's ``weight``) is kept, not summed."""
    merged = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping):
            merged[key] = _sum_counts(merged.get(key, {}), value)
        elif key in _JSON_SETTINGS:
            merged.setdefault(key, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = merged.get(key, 0) + value
        else:
            merged.setdefault(key, value)
    return merged


# --- each worker -------------------------------------------------------------------------------------


def workers_dir() -> Path | None:
    """The instance's snapshot directory when this process is one of several workers."""
    value = os.environ.get(WORKERS_DIR)
    return Path(value) if value else None


def write_snapshot(directory: Path, engine: Engine) -> None:
    """Write this worker's metrics for the others to merge (atomic: write, then rename)."""
    text, _ = metrics_text(engine)
    payload = {"pid": os.getpid(), "prometheus": text.decode(), "json": metrics_json(engine.statistics())}
    final = directory / f"{os.getpid()}.json"
    partial = directory / f".{os.getpid()}.tmp"
    partial.write_text(json.dumps(payload))
    partial.replace(final)


async def run_snapshots(directory: Path, engine: Callable[[], Engine | None]) -> None:
    """Write a snapshot every ``SNAPSHOT_INTERVAL`` seconds until cancelled, the first as soon as the
    engine is open (a new worker counts in the instance from its start)."""
    while True:
        if (current := engine()) is None:
            await trio.sleep(_OPENING_POLL)
            continue
        with contextlib.suppress(OSError):
            write_snapshot(directory, current)
        await trio.sleep(SNAPSHOT_INTERVAL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: Path) -> tuple[list[str], list[dict[str, Any]], Retired]:
    """The instance's metrics: the Prometheus texts and JSON fields of the live workers, and what the
    dead ones counted (folded, or still in a snapshot the supervisor has not folded yet)."""
    texts: list[str] = []
    fields: list[dict[str, Any]] = []
    snapshots = []
    for path in sorted(directory.glob("*.json")):  # before retired.json: see retire()
        if path.name == RETIRED:
            continue
        try:
            snapshots.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    retired = Retired.read(directory)
    folded = set(retired.pids)
    for snapshot in snapshots:
        pid = int(snapshot.get("pid", 0))
        if pid in folded:
            continue
        if _alive(pid):
            texts.append(str(snapshot.get("prometheus", "")))
            fields.append(dict(snapshot.get("json", {})))
        else:
            retired = retired.plus(snapshot)
    return texts, fields, retired


def instance_metrics_text(directory: Path, engine: Engine) -> tuple[bytes, str]:
    """Prometheus text for every worker of the instance: samples with equal names and labels summed,
    dead workers' counters included."""
    write_snapshot(directory, engine)
    texts, _, retired = read_snapshots(directory)
    return merge_prometheus(texts, retired=retired.prometheus), CONTENT_TYPE_LATEST


def instance_metrics_json(directory: Path, engine: Engine) -> dict[str, Any]:
    """The JSON metrics for every worker of the instance (counts summed, averages re-weighted, dead
    workers' counts included)."""
    write_snapshot(directory, engine)
    _, fields, retired = read_snapshots(directory)
    return merge_json(fields, retired=retired.json)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_prometheus(texts: Sequence[str], *, retired: str = "") -> bytes:
    """Sum the samples of several exposition texts (``_created`` timestamps: the earliest), and the
    counters of the dead workers (``retired``)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in [*texts, retired] if retired else texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.name in _NOT_SUMMED:
                    merged[key] = max(merged.get(key, -math.inf), sample.value)
                elif sample.name.endswith("_created"):
                    merged[key] = min(merged.get(key, math.inf), sample.value)
                else:
                    merged[key] = merged.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def merge_json(
    snapshots: Sequence[Mapping[str, Any]], *, retired: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Sum the JSON metrics of several workers and the counts of the dead ones (``retired``); average
    duration and error rate over all of them. ``workers`` counts the live ones."""
    merged: dict[str, Any] = {}
    ended_total = 0
    duration_total = 0.0
    if retired:
        counts = dict(retired)
        ended_total = int(counts.pop("ended", 0))
        duration_total = float(counts.pop("duration_ms_total", 0.0))
        merged = _sum_counts(merged, counts)
    for snapshot in snapshots:
        ended = int(snapshot.get("total_requests", 0)) - int(snapshot.get("active_requests", 0))
        ended_total += ended
        duration_total += float(snapshot.get("average_duration_ms", 0.0)) * ended
        merged = _sum_counts(
            merged, {k: v for k, v in snapshot.items() if k not in {"average_duration_ms", "error_rate"}}
        )
    merged["average_duration_ms"] = round(duration_total / ended_total, 3) if ended_total else 0.0
    errors = int(merged.get("total_errors", 0))
    merged["error_rate"] = round(errors / ended_total, 6) if ended_total else 0.0
    merged["workers"] = len(snapshots)
    return merged
