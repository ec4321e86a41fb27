"""Measurements in fresh worker processes: the one way the benchmarks start a worker and read its result,
another process's CPU, and the medians, percentiles and verdicts of the results.

A benchmark is one script: run plainly, it orchestrates; run with ``--worker ...`` (or another flag of its
own), it measures once and prints its result as one JSON object on its last line of output. Each worker
is a fresh interpreter, so that imports, caches, peak RSS and threads are its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class WorkerFailed(SystemExit):
    """A worker exited with an error. Uncaught, it ends the benchmark with its message (the end of the
    worker's stderr); ``stderr`` holds all of it."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def run_worker(
    module: str, arguments: Sequence[str], *, tree: Path = ROOT, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``python -m MODULE ARGUMENTS`` in a fresh interpreter and return the JSON object it printed on
    its last line. Blocks until the worker exits.

    Args:
        tree: The source tree the worker runs in and imports from (``PYTHONPATH``): this one, or a
            baseline from :func:`benchmarks._baseline.export_tree` (its engine, this tree's benchmarks).
        timeout: Seconds before the worker is killed (``subprocess.TimeoutExpired``).

    Raises:
        WorkerFailed: the worker exited with an error.
    """
    command = [sys.executable, "-m", module, *arguments]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(tree)}
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env=env, cwd=tree, timeout=timeout
    )
    if done.returncode != 0:
        raise WorkerFailed(f"{module} {' '.join(arguments[:2])} failed:\n{done.stderr[-3000:]}", done.stderr)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(runs: Sequence[dict[str, Any]], key: str) -> float:
    """The median of ``key`` over ``runs``."""
    return float(statistics.median(run[key] for run in runs))


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (0 to 1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def verdict(ok: bool) -> str:
    """How a result beside its goal reads: ``met`` or ``MISSED``."""
    return "met" if ok else "MISSED"


def rss_mb(pid: int | str = "self") -> float:
    """The resident set size of process ``pid`` (this one by default) in MiB (Linux ``/proc``; NaN
    elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def ratio_spread(ratios: Sequence[float]) -> dict[str, float]:
    """The median of paired ``ratios`` and their spread: quartiles (p25, p75), extremes and count."""
    ordered = sorted(ratios)
    return {
        "median": float(statistics.median(ordered)),
        "p25": percentile(ordered, 0.25),
        "p75": percentile(ordered, 0.75),
        "low": ordered[0],
        "high": ordered[-1],
        "pairs": len(ordered),
    }


def abba_ratios(b: Sequence[float], a: Sequence[float]) -> list[float]:
    """Ratios of ``b`` to ``a`` measured in alternated pairs (a then b, then b then a, ...), one per two
    pairs (ABBA): summing each side over a pair of pairs cancels what the position in a pair costs (the
    second block of a pair runs after the first, with its garbage) and a load that drifts linearly."""
    return [(b[i] + b[i + 1]) / (a[i] + a[i + 1]) for i in range(0, min(len(a), len(b)) - 1, 2)]
