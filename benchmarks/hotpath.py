"""The hot path, in one run: the floor, ``dspy_trio.engine.predict`` CPU per prediction with the httpx
transport and the lean one (beside a baseline tree's), 1,000 concurrent predictions against a 1 s upstream,
a profile, and loop stalls with and without tuning the garbage collector.

Every measurement runs in a fresh worker process (modes alternate over ``--rounds``) against the fake
upstream in its own process; the table shows medians and the targets as ratios::

    python -m benchmarks.hotpath                         # everything, 2 rounds
    python -m benchmarks.hotpath --rounds 3 --gc-seconds 60
    python -m benchmarks.hotpath --parts cpu --baseline main --rounds 5

Parts:
  cpu       floor (benchmarks.floor) and engine.predict CPU ms per prediction, --n predictions at 64
            concurrent, 20 ms upstream; goal: engine.predict <= 2.0x the floor, measured at the same
            concurrency (64 connections); with the interpreter's GC defaults and as `dspy-trio serve`
            sets the collector (tune_gc_for_serving). Each engine.predict worker also runs on a baseline
            tree (--baseline REF; default the merge base of HEAD and main, none when HEAD is on main):
            the same worker code on the other tree's engine, beside this tree's in every round.
  c1000     --c1000 concurrent predictions against a 1 s upstream (benchmarks._canned_upstream, so that
            the upstream's own CPU does not decide the wall time); goal: wall <= 1.3x the ideal (1 s).
            Each mode cold (every prediction connects) and warm (the pool already holds the
            connections, as a server's does in steady state), next to the floor's work at the same
            concurrency (benchmarks.floor.concurrent_floor), which no engine can beat.
  profile   cProfile of engine.predict on the lean transport: top functions by own time, and own time
            by package.
  gc        a steady load for --gc-seconds (--gc-clients closed-loop clients, 50 ms upstream): worst
            event-loop stall, p99 latency and full collections with the interpreter's defaults, with
            gc.freeze() after start-up (the engine opened and warmed up), and with
            tune_gc_for_serving() (freeze + young threshold 10,000, what `dspy-trio serve` does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._at_once import predict_at_once
from benchmarks._baseline import HELP as BASELINE_HELP
from benchmarks._baseline import ROOT, baseline_tree
from benchmarks._canned_upstream import start_canned_upstream
from benchmarks._measure import median, process_cpu, run_worker, verdict
from benchmarks._upstream import start_upstream
from dspy_trio.engine import tune_gc_for_serving

TRANSPORTS = ("httpx", "lean")
# plain: the interpreter's defaults; freeze: gc.freeze() after start-up; tuned: tune_gc_for_serving().
GC_MODES = ("plain", "freeze", "tuned")
# cold: every prediction opens its connection; warm: the pool holds c1000 kept-alive connections;
# tuned: engine.tune_gc_for_serving() after the warm-up (gc.freeze(), young threshold 10,000), as
# `dspy-trio serve` does once started.
CPU_WORKERS = ("floor", "predict:httpx", "predict:lean", "floor:tuned", "predict:lean-tuned")
C1000_MODES = (
    "floor-cold",
    "lean-cold",
    "httpx-cold",
    "floor-warm",
    "lean-warm",
    "floor-warm-tuned",
    "lean-warm-tuned",
)


def _engine(url: str, transport: str, concurrency: int) -> Any:
    from dspy_trio.engine import EngineConfig, LMConfig, open_engine
    from dspy_trio.engine.lm import HTTPSettings, OpenAICompatibleLM

    # The flat table every tree takes (a --baseline worker runs on the other tree's engine).
    table = {"provider": "openai", "model": "bench", "api_base": url, "retry": {"max_attempts": 1}}
    config = EngineConfig(
        lms={"default": LMConfig.from_mapping(table)}, max_in_flight=concurrency, max_queued=100_000
    )
    lm = OpenAICompatibleLM("bench", api_base=url, http=HTTPSettings(client=transport))  # type: ignore[arg-type]
    return open_engine(config, lms={"default": lm})


def _predict_worker(
    url: str, transport: str, n: int, concurrency: int, profile: bool, tuned: bool = False
) -> dict[str, Any]:
    import trio

    async def run() -> dict[str, Any]:
        async with _engine(url, transport, concurrency) as engine:
            for i in range(20):
                await engine.predict("default", {"question": f"warm-up {i}"})
            if tuned:  # the collector as `dspy-trio serve` sets it once started
                tune_gc_for_serving()
            limit = trio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with limit:
                    await engine.predict("default", {"question": f"question number {i}"})

            profiler = None
            if profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            result: dict[str, Any] = {"cpu_ms": cpu / n * 1000, "wall": wall}
            if profiler is not None:
                profiler.disable()
                result["profile"] = _profile_summary(profiler, n)
            return result

    return dict(trio.run(run))


def profile_table(
    source: Any, package_of: Callable[[str], str]
) -> tuple[float, dict[str, float], list[tuple[float, float, int, str]]]:
    """A cProfile profile (a ``Profile`` or a stats file) as: total own seconds, own seconds by package
    (``package_of(filename)``), and rows ``(own, cumulative, calls, "package:file:line(name)")``,
    costliest first."""
    import pstats

    entries = pstats.Stats(source).stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values())
    by_package: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_cc, calls, tt, ct, _callers) in entries.items():
        package = package_of(filename)
        by_package[package] = by_package.get(package, 0.0) + tt
        rows.append((tt, ct, calls, f"{package}:{os.path.basename(filename)}:{line}({name})"))
    rows.sort(reverse=True)
    return total, by_package, rows


def _profile_summary(profiler: Any, n: int) -> dict[str, Any]:
    total, by_package, rows = profile_table(profiler, _package)
    return {
        "total_ms_per_prediction": total / n * 1000,
        "top": [
            {"own_ms": tt / n * 1000, "cum_ms": ct / n * 1000, "calls": calls / n, "where": where}
            for tt, ct, calls, where in rows[:25]
        ],
        "packages": {k: v / n * 1000 for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])},
    }


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/")[1].split("/")[0].removesuffix(".py")
    for ours in ("/engine/lm/_transport/", "/engine/lm/", "/engine/"):
        if ours in filename:
            return ours.strip("/").replace("/", ".")
    if filename.startswith("~") or "/lib/python3" in filename:
        return "stdlib"
    return "other"


def _gc_worker(url: str, mode: str, seconds: float, concurrency: int) -> dict[str, Any]:
    import gc

    import trio

    pauses: list[float] = []  # full collections
    started_at: list[float] = []
    collector = [0.0]  # seconds in every collection, all generations

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started_at.append(time.perf_counter())
            return
        took = time.perf_counter() - started_at.pop()
        collector[0] += took
        if info["generation"] == 2:
            pauses.append(took)

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        worst_stall = 0.0
        async with _engine(url, "lean", concurrency) as engine:
            for i in range(50):
                await engine.predict("default", {"question": f"warm-up {i}"})
            if mode == "freeze":
                gc.freeze()
            elif mode == "tuned":
                tune_gc_for_serving()
            gc.callbacks.append(on_gc)

            async def monitor() -> None:
                nonlocal worst_stall
                while True:
                    before = time.perf_counter()
                    await trio.sleep(0.005)
                    worst_stall = max(worst_stall, time.perf_counter() - before - 0.005)

            async def client(c: int) -> None:
                i = 0
                while True:
                    t0 = time.perf_counter()
                    await engine.predict("default", {"question": f"question {c} {i}"})
                    latencies.append(time.perf_counter() - t0)
                    i += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor)
                for c in range(concurrency):
                    nursery.start_soon(client, c)
                await trio.sleep(seconds)
                nursery.cancel_scope.cancel()
        gc.callbacks.remove(on_gc)
        latencies.sort()
        return {
            "requests": len(latencies),
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "max_ms": latencies[-1] * 1000,
            "worst_stall_ms": worst_stall * 1000,
            "full_collections": len(pauses),
            "gc_ms_per_request": collector[0] / max(1, len(latencies)) * 1000,
            "worst_full_collection_ms": max(pauses, default=0.0) * 1000,
            "frozen_objects": gc.get_freeze_count(),
        }

    return dict(trio.run(run))


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    kind, _, option = args.worker.partition(":")
    if kind == "floor":
        from benchmarks.floor import measure

        if option == "tuned":
            tune_gc_for_serving()
        return measure(args.url, args.n)
    if kind == "predict":
        transport, _, gc_mode = option.partition("-")
        return _predict_worker(args.url, transport, args.n, 64, profile=False, tuned=gc_mode == "tuned")
    if kind == "profile":
        return _predict_worker(args.url, option, args.n, 64, profile=True)
    if kind == "c1000":
        transport, pool, gc_mode = [*option.split("-"), ""][:3]
        if transport == "floor":
            from benchmarks.floor import concurrent_floor

            floor = concurrent_floor(args.url, args.c1000, warm=pool == "warm", tuned=gc_mode == "tuned")
            return {**floor, "peak_threads": 1}
        return predict_at_once(
            lambda: _engine(args.url, transport, args.c1000),
            args.c1000,
            warm=pool == "warm",
            tuned=gc_mode == "tuned",
        )
    if kind == "gc":
        return _gc_worker(args.url, option, args.gc_seconds, args.gc_clients)
    raise SystemExit(f"unknown worker {args.worker}")


def _run(worker: str, url: str, args: argparse.Namespace, tree: Path = ROOT) -> dict[str, Any]:
    options = ["--url", url, "--n", str(args.n), "--c1000", str(args.c1000)]
    options += ["--gc-seconds", str(args.gc_seconds), "--gc-clients", str(args.gc_clients)]
    result = run_worker("benchmarks.hotpath", ["--worker", worker, *options], tree=tree)
    shown = json.dumps({k: v for k, v in result.items() if k != "profile"})
    print(f"  {worker:16s} {'baseline' if tree != ROOT else 'this':8s} {shown}", file=sys.stderr)
    return result


def _summary(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\nhot path, medians of {args.rounds} rounds (each in its own process)")
    if "floor" in results:
        floor, floor64 = median(results["floor"], "floor_ms"), median(results["floor"], "floor64_ms")
        adapter, post = median(results["floor"], "adapter_ms"), median(results["floor"], "h11_post_ms")
        post64 = median(results["floor"], "h11_post64_ms")
        print(
            f"  floor: ChatAdapter format+parse {adapter:.3f} ms + raw h11 POST on 64 connections at once "
            f"{post64:.3f} ms = {floor64:.3f} ms (one connection: POST {post:.3f} ms, floor {floor:.3f} ms)"
        )
        for transport in TRANSPORTS:
            cpu = median(results[f"predict:{transport}"], "cpu_ms")
            print(
                f"  engine.predict, {transport:5s}, 64 concurrent: {cpu:.3f} ms = {cpu / floor64:.2f}x "
                f"the floor at the same concurrency (goal <= 2.0x: {verdict(cpu / floor64 <= 2.0)}); "
                f"{cpu / floor:.2f}x the one-connection floor"
            )
        ratio = median(results["predict:httpx"], "cpu_ms") / median(results["predict:lean"], "cpu_ms")
        print(f"  httpx / lean CPU per prediction: {ratio:.2f}x")
        for worker in CPU_WORKERS:
            if f"{worker}@baseline" in results:
                mine, theirs = results[worker], results[f"{worker}@baseline"]
                this, before = median(mine, "cpu_ms"), median(theirs, "cpu_ms")
                # Each round ran the two side by side: their ratio is the least disturbed by load.
                paired = statistics.median(
                    a["cpu_ms"] / b["cpu_ms"] for a, b in zip(mine, theirs, strict=False)
                )
                print(
                    f"  {worker:18s} baseline {before:.3f} ms, this tree {this:.3f} ms: this / baseline "
                    f"{this / before:.3f}x CPU per prediction (median of the rounds' ratios {paired:.3f}x)"
                )
        if "floor:tuned" in results and "predict:lean-tuned" in results:
            tuned_floor = median(results["floor:tuned"], "floor64_ms")
            cpu = median(results["predict:lean-tuned"], "cpu_ms")
            print(
                f"  with the collector as `dspy-trio serve` sets it (tune_gc_for_serving): floor "
                f"{tuned_floor:.3f} ms, engine.predict lean {cpu:.3f} ms = {cpu / tuned_floor:.2f}x "
                f"(goal <= 2.0x: {verdict(cpu / tuned_floor <= 2.0)})"
            )
    if any(key.startswith("c1000:") for key in results):
        print(
            f"  {args.c1000} concurrent predictions vs a 1 s upstream (the canned one), one OS thread; "
            "'floor' is the floor's work (ChatAdapter + raw h11) at the same concurrency:"
        )
        floors = {
            pool: median(results[f"c1000:floor-{pool}"], "wall")
            for pool in ("cold", "warm", "warm-tuned")
            if f"c1000:floor-{pool}" in results
        }
        for mode in C1000_MODES:
            key = f"c1000:{mode}"
            if key not in results:
                continue
            wall, cpu = median(results[key], "wall"), median(results[key], "cpu_ms")
            pool = mode.partition("-")[2]
            versus = (
                f", {wall / floors[pool]:.2f}x the floor's wall"
                if pool in floors and "floor" not in mode
                else ""
            )
            print(
                f"    {mode:17s} wall {wall:.2f} s = {wall:.2f}x ideal "
                f"(goal <= 1.3x: {verdict(wall <= 1.3)})"
                f"{versus}; {cpu:.2f} ms CPU/prediction, {min(r['ok'] for r in results[key]):.0f} ok, "
                f"{max(r['peak_threads'] for r in results[key])} thread(s); "
                f"upstream {median(results[key], 'upstream_cpu_ms'):.2f} ms CPU/answer"
            )
    for mode in GC_MODES:
        key = f"gc:{mode}"
        if key in results:
            runs = results[key]
            stall, stall_max = median(runs, "worst_stall_ms"), max(r["worst_stall_ms"] for r in runs)
            worst_gc = median(runs, "worst_full_collection_ms")
            print(
                f"  gc {mode:6s}: p50 {median(runs, 'p50_ms'):.1f} ms, "
                f"p99 {median(runs, 'p99_ms'):.1f} ms, "
                f"max {median(runs, 'max_ms'):.1f} ms, worst loop stall {stall:.1f} ms (of all runs "
                f"{stall_max:.1f}), full collections {median(runs, 'full_collections'):.0f} (longest "
                f"{worst_gc:.1f} ms), collector {median(runs, 'gc_ms_per_request'):.3f} ms/request, "
                f"{median(runs, 'requests'):.0f} requests"
            )
    if "profile:lean" in results:
        summary = results["profile:lean"][0]["profile"]
        total = summary["total_ms_per_prediction"]
        print(f"\nprofile of engine.predict (lean), own time per prediction under cProfile: {total:.3f} ms")
        print("  by package: " + ", ".join(f"{k} {v:.3f}" for k, v in list(summary["packages"].items())[:12]))
        for row in summary["top"][:25]:
            own, cum, calls = row["own_ms"], row["cum_ms"], row["calls"]
            print(f"  {own:.4f} own {cum:.4f} cum {calls:6.1f} calls  {row['where']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["cpu", "c1000", "profile", "gc"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=2000, help="predictions per CPU measurement")
    parser.add_argument("--c1000", type=int, default=1000, help="concurrent predictions of part c1000")
    parser.add_argument("--gc-seconds", type=float, default=30.0)
    parser.add_argument("--gc-clients", type=int, default=16, help="closed-loop clients of part gc")
    parser.add_argument("--json", default=None, help="also write raw results to this file")
    parser.add_argument("--show", default=None, help="print the summary of a run saved with --json")
    parser.add_argument("--baseline", default=None, help=f"{BASELINE_HELP} (part cpu)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.show:
        with open(args.show) as file:
            saved = json.load(file)
        _summary(saved["results"], argparse.Namespace(**saved["args"]))
        return

    with baseline_tree(
        args.baseline if "cpu" in args.parts else "none", prefix="hotpath-baseline-"
    ) as baseline:
        results = _measure_parts(args, baseline[0] if baseline else None)
    _summary(results, args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=2)


def _measure_parts(args: argparse.Namespace, baseline: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Every worker of the parts asked for, each part's modes alternating over the rounds; the cpu
    part's engine workers also on ``baseline`` (under ``WORKER@baseline``)."""
    results: dict[str, list[dict[str, Any]]] = {}

    def run(worker: str, url: str, tree: Path = ROOT) -> dict[str, Any]:
        result = _run(worker, url, args, tree)
        results.setdefault(worker if tree == ROOT else f"{worker}@baseline", []).append(result)
        return result

    if "cpu" in args.parts or "profile" in args.parts:
        upstream, url = start_upstream(0.02)
        try:
            for r in range(args.rounds):
                if "cpu" in args.parts:
                    order = [(worker, ROOT) for worker in CPU_WORKERS]
                    if baseline is not None:  # each engine worker beside its baseline
                        for worker in CPU_WORKERS[::-1]:
                            if worker.startswith("predict:"):
                                order.insert(order.index((worker, ROOT)) + 1, (worker, baseline))
                    for worker, tree in order if r % 2 == 0 else order[::-1]:
                        run(worker, url, tree)
            if "profile" in args.parts:
                run("profile:lean", url)
        finally:
            upstream.kill()
    if "c1000" in args.parts:
        # The canned upstream (~0.3 ms of CPU per answer): the fake upstream's own core would decide
        # the wall time at this concurrency (it spends ~1.4 ms per answer).
        upstream, url = start_canned_upstream(1.0)
        try:
            for r in range(args.rounds):
                for mode in C1000_MODES if r % 2 == 0 else C1000_MODES[::-1]:
                    before = process_cpu(upstream.pid)
                    result = run(f"c1000:{mode}", url)
                    answers = args.c1000 * (2 if mode.endswith("warm") else 1) + 1
                    result["upstream_cpu_ms"] = (process_cpu(upstream.pid) - before) / answers * 1000
        finally:
            upstream.kill()
    if "gc" in args.parts:
        upstream, url = start_upstream(0.05)
        try:
            for r in range(args.rounds):
                for mode in GC_MODES if r % 2 == 0 else GC_MODES[::-1]:
                    run(f"gc:{mode}", url)
        finally:
            upstream.kill()
    return results


if __name__ == "__main__":
    main()
