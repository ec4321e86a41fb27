"""1,000 concurrent predictions against a slow upstream: the Trio-native path against the thread path.

Starts the fake OpenAI-compatible upstream in its own process (1 s latency by default), then runs the
same batch of predictions, each mode in a fresh worker process so that peak RSS and thread counts are
the mode's own, alternating modes for ``--rounds`` rounds. Prints medians and ratios::

    python -m benchmarks.concurrency                 # 1,000 predictions, 1 s upstream, 2 rounds
    python -m benchmarks.concurrency --n 200 --latency 0.5 --threads 64 --rounds 3

Modes:
  trio-native   engine + OpenAICompatibleLM (the lean h11 transport on Trio): one OS thread, real
                cancellation
  dspy-threads  engine + stock dspy.LM in worker threads (--threads at a time)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from benchmarks._at_once import predict_at_once
from benchmarks._measure import median as _median
from benchmarks._measure import run_worker
from benchmarks._upstream import start_upstream

MODES = ("trio-native", "dspy-threads")


def _worker(mode: str, url: str, n: int, threads: int) -> dict[str, Any]:
    from dspy_trio.engine import DSPySettings, EngineConfig, LMConfig, OpenAISettings, open_engine

    if mode == "trio-native":
        lm = LMConfig(model="bench-model", settings=OpenAISettings(api_base=url, api_key="sk-bench"))
    else:
        lm = LMConfig(
            model="openai/bench-model",
            settings=DSPySettings(api_base=url, api_key="sk-bench", threads=threads),
        )
    config = EngineConfig(lms={"default": lm}, max_in_flight=n, max_queued=0)
    return predict_at_once(lambda: open_engine(config), n)


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
                options = ["--url", url, "--n", str(args.n), "--threads", str(args.threads)]
                result = run_worker("benchmarks.concurrency", ["--worker", mode, *options])
                runs[mode].append(result)
                print(f"  round {round_index + 1} {mode:13s} wall {result['wall']:.2f}s", file=sys.stderr)
    finally:
        upstream.kill()

    def median(mode: str, key: str) -> float:
        return _median(runs[mode], key)

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
            f"{median(mode, 'cpu_ms'):12.2f} {median(mode, 'peak_rss_mb'):12.0f} "
            f"{median(mode, 'peak_threads'):8.0f} {min(run['ok'] for run in runs[mode]):6d}"
        )
    native, threads = "trio-native", "dspy-threads"
    print(
        "\nratios (dspy-threads / trio-native): "
        f"wall {median(threads, 'wall') / median(native, 'wall'):.1f}x, "
        f"CPU per prediction {median(threads, 'cpu_ms') / median(native, 'cpu_ms'):.2f}x, "
        f"peak RSS {median(threads, 'peak_rss_mb') / median(native, 'peak_rss_mb'):.2f}x, "
        f"OS threads {median(threads, 'peak_threads') / median(native, 'peak_threads'):.0f}x"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "runs": runs}, file, indent=2)


if __name__ == "__main__":
    main()
