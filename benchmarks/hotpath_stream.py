"""Streaming and cancellation on the hot path, in one run: tokens/s through the engine on a baseline
(a git ref, default: the merge base of HEAD and main) and on this tree, and how fast a cancel closes the
upstream connection.

Every measurement runs in a fresh worker process against the fake upstream in its own process; the
baseline's workers run on an export of its tree (``git archive``), so both sides are measured in the same
run on the same machine::

    python -m benchmarks.hotpath_stream                          # both parts, ~3 minutes
    python -m benchmarks.hotpath_stream --parts throughput --rounds 5
    python -m benchmarks.hotpath_stream --parts cancel --trials 400 --http-trials 200

Parts:
  throughput  tokens/s of one --tokens-token answer received by an in-process consumer of
              ``dspy_trio.engine.stream``: from the simulated LM (no pacing), and from an
              ``OpenAICompatibleLM`` (lean HTTP transport, ``stream_upstream`` on) reading the fake
              upstream's SSE stream (no pacing). Baseline and this tree alternate over --rounds; medians.
              Goal: >= 20,000 tokens/s.
  cancel      --trials cancels each of ``dspy_trio.engine.predict`` (upstream latency 5 s) and
  ``dspy_trio.engine.stream``
              (a long answer, a token every 2 ms) in process: the caller's scope is cancelled after a
              random 50-300 ms. Then over HTTP: ``dspy-trio serve`` and a client that disconnects from
              ``/predict`` and ``/stream`` after the same random delays (--http-trials each). Measured:
              wall clock (``time.time()``, both processes on this machine) from the cancel to the fake
              upstream seeing the connection close (its ``client_closed_wall``). Goal: p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._baseline import HELP as BASELINE_HELP
from benchmarks._baseline import ROOT, baseline_tree
from benchmarks._measure import median, percentile, process_cpu, run_worker, verdict
from benchmarks._upstream import start_upstream

GOAL_TOKENS = 20_000.0
GOAL_CLOSE_MS = 20.0
DELAYS = (0.05, 0.3)  # the random cancel delay, seconds


# ---------------------------------------------------------------------------------------------- workers


def _throughput_worker(kind: str, url: str, tokens: int) -> dict[str, Any]:
    import trio

    from dspy_trio import engine
    from dspy_trio.engine import EngineConfig, FinalEvent, LMConfig, open_engine

    # Flat tables, which every tree takes: this worker also runs on the baseline's engine.
    table: dict[str, Any] = {"first_token_delay": 0, "token_delay": 0, "words_per_field": tokens}
    if kind == "http":
        table = {"provider": "openai", "model": "bench", "api_base": url, "stream_upstream": True}
        table["retry"] = {"max_attempts": 1}
    lm = LMConfig.from_mapping(table)

    async def one(eng: Any, question: str) -> tuple[int, float, float]:
        started, cpu, final = time.perf_counter(), time.process_time(), None
        async with eng.stream("default", {"question": question}) as events:
            async for event in events:
                if isinstance(event, FinalEvent):
                    final = event
        assert isinstance(final, FinalEvent), "the stream did not succeed"
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return final.result.usage.completion_tokens, seconds, cpu

    async def run() -> dict[str, Any]:
        async with open_engine(EngineConfig(lms={"default": lm})) as eng:
            await one(eng, "warm-up")
            n, seconds, cpu = await one(eng, "What is Trio?")
        return {
            "tokens": n,
            "tokens_per_s": n / seconds,
            "cpu_us_per_token": cpu / n * 1e6,
            "engine": str(Path(engine.__file__).parent),
        }

    return dict(trio.run(run))


def _cancel_worker(kind: str, url: str, trials: int, lanes: int, seed: int) -> dict[str, Any]:
    """``kind`` is ``predict`` or ``stream``: cancel the caller's scope after a random delay."""
    import gc

    import httpx
    import trio

    from dspy_trio.engine import EngineConfig, LMConfig, open_engine

    table = {"provider": "openai", "model": "bench", "api_base": url, "retry": {"max_attempts": 1}}
    lm = LMConfig.from_mapping(table)
    config = EngineConfig(lms={"default": lm}, max_in_flight=64)
    rng = random.Random(seed)
    cancelled_at: dict[str, float] = {}

    async def trial(eng: Any, tag: str) -> None:
        delay = rng.uniform(*DELAYS)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_later() -> None:
                    await trio.sleep(delay)
                    cancelled_at[tag] = time.time()
                    scope.cancel()

                nursery.start_soon(cancel_later)
                if kind == "predict":
                    await eng.predict("default", {"question": tag})
                else:
                    async with eng.stream("default", {"question": tag}) as events:
                        async for _event in events:
                            pass
                raise AssertionError(f"{tag} finished before its cancel")

    full_collections: list[float] = []
    started_at: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started_at.append(time.perf_counter())
            elif started_at:
                full_collections.append((time.perf_counter() - started_at.pop()) * 1000)

    async def run() -> dict[str, Any]:
        stalls = [0.0]

        async def watch_loop() -> None:  # how late a 1 ms sleep wakes: the event loop's worst stall
            while True:
                before = time.perf_counter()
                await trio.sleep(0.001)
                stalls[0] = max(stalls[0], (time.perf_counter() - before - 0.001) * 1000)

        async with open_engine(config) as eng, trio.open_nursery() as watcher:
            watcher.start_soon(watch_loop)
            queue = iter(range(trials))

            async def lane() -> None:
                for i in queue:
                    await trial(eng, f"cancel trial {i} end")

            gc.callbacks.append(on_gc)
            async with trio.open_nursery() as nursery:
                for _ in range(lanes):
                    nursery.start_soon(lane)
            gc.callbacks.remove(on_gc)
            await trio.sleep(0.5)  # let the upstream note the last closes
            watcher.cancel_scope.cancel()
        result = await _closes(url, cancelled_at, httpx)
        result["worst_loop_stall_ms"] = stalls[0]
        result["full_collections"] = len(full_collections)
        result["longest_full_collection_ms"] = max(full_collections, default=0.0)
        return result

    return dict(trio.run(run))


