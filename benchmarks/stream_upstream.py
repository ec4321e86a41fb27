"""What ``stream_upstream`` costs: ``dspy_trio.engine.predict`` CPU per prediction with the answer sent
upstream as
one JSON body (the plain path) and as an SSE stream assembled by the backend, in one run.

Each measurement runs in a fresh worker process (modes alternate over ``--rounds``): ``--n`` predictions
at 64 concurrent against the fake upstream in its own process (20 ms to the first token, then every
token at once). The fake upstream's own CPU per prediction is shown too: a self-hosted server also pays
for framing a stream, though next to generating the tokens it is nothing. ``--words`` sets the answer's
length (the number of stream chunks grows with it)::

    python -m benchmarks.stream_upstream                 # 16 and 128 words a field, 3 rounds
    python -m benchmarks.stream_upstream --n 2000 --words 16 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks._measure import median, process_cpu, run_worker
from benchmarks._upstream import start_upstream

MODES = ("plain", "stream")
CONCURRENCY = 64


def _predict_worker(url: str, stream_upstream: bool, n: int) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings, RetryPolicy, open_engine

    lm = LMConfig(
        model="bench",
        retry=RetryPolicy(max_attempts=1),
        settings=OpenAISettings(api_base=url, stream_upstream=stream_upstream),
    )
    config = EngineConfig(lms={"default": lm}, max_in_flight=CONCURRENCY, max_queued=100_000)

    async def run() -> dict[str, Any]:
        async with open_engine(config) as engine:
            for i in range(20):
                await engine.predict("default", {"question": f"warm-up {i}"})
            limit = trio.Semaphore(CONCURRENCY)
            tokens = 0

            async def one(i: int) -> None:
                nonlocal tokens
                async with limit:
                    result = await engine.predict("default", {"question": f"question number {i}"})
                    tokens += result.usage.completion_tokens

            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            return {"cpu_ms": cpu / n * 1000, "wall": wall, "tokens": tokens / n}

    return dict(trio.run(run))


def _run(mode: str, url: str, upstream_pid: int, n: int) -> dict[str, Any]:
    upstream0 = process_cpu(upstream_pid)
    result = run_worker("benchmarks.stream_upstream", ["--worker", mode, "--url", url, "--n", str(n)])
    # The upstream's CPU over the whole worker (warm-up included: 20 of n + 20 predictions).
    result["upstream_cpu_ms"] = (process_cpu(upstream_pid) - upstream0) / (n + 20) * 1000
    print(f"  {mode:7s} {json.dumps(result)}", file=sys.stderr)
    return result


def _measure(words: int, n: int, rounds: int) -> dict[str, dict[str, float]]:
    process, url = start_upstream(0.02, first_token_delay=0.02, token_delay=0.0, words=words)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        for _ in range(rounds):
            for mode in MODES:
                runs[mode].append(_run(mode, url, process.pid, n))
    finally:
        process.kill()
        process.wait()
    return {mode: {key: median(runs[mode], key) for key in runs[mode][0]} for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="predictions per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--words", type=int, nargs="+", default=[16, 128], help="words per output field")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_predict_worker(args.url, args.worker == "stream", args.n)))
        return

    print(
        f"engine.predict, {args.n} predictions at {CONCURRENCY} concurrent, medians of {args.rounds} rounds"
    )
    print(f"{'words':>5} {'tokens':>6} | {'plain ms':>8} {'stream ms':>9} {'ratio':>5} | upstream ms", end="")
    print(" plain / stream")
    for words in args.words:
        result = _measure(words, args.n, args.rounds)
        plain, stream = result["plain"], result["stream"]
        print(
            f"{words:>5} {plain['tokens']:>6.0f} | {plain['cpu_ms']:>8.3f} {stream['cpu_ms']:>9.3f} "
            f"{stream['cpu_ms'] / plain['cpu_ms']:>5.2f} | {plain['upstream_cpu_ms']:.3f} / "
            f"{stream['upstream_cpu_ms']:.3f}"
        )


if __name__ == "__main__":
    main()
