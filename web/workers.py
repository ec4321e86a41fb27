"""Several worker processes on one port: supervision, and ``/metrics`` for the whole instance.

The parent (``dspy-trio serve --workers N``) starts N workers (``SO_REUSEPORT``: the kernel spreads
connections), restarts one that dies while the others keep serving, and on SIGTERM/SIGINT tells every
worker to drain and waits for all of them.

Each worker writes a snapshot of its metrics (Prometheus text and the JSON fields) into a directory of the
instance every second and just before it answers ``/metrics``; whichever worker a scrape reaches merges
the snapshots of the live workers, so a scrape sees the instance, not one worker. Counters of a worker
that died leave the sum with it (a scraper sees a counter reset, as after a restart).
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

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine

from .metrics import metrics_json, metrics_text

logger = logging.getLogger("web")

WORKERS_DIR = "DSPY_TRIO_WORKERS_DIR"  # set by the parent for its workers
SNAPSHOT_INTERVAL = 1.0
# Shared by every worker (the same Redis view), so the instance shows one value, not a sum.
_NOT_SUMMED = {"dspy_trio_cluster_processes"}
_RESTART_DELAY = 0.5  # seconds between a worker's death and its replacement (no tight crash loop)


# --- the parent --------------------------------------------------------------------------------------


def supervise(argv: Sequence[str], workers: int) -> int:
    """Run ``workers`` serving processes until SIGTERM/SIGINT; restart any that dies before that.

    Blocks until every worker has drained and exited. Returns the highest exit code of the last workers.
    """
    directory = tempfile.mkdtemp(prefix="dspy-trio-workers-")
    command = [sys.executable, "-m", "web.cli", *argv, "--worker-of", str(workers)]
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
                    _forget(directory, child.pid)
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


def _forget(directory: str, pid: int) -> None:
    with contextlib.suppress(OSError):
        (Path(directory) / f"{pid}.json").unlink()


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
    """Write a snapshot every ``SNAPSHOT_INTERVAL`` seconds (once the engine is open) until cancelled."""
    while True:
        if (current := engine()) is not None:
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


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """The latest snapshot of every live worker of the instance."""
    snapshots = []
    for path in sorted(directory.glob("*.json")):
        try:
            snapshot = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(snapshot.get("pid", 0))):
            snapshots.append(snapshot)
    return snapshots


def instance_metrics_text(directory: Path, engine: Engine) -> tuple[bytes, str]:
    """Prometheus text for every worker of the instance: samples with equal names and labels summed."""
    write_snapshot(directory, engine)
    return merge_prometheus([s["prometheus"] for s in read_snapshots(directory)]), CONTENT_TYPE_LATEST


def instance_metrics_json(directory: Path, engine: Engine) -> dict[str, Any]:
    """The JSON metrics for every worker of the instance (counts summed, averages re-weighted)."""
    write_snapshot(directory, engine)
    return merge_json([s["json"] for s in read_snapshots(directory)])


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_prometheus(texts: Sequence[str]) -> bytes:
    """Sum the samples of several exposition texts (``_created`` timestamps: the earliest)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
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


def merge_json(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the JSON metrics of several workers; average duration and error rate over all of them."""
    merged: dict[str, Any] = {}
    ended_total = 0
    duration_total = 0.0
    for snapshot in snapshots:
        ended = int(snapshot.get("total_requests", 0)) - int(snapshot.get("active_requests", 0))
        ended_total += ended
        duration_total += float(snapshot.get("average_duration_ms", 0.0)) * ended
        for key, value in snapshot.items():
            if key in {"average_duration_ms", "error_rate"}:
                continue
            if isinstance(value, Mapping):
                inner = merged.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = inner.get(k, 0) + v
            elif isinstance(value, int | float) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    merged["average_duration_ms"] = round(duration_total / ended_total, 3) if ended_total else 0.0
    errors = int(merged.get("total_errors", 0))
    merged["error_rate"] = round(errors / ended_total, 6) if ended_total else 0.0
    merged["workers"] = len(snapshots)
    return merged