async def _closes(url: str, cancelled_at: dict[str, float], httpx: Any) -> dict[str, Any]:
    """Match the fake upstream's records to the trials (by the tag in the prompt)."""
    async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=30) as control:
        records = (await control.get("/_fake/records")).json()["records"]
    closes: list[float] = []
    completed = 0
    unmatched: list[str] = []
    for tag, at in cancelled_at.items():
        found = [r for r in records if tag in json.dumps(r["body"])]
        if not found:
            unmatched.append(tag)
        elif found[-1]["client_closed_wall"] is not None:
            closes.append((found[-1]["client_closed_wall"] - at) * 1000)
        else:
            completed += 1
    return {"closes_ms": closes, "trials": len(cancelled_at), "ran_on": completed, "unmatched": unmatched}


async def _http_cancel_trials(
    server: str, upstream: str, path: str, trials: int, lanes: int, seed: int
) -> Any:
    import httpx
    import trio

    rng = random.Random(seed)
    cancelled_at: dict[str, float] = {}
    delays: dict[str, float] = {}

    async def trial(client: httpx.AsyncClient, tag: str) -> None:
        delay = delays[tag] = rng.uniform(*DELAYS)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_later() -> None:
                    await trio.sleep(delay)
                    cancelled_at[tag] = time.time()
                    scope.cancel()

                nursery.start_soon(cancel_later)
                async with client.stream("POST", path, json={"question": tag}) as response:
                    async for _line in response.aiter_lines():
                        pass
                raise AssertionError(f"{tag} finished before its cancel")

    queue = iter(range(trials))

    async def lane() -> None:
        # One client per lane, built before any trial runs (building one loads CA certificates, which
        # would stall the other lanes' timers); no kept-alive connections: each trial connects anew,
        # and leaving closes its connection.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server, timeout=30, limits=limits) as client:
            await ready.wait()
            for i in queue:
                await trial(client, f"http {path} trial {i} end")

    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(lanes):
            nursery.start_soon(lane)
        await trio.sleep(0.5)
        ready.set()
    await trio.sleep(0.5)
    result = await _closes(upstream, cancelled_at, httpx)
    result["unmatched"] = [(tag, round(delays[tag] * 1000)) for tag in result["unmatched"]]
    return result


