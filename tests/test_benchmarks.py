"""The benchmarks as a user runs them without the bench extra (matplotlib, FastAPI, uvicorn): a benchmark
that only plots with it runs to its end and says how to get the plot; one that needs it says so at once."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent

# benchmarks.throughput's main() with its results written to the directory given (not benchmarks/results/).
THROUGHPUT = """
import sys
from pathlib import Path
import benchmarks.throughput as throughput
throughput.RESULTS = Path(sys.argv[1])
sys.argv = ["throughput", "--concurrency", "2", "--latency", "0.01"]
throughput.main()
"""


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, *args], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
    )


async def test_throughput_runs_to_its_end_with_or_without_matplotlib(tmp_path: Path) -> None:
    done = await run("-c", THROUGHPUT, str(tmp_path))
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert {row["mode"] for row in json.loads((tmp_path / "throughput.json").read_text())["rows"]} == {
        "dspy-trio",
        "asyncio-acall",
        "parallel-8",
        "parallel-tuned",
    }
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plot (throughput.png): matplotlib is not installed; for plots: " in out
        assert "pip install -e '.[bench]'" in out
    else:
        assert (tmp_path / "throughput.png").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("fastapi") is not None, reason="the bench extra is installed: nothing to refuse"
)
async def test_serving_without_its_peers_says_what_to_install_at_once() -> None:
    done = await run("-m", "benchmarks.serving", "--part", "predict")
    assert done.returncode == 2
    assert done.stdout == b""
    # uvicorn may be there without the bench extra (the MCP SDK depends on it): only fastapi is missing
    missing = ", ".join(name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None)
    assert done.stderr.decode().splitlines() == [
        f"{missing} not installed (the peers this benchmark compares dspy-trio with): "
        ".venv/bin/pip install -e '.[bench]' (or make bench)"
    ]


async def test_a_baseline_tree_runs_its_own_engine() -> None:
    """``--baseline REF`` measures REF's engine: the exported tree's workers import ``dspy_trio.engine`` from
    that tree, not the installed one. (A tree whose engine lives in ``engine/`` has no ``dspy_trio``
    folder: its workers silently ran the installed engine, and "before" equalled "after".)"""
    from benchmarks._baseline import export_tree

    tree, commit = await trio.to_thread.run_sync(export_tree, "HEAD")
    try:
        assert commit
        done = await trio.run_process(
            [sys.executable, "-c", "import dspy_trio.engine as e; print(e.__file__)"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_stdout=True,
        )
        assert done.stdout.decode().strip().startswith(str(tree))
    finally:
        shutil.rmtree(tree)


def _before_the_provider_settings() -> str | None:
    """A commit whose ``LMConfig`` still took the provider's keys (``provider=``, ``api_base=``): the
    parent of the one that added ``engine/_lm_config.py`` (None in a shallow clone without it)."""
    added = subprocess.run(
        ["git", "rev-list", "-1", "HEAD", "--", "engine/_lm_config.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not added:
        return None
    parent = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{added}^"], cwd=ROOT, capture_output=True, text=True
    )
    return parent.stdout.strip() or None


async def test_a_baseline_from_before_the_provider_settings_runs_this_trees_workers() -> None:
    """A baseline's workers are this tree's code on the other tree's engine, so they configure the engine
    in the form both take (``LMConfig.from_mapping``'s flat table). A worker that built
    ``LMConfig(settings=SimulatedSettings(...))`` crashed on every baseline from before the settings types
    (ImportError), and ``hotpath``'s workers reach ``benchmarks._measure``, which such a tree lacks unless
    the export brings this tree's benchmarks."""
    from benchmarks._baseline import export_tree
    from benchmarks._measure import run_worker

    ref = _before_the_provider_settings()
    if ref is None:
        pytest.skip("no commit from before the provider settings in this clone")
    tree, _ = await trio.to_thread.run_sync(export_tree, ref)
    try:
        result = await trio.to_thread.run_sync(
            lambda: run_worker(
                "benchmarks.hotpath_stream",
                ["--worker", "throughput:simulated", "--url", "unused", "--tokens", "50"],
                tree=tree,
            )
        )
        assert result["tokens"] > 0
        assert result["engine"].startswith(str(tree))
    finally:
        shutil.rmtree(tree)


async def test_the_coalescing_benchmark_runs_a_part_to_its_end() -> None:
    done = await run("-m", "benchmarks.coalescing", "--parts", "close", "--rounds", "1")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "last waiter leaves -> upstream connection closed: p50" in done.stdout.decode()


async def test_the_tenants_benchmark_runs_to_its_end_and_prints_each_figure() -> None:
    """A short run of the parts whose summaries are the most involved (no baseline: no git tree to export
    here): each figure is printed with its goal."""
    arguments = ["--baseline", "none", "--parts", "deadline", "startup", "--seconds", "1", "--count", "200"]
    done = await run("-m", "benchmarks.tenants", *arguments)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    for figure in ("overload now", "refusal p99 < 10 ms", "200 tenants: start-up", "goal < 20 MB"):
        assert figure in out, out
