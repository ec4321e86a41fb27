"""1,000 concurrent predictions against a slow upstream: the Trio-native path against the thread path.

Starts the fake OpenAI-compatible upstream in its own process (1 s latency by default), then runs the
same batch of predictions, each mode in a fresh worker process so that peak RSS and thread counts are
the mode's own, alternating modes for ``--rounds`` rounds. Prints medians and ratios::

    python -m benchmarks.concurrency                 # 1,000 predictions, 1 s upstream, 2 rounds
    python -m benchmarks.concurrency --n 200 --latency 0.5 --threads 64 --rounds 3

Modes:
  trio-native   engine + OpenAICompatibleLM (httpx on Trio): one OS thread, real cancellation
  dspy-threads  engine + stock dspy.LM in worker threads (--threads at a time)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks._upstream import start_upstream

MODES = ("trio-native", "dspy-threads")


def _worker(mode: str, url: str, n: int, threads: int) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import DSPySettings, EngineConfig, LMConfig, OpenAISettings, open_engine

    if mode == "trio-native":
        lm = LMConfig(model="bench-model", settings=OpenAISettings(api_base=url, api_key="sk-bench"))
    else:
        lm = LMConfig(
            model="openai/bench-model",
            settings=DSPySettings(api_base=url, api_key="sk-bench", threads=threads),
        )
    config = EngineConfig(lms={"default": lm}, max_in_flight=n, max_queued=0)
    peak_threads = threading.active_count()
    outcome: dict[str, Any] = {}

    async def sample_threads() -> None:
        nonlocal peak_threads
        while True:
            peak_threads = max(peak_threads, threading.active_count())
            await trio.sleep(0.01)

    async def main() -> None:
        async with open_engine(config) as engine:
            # One warm-up call: imports, first connection, DSPy's lazy set-up.
            await engine.predict("default", {"question": "warm-up"})
            ok = 0

            async def one(i: int) -> None:
                nonlocal ok
                await engine.predict("default", {"question": f"question number {i}"})
                ok += 1

            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_threads)
                async with trio.open_nursery() as batch:
                    for i in range(n):
                        batch.start_soon(one, i)
                nursery.cancel_scope.cancel()
            outcome.update(
                wall=time.perf_counter() - wall0,
                cpu=time.process_time() - cpu0,
                ok=ok,
            )

    trio.run(main)
    outcome.update(
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_threads=peak_threads,
    )
    return outcome


def _run_worker(mode: str, url: str, n: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.concurrency", "--worker", mode, "--url", url]
    command += ["--n", str(n), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="concurrent predictions (default 1000)")
    parser.add_argument("--latency", type=float, default=1.0, help="upstream latency in seconds")
    parser.add_argument("--threads", type=int, default=64, help="worker threads of the dspy-threads mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write raw results to this file")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(_worker(args.worker, args.url, args.n, args.threads)))
        return

    upstream, url = start_upstream(args.latency)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else reversed(MODES):
                result = _run_worker(mode, url, args.n, args.threads)
                runs[mode].append(result)
                print(f"  round {round_index + 1} {mode:13s} wall {result['wall']:.2f}s", file=sys.stderr)
    finally:
        upstream.kill()

    def median(mode: str, key: str) -> float:
        return float(statistics.median(run[key] for run in runs[mode]))

    ideal = args.latency
    print(
        f"\n{args.n} concurrent predictions, upstream latency {ideal:g}s "
        f"(ideal wall {ideal:g}s), medians of {args.rounds} rounds"
    )
    header = (
        f"{'mode':16s} {'wall s':>8s} {'x ideal':>8s} {'CPU ms/pred':>12s} "
        f"{'peak RSS MB':>12s} {'threads':>8s} {'ok':>6s}"
    )
    print(header)
    print("-" * len(header))
    for mode in MODES:
        label = mode if mode == "trio-native" else f"{mode}({args.threads})"
        print(
            f"{label:16s} {median(mode, 'wall'):8.2f} {median(mode, 'wall') / ideal:8.2f} "
            f"{median(mode, 'cpu') / args.n * 1000:12.2f} {median(mode, 'peak_rss_mb'):12.0f} "
            f"{median(mode, 'peak_threads'):8.0f} {min(run['ok'] for run in runs[mode]):6d}"
        )
    native, threads = "trio-native", "dspy-threads"
    print(
        "\nratios (dspy-threads / trio-native): "
        f"wall {median(threads, 'wall') / median(native, 'wall'):.1f}x, "
        f"CPU per prediction {median(threads, 'cpu') / median(native, 'cpu'):.2f}x, "
        f"peak RSS {median(threads, 'peak_rss_mb') / median(native, 'peak_rss_mb'):.2f}x, "
        f"OS threads {median(threads, 'peak_threads') / median(native, 'peak_threads'):.0f}x"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "runs": runs}, file, indent=2)


if __name__ == "__main__":
    main()