async def _warm(server: str, upstream: str, path: str) -> None:
    """A few quick requests through a fresh server (the fake upstream answers at once meanwhile)."""
    import httpx

    async with httpx.AsyncClient(base_url=upstream.removesuffix("/v1"), timeout=30) as control:
        behavior = (await control.post("/_fake/behavior", json={})).json()
        quick = {"latency": 0, "first_token_delay": 0, "token_delay": 0, "words_per_field": 4}
        await control.post("/_fake/behavior", json=quick)
        try:
            async with httpx.AsyncClient(base_url=server, timeout=30) as client:
                for i in range(5):
                    (await client.post(path, json={"question": f"warm-up {i}"})).raise_for_status()
        finally:
            await control.post("/_fake/behavior", json={k: behavior[k] for k in quick})


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    kind, _, option = args.worker.partition(":")
    if kind == "throughput":
        return _throughput_worker(option, args.url, args.tokens)
    if kind == "cancel":
        return _cancel_worker(option, args.url, args.trials, args.lanes, args.seed)
    raise SystemExit(f"unknown worker {args.worker}")


# ------------------------------------------------------------------------------------------ orchestrator


def _run(worker: str, url: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    options = ["--url", url, "--tokens", str(args.tokens), "--trials", str(args.trials)]
    options += ["--lanes", str(args.lanes), "--seed", str(args.seed)]
    result = run_worker("benchmarks.hotpath_stream", ["--worker", worker, *options], tree=tree)
    shown = {k: v for k, v in result.items() if k != "closes_ms"}
    print(f"  {worker:22s} {tree.name[:24]:24s} {json.dumps(shown)}", file=sys.stderr)
    return result


def _throughput(args: argparse.Namespace, trees: dict[str, Path]) -> None:
    upstream, url = start_upstream(words=args.tokens)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for r in range(args.rounds):
            for kind in ("simulated", "http"):
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    upstream_cpu = process_cpu(upstream.pid)
                    result = _run(f"throughput:{kind}", url, tree, args)
                    # The fake upstream's CPU per token over the worker (its warm-up stream included).
                    result["upstream_us_per_token"] = (
                        (process_cpu(upstream.pid) - upstream_cpu) / (2 * result["tokens"]) * 1e6
                    )
                    runs.setdefault((kind, name), []).append(result)
    finally:
        upstream.kill()
        upstream.wait()
    print(f"\nstreaming throughput: one {args.tokens:,}-word answer, medians of {args.rounds} rounds")
    labels = {"simulated": "simulated LM, in process", "http": "lean HTTP + stream_upstream, fake upstream"}
    for kind, label in labels.items():
        print(f"  {label}")
        for name in trees:
            rate = median(runs[(kind, name)], "tokens_per_s")
            cpu = median(runs[(kind, name)], "cpu_us_per_token")
            line = f"    {name:8s} {rate:9,.0f} tokens/s, engine CPU {cpu:5.1f} us/token"
            if kind == "http":
                line += f" (the fake upstream: {median(runs[(kind, name)], 'upstream_us_per_token'):.1f})"
            if name == "this":
                line += f"   goal >= 20,000 tokens/s: {verdict(rate >= GOAL_TOKENS)}"
            print(line)
        if "baseline" in trees:
            ratio = median(runs[(kind, "this")], "tokens_per_s") / median(
                runs[(kind, "baseline")], "tokens_per_s"
            )
            cpu_ratio = median(runs[(kind, "baseline")], "cpu_us_per_token") / median(
                runs[(kind, "this")], "cpu_us_per_token"
            )
            print(f"    this / baseline: {ratio:.2f}x tokens/s, {cpu_ratio:.2f}x less engine CPU per token")


def _report_closes(label: str, result: dict[str, Any]) -> None:
    closes = result["closes_ms"]
    if not closes:
        print(f"  {label:34s} no closes seen ({result})")
        return
    p50, p99 = statistics.median(closes), percentile(closes, 0.99)
    ok = p99 <= GOAL_CLOSE_MS and not result["ran_on"]
    print(
        f"  {label:30s} p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  max {max(closes):6.2f} ms  (n={len(closes)} of "
        f"{result['trials']}, ran on upstream {result['ran_on']}, cancelled before reaching it "
        f"{len(result['unmatched'])}; goal p99 <= 20 ms: {verdict(ok)})"
    )
    if "worst_loop_stall_ms" in result:
        print(
            f"  {'':30s} the engine's event loop: worst stall {result['worst_loop_stall_ms']:.1f} ms, "
            f"{result['full_collections']} full collections (longest "
            f"{result['longest_full_collection_ms']:.1f} ms)"
        )


def _cancel(args: argparse.Namespace, tree: Path) -> None:
    import trio

    from benchmarks.serving import start_server, stop

    results: dict[str, dict[str, Any]] = {}
    slow, slow_url = start_upstream(5.0)
    paced, paced_url = start_upstream(first_token_delay=0.02, token_delay=0.002, words=5_000)
    try:
        results["engine.predict"] = _run("cancel:predict", slow_url, tree, args)
        results["engine.stream"] = _run("cancel:stream", paced_url, tree, args)
        for path, upstream_url in (("/predict", slow_url), ("/stream", paced_url)):
            server, url = start_server("dspy-trio", upstream_url, 64)
            try:
                trio.run(_warm, url, upstream_url, path)
                trials, lanes, seed = args.http_trials, args.lanes, args.seed
                result = trio.run(_http_cancel_trials, url, upstream_url, path, trials, lanes, seed)
                results[f"HTTP {path}, client leaves"] = result
                shown = {k: v for k, v in result.items() if k != "closes_ms"}
                print(f"  http {path:18s} {json.dumps(shown)}", file=sys.stderr)
            finally:
                stop(server)
    finally:
        for process in (slow, paced):
            process.kill()
            process.wait()
    print(
        f"\ncancel -> the upstream sees its connection closed (cancel after a random {DELAYS[0] * 1000:.0f}-"
        f"{DELAYS[1] * 1000:.0f} ms, {args.lanes} trials at a time, wall clock of both processes)"
    )
    for label, result in results.items():
        _report_closes(label, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=("throughput", "cancel"), default=["throughput", "cancel"]
    )
    parser.add_argument("--baseline", default=None, help=BASELINE_HELP)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (each tree each kind)")
    parser.add_argument("--tokens", type=int, default=10_000, help="words of the streamed answer")
    parser.add_argument("--trials", type=int, default=200, help="in-process cancels of each kind")
    parser.add_argument("--http-trials", type=int, default=100, help="HTTP disconnects of each path")
    parser.add_argument("--lanes", type=int, default=4, help="cancel trials in flight at once")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    started = time.perf_counter()
    given = args.baseline if "throughput" in args.parts else "none"
    with baseline_tree(given, prefix="hotpath-stream-baseline-") as baseline:
        if "throughput" in args.parts:
            trees = {"this": ROOT, **({"baseline": baseline[0]} if baseline else {})}
            _throughput(args, trees)
        if "cancel" in args.parts:
            _cancel(args, ROOT)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
