"""Workload 1: in-process throughput at several concurrencies, dspy-trio against the usual ways of
running DSPy concurrently, in one run.

Modes (each run in a fresh worker process, modes alternated, against the fake upstream in its own process):
  dspy-trio        engine.predict x C on Trio, Trio-native HTTP backend (one OS thread)
  asyncio-acall    asyncio.gather of program.acall x C with the stock dspy.LM
  parallel-8       dspy.Parallel at its default 8 threads
  parallel-tuned   dspy.Parallel with C threads

::

    python -m benchmarks.throughput                       # C = 8, 64, 256, 1000; 200 ms upstream
    python -m benchmarks.throughput --concurrency 8 64 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._measure import run_worker
from benchmarks._optional import plot_if_possible
from benchmarks._upstream import start_upstream

MODES = ("dspy-trio", "asyncio-acall", "parallel-8", "parallel-tuned")
RESULTS = Path(__file__).parent / "results"


def requests_for(mode: str, concurrency: int) -> int:
    """Requests per run: two waves at the concurrency, fewer for the 8-thread default (it is slow)."""
    n = max(2 * concurrency, 32)
    return min(n, 160) if mode == "parallel-8" else n


def _worker(mode: str, url: str, concurrency: int) -> dict[str, Any]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    n = requests_for(mode, concurrency)
    peak_threads = threading.active_count()

    def watch_threads(stop: threading.Event) -> None:
        nonlocal peak_threads
        while not stop.wait(0.01):
            peak_threads = max(peak_threads, threading.active_count())

    stop = threading.Event()
    watcher = threading.Thread(target=watch_threads, args=(stop,), daemon=True)
    questions = [f"question number {i}" for i in range(n)]

    if mode == "dspy-trio":
        import trio

        from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings, RetryPolicy, open_engine

        config = EngineConfig(
            lms={
                "default": LMConfig(
                    model="bench", retry=RetryPolicy(max_attempts=1), settings=OpenAISettings(api_base=url)
                )
            },
            max_in_flight=concurrency,
            max_queued=n,
        )

        async def run() -> tuple[float, float]:
            async with open_engine(config) as engine:
                await engine.predict("default", {"question": "warm-up"})
                cpu_started, started = time.process_time(), time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for q in questions:
                        nursery.start_soon(engine.predict, "default", {"question": q})
                return time.perf_counter() - started, cpu_started

        watcher.start()
        wall, cpu0 = trio.run(run)
    else:
        import dspy

        lm = dspy.LM("openai/bench", api_base=url, api_key="sk-bench", cache=False, num_retries=0)
        dspy.configure(lm=lm, max_trace_size=0, disable_history=True)
        program = dspy.Predict("question -> answer")
        program(question="warm-up")
        watcher.start()
        cpu0 = time.process_time()
        started = time.perf_counter()
        if mode == "asyncio-acall":
            import asyncio

            async def run_all() -> None:
                limit = asyncio.Semaphore(concurrency)

                async def one(q: str) -> None:
                    async with limit:
                        await program.acall(question=q)

                await asyncio.gather(*(one(q) for q in questions))

            asyncio.run(run_all())
        else:
            threads = 8 if mode == "parallel-8" else concurrency
            examples = [(program, dspy.Example(question=q).with_inputs("question")) for q in questions]
            dspy.Parallel(num_threads=threads, disable_progress_bar=True)(examples)
        wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    stop.set()
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": n,
        "wall": wall,
        "throughput": n / wall,
        "cpu_ms_per_prediction": cpu / n * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_threads": peak_threads,
    }


def plot(rows: list[dict[str, Any]], path: Path, latency: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    levels = sorted({row["concurrency"] for row in rows})
    for mode in MODES:
        points = [
            next(r["throughput"] for r in rows if r["mode"] == mode and r["concurrency"] == c) for c in levels
        ]
        axes.plot(levels, points, marker="o", label=mode)
    axes.plot(levels, [c / latency for c in levels], linestyle=":", color="grey", label="ideal (C / latency)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("concurrency")
    axes.set_ylabel("predictions / s")
    axes.set_title(f"In-process throughput, {latency * 1000:.0f} ms upstream")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64, 256, 1000])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.url, args.concurrency[0])))
        return

    from tqdm import tqdm

    upstream, url = start_upstream(args.latency)
    runs: list[dict[str, Any]] = []
    try:
        # Modes interleave at every level, in reverse order every other round.
        plan = [
            (c, m)
            for r in range(args.rounds)
            for c in args.concurrency
            for m in (MODES if r % 2 == 0 else MODES[::-1])
        ]
        for concurrency, mode in tqdm(plan, desc="throughput", unit="run"):
            arguments = ["--worker", mode, "--url", url, "--concurrency", str(concurrency)]
            runs.append(run_worker("benchmarks.throughput", arguments))
    finally:
        upstream.kill()

    rows = []
    for concurrency in args.concurrency:
        for mode in MODES:
            mine = [r for r in runs if r["mode"] == mode and r["concurrency"] == concurrency]
            rows.append(
                {
                    "mode": mode,
                    "concurrency": concurrency,
                    **{
                        k: statistics.median(r[k] for r in mine)
                        for k in ("throughput", "cpu_ms_per_prediction", "peak_rss_mb", "peak_threads")
                    },
                }
            )
    print(
        f"\nIn-process throughput, {args.latency * 1000:.0f} ms upstream, medians of {args.rounds} round(s)"
    )
    print(
        f"{'C':>5s} {'mode':15s} {'pred/s':>8s} {'x ideal':>8s} {'CPU ms':>7s} {'RSS MB':>7s} "
        f"{'threads':>8s} {'vs trio':>8s}"
    )
    for concurrency in args.concurrency:
        ours = next(r for r in rows if r["mode"] == "dspy-trio" and r["concurrency"] == concurrency)
        for row in (r for r in rows if r["concurrency"] == concurrency):
            print(
                f"{concurrency:5d} {row['mode']:15s} {row['throughput']:8.1f} "
                f"{row['throughput'] / (concurrency / args.latency):8.2f} "
                f"{row['cpu_ms_per_prediction']:7.2f} {row['peak_rss_mb']:7.0f} {row['peak_threads']:8.0f} "
                f"{ours['throughput'] / row['throughput']:7.1f}x"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "rows": rows}, indent=2)
    )
    print(f"\nraw results: {RESULTS / 'throughput.json'}")
    path = RESULTS / "throughput.png"
    plot_if_possible(lambda: plot(rows, path, args.latency), path)


if __name__ == "__main__":
    main()
