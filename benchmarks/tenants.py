"""Tenants, in one run: a quiet tenant beside a noisy one (FIFO today vs weighted fair), weights 3:1,
deadline-aware refusal under overload (today vs now), the CPU fair admission costs per prediction, and
10,000 configured tenants' start-up time and memory.

Every measurement runs in a fresh worker process against the fake upstream in its own process. "Today"
is a baseline tree (``--baseline``, default the merge base of HEAD and main) running the same worker
code on its own engine::

    python -m benchmarks.tenants                       # everything
    python -m benchmarks.tenants --parts fair weights --seconds 20
    python -m benchmarks.tenants --baseline none       # this tree only (FIFO = one tenant)

Parts:
  fair      in-flight 4, a 0.2 s upstream: a quiet tenant (2 closed loops) alone, then beside a noisy
            one (40 closed loops), FIFO (the baseline; one tenant for both without one) and weighted
            fair; goal: the quiet tenant's p50 <= 1.5x its p50 alone.
  weights   tenants of weight 3 and 1, 20 closed loops each: the slots each got once both saturate
            (after the first second), 3:1 +- 10%.
  deadline  open-loop load at twice capacity (in-flight 4, 0.2 s upstream, 40 requests/s), each with a
            1 s deadline: requests that timed out in the queue (today vs now; goal 0 now) and how long
            a refusal takes (goal p99 < 10 ms).
  cpu       engine CPU per prediction at 64 concurrent (20 ms upstream), baseline vs this tree in
            alternating rounds; goal: <= 5% more.
  startup   10,000 tenants configured in TOML (a key and a weight each): config read + engine open +
            key ring, time and memory; goals < 1 s and < 20 MB.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._baseline import HELP as BASELINE_HELP
from benchmarks._baseline import baseline_tree
from benchmarks._measure import ROOT, median, percentile, rss_mb, run_worker, verdict
from benchmarks._upstream import start_upstream

PARTS = ("fair", "weights", "deadline", "cpu", "startup")
SLOTS = 4
UPSTREAM_SECONDS = 0.2


# --- workers (run in a fresh interpreter, on this tree or on the baseline's) -------------------------


def _engine(url: str, *, tenants: dict[str, Any] | None = None, max_in_flight: int = SLOTS) -> Any:
    from dspy_trio.engine import EngineConfig, LMConfig, open_engine

    lm = LMConfig.from_mapping(
        {"provider": "openai", "model": "bench", "api_base": url, "retry": {"max_attempts": 1}}
    )
    changes: dict[str, Any] = {"tenants": tenants} if tenants else {}
    config = EngineConfig(lms={"default": lm}, max_in_flight=max_in_flight, max_queued=100_000, **changes)
    return open_engine(config)


def _predict(engine: Any) -> Callable[..., Any]:
    """``engine.predict``, with ``tenant=`` dropped on a tree that has no tenants (everyone one tenant)."""
    if "tenant" in inspect.signature(engine.predict).parameters:
        return engine.predict  # type: ignore[no-any-return]

    async def predict(program: str, inputs: dict[str, Any], *, tenant: str | None = None) -> Any:
        return await engine.predict(program, inputs)

    return predict


async def _closed_loops(
    predict: Callable[..., Any],
    loops: dict[str, int],
    seconds: float,
    tenant_of: Callable[[str], str] = lambda name: name,
) -> dict[str, list[tuple[float, float]]]:
    """``loops[name]`` clients each sending its next request when the last one ends, for ``seconds``, as
    the tenant ``tenant_of(name)``. Returns each name's (latency, when it got its slot, counted from the
    start) of the requests that got their slot before the end (what is still queued then drains alone,
    in any order)."""
    import trio

    done: dict[str, list[tuple[float, float]]] = {tenant: [] for tenant in loops}
    begin = trio.current_time()
    end = begin + seconds

    async def client(tenant: str, index: int) -> None:
        i = 0
        while trio.current_time() < end:
            started = trio.current_time()
            result = await predict("default", {"question": f"{tenant} {index} {i}"}, tenant=tenant_of(tenant))
            if started + result.timings.queued < end:
                slot = started + result.timings.queued - begin
                done[tenant].append((trio.current_time() - started, slot))
            i += 1

    async with trio.open_nursery() as nursery:
        for tenant, count in loops.items():
            for index in range(count):
                nursery.start_soon(client, tenant, index)
    return done


def _worker_fair(url: str, mode: str, seconds: float) -> dict[str, Any]:
    import trio

    loops = {"quiet": 2} if mode == "alone" else {"quiet": 2, "noisy": 40}
    # fair: two tenants; one-tenant: both in one (FIFO); a baseline without tenants ignores them.
    tenant_of: Callable[[str], str] = (lambda name: name) if mode != "one-tenant" else (lambda name: "all")

    async def run() -> dict[str, Any]:
        async with _engine(url) as engine:
            predict = _predict(engine)
            await _closed_loops(predict, {"quiet": 2}, 1.0)  # warm-up: connections, measured service
            done = await _closed_loops(predict, loops, seconds, tenant_of)
        quiet = [latency for latency, _ in done["quiet"]]
        if not quiet:
            raise SystemExit(f"no request of the quiet tenant got a slot in {seconds}s: run longer")
        return {"quiet_p50_ms": statistics.median(quiet) * 1000, "quiet_n": len(quiet)}

    return trio.run(run)


def _worker_weights(url: str, seconds: float) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import TenantConfig

    tenants = {"heavy": TenantConfig(weight=3), "light": TenantConfig(weight=1)}

    async def run() -> dict[str, Any]:
        async with _engine(url, tenants=tenants) as engine:
            await _closed_loops(engine.predict, {"light": 2}, 1.0)
            done = await _closed_loops(engine.predict, {"heavy": 20, "light": 20}, seconds + 1)
        # Both saturating: the slots given after the first second (the 40 clients' first arrivals
        # race for the first slots in any order).
        return {name: sum(slot >= 1.0 for _, slot in done[name]) for name in ("heavy", "light")}

    return trio.run(run)


class _Outcomes(logging.Handler):
    """Counts the engine's request log lines: outcomes, and timeouts of requests that never got a slot
    (a line without ``queued_ms``) — the same on every tree."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, int] = {}
        self.timed_out_queued = 0
        self.timed_out_after_waiting = 0

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(record.getMessage())
        outcome = f"{line['outcome']}:{line['error']}" if line.get("error") else line["outcome"]
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if line["outcome"] == "timed_out" and "queued_ms" not in line:
            self.timed_out_queued += 1
        elif line["outcome"] == "timed_out" and line["queued_ms"] > 1:
            self.timed_out_after_waiting += 1


def _worker_deadline(url: str, seconds: float) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import OverloadedError

    counter = _Outcomes()
    log = logging.getLogger("dspy_trio.engine.requests")
    log.addHandler(counter)
    log.setLevel(logging.INFO)
    log.propagate = False
    rate = 2 * SLOTS / UPSTREAM_SECONDS
    refusals: list[float] = []

    async def run() -> None:
        async with _engine(url) as engine:
            await _closed_loops(_predict(engine), {"warm": 4}, 1.0)
            counter.outcomes.clear()

            async def one(i: int) -> None:
                started = time.perf_counter()
                with trio.move_on_after(1.0):
                    try:
                        await engine.predict("default", {"question": f"overload {i}"})
                    except OverloadedError:
                        refusals.append(time.perf_counter() - started)

            async with trio.open_nursery() as nursery:
                for i in range(int(rate * seconds)):
                    nursery.start_soon(one, i)
                    await trio.sleep(1 / rate)

    trio.run(run)
    return {
        "requests": int(rate * seconds),
        "outcomes": counter.outcomes,
        "timed_out_in_queue": counter.timed_out_queued,
        "timed_out_after_waiting": counter.timed_out_after_waiting,
        "refused": len(refusals),
        "refusal_p50_ms": percentile(refusals, 0.5) * 1000 if refusals else None,
        "refusal_p99_ms": percentile(refusals, 0.99) * 1000 if refusals else None,
    }


def _worker_cpu(url: str, n: int) -> dict[str, Any]:
    import trio

    async def run() -> dict[str, Any]:
        async with _engine(url, max_in_flight=64) as engine:
            limiter = trio.CapacityLimiter(64)

            async def one(i: int) -> None:
                async with limiter:
                    await engine.predict("default", {"question": f"cpu {i}"})

            async def wave(count: int) -> None:
                async with trio.open_nursery() as nursery:
                    for i in range(count):
                        nursery.start_soon(one, i)

            await wave(256)  # warm-up
            started = time.process_time()
            await wave(n)
            return {"cpu_ms": (time.process_time() - started) / n * 1000}

    return trio.run(run)


def _worker_startup(count: int, mode: str) -> dict[str, Any]:
    """Read a config of ``count`` tenants, build the key ring, open the engine, serve one request:
    ``time`` measures wall and CPU seconds, ``memory`` what stays allocated (tracemalloc, which slows
    everything down: a run of its own) and the growth of the resident set."""
    import trio

    lines = ['[lms.default]\nprovider = "simulated"\n']
    for i in range(count):
        lines.append(f'[tenants.t{i}]\nkeys = ["key-{i:05d}-0123456789abcdef"]\nweight = {1 + i % 5}\n')
    path = Path(tempfile.mkstemp(suffix=".toml")[1])
    path.write_text("\n".join(lines))
    import dspy_trio.engine  # imports are not the tenants' cost
    import dspy_trio.web.keys  # noqa: F401

    before_rss = rss_mb()
    if mode == "memory":
        tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()

    async def run() -> dict[str, Any]:
        from dspy_trio.engine import EngineConfig, open_engine
        from dspy_trio.web.keys import KeyRing

        config = EngineConfig.from_toml(path)
        ring = KeyRing.build((), config.tenants)
        async with open_engine(config) as engine:
            result: dict[str, Any] = {
                "tenants": len(config.tenants),
                "startup_s": time.perf_counter() - wall,
                "startup_cpu_s": time.process_time() - cpu,
            }
            if mode == "memory":
                held, peak = tracemalloc.get_traced_memory()
                result.update(held_mb=held / 2**20, peak_mb=peak / 2**20)
            tenant = ring.tenant_of("key-09999-0123456789abcdef")
            await engine.predict("default", {"question": "q"}, tenant=tenant)
            result["rss_growth_mb"] = rss_mb() - before_rss
            return result

    try:
        return trio.run(run)
    finally:
        path.unlink()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "fair":
        return _worker_fair(args.url, args.mode, args.seconds)
    if args.worker == "weights":
        return _worker_weights(args.url, args.seconds)
    if args.worker == "deadline":
        return _worker_deadline(args.url, args.seconds)
    if args.worker == "cpu":
        return _worker_cpu(args.url, args.n)
    if args.worker == "startup":
        return _worker_startup(args.count, args.mode)
    raise SystemExit(f"unknown worker {args.worker}")


# --- the orchestration -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the cpu part")
    parser.add_argument("--n", type=int, default=2000, help="predictions per cpu round")
    parser.add_argument("--count", type=int, default=10_000, help="tenants of the startup part")
    parser.add_argument("--baseline", default=None, help=BASELINE_HELP)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    def run(tree: Path, name: str, *extra: str, url: str = "") -> dict[str, Any]:
        arguments = ["--worker", name, "--url", url, "--seconds", str(args.seconds), *extra]
        arguments += ["--n", str(args.n), "--count", str(args.count)]
        return run_worker("benchmarks.tenants", arguments, tree=tree)

    results: dict[str, Any] = {}
    with baseline_tree(args.baseline, prefix="tenants-baseline-") as baseline:
        before = baseline[0] if baseline is not None else None
        slow, slow_url = start_upstream(UPSTREAM_SECONDS)
        fast, fast_url = start_upstream(0.02)
        try:
            if "fair" in args.parts:
                alone = run(ROOT, "fair", "--mode", "alone", url=slow_url)
                # FIFO: the baseline's admission; without one, both loops in one tenant here.
                fifo = run(before or ROOT, "fair", "--mode", "fair" if before else "one-tenant", url=slow_url)
                fair = run(ROOT, "fair", "--mode", "fair", url=slow_url)
                results["fair"] = {"alone": alone, "fifo": fifo, "fair": fair}
            if "weights" in args.parts:
                results["weights"] = run(ROOT, "weights", url=slow_url)
            if "deadline" in args.parts:
                results["deadline"] = {
                    "today": run(before, "deadline", url=slow_url) if before else None,
                    "now": run(ROOT, "deadline", url=slow_url),
                }
            if "cpu" in args.parts:
                rounds: dict[str, list[dict[str, Any]]] = {"today": [], "now": []}
                for _ in range(args.rounds):
                    if before is not None:
                        rounds["today"].append(run(before, "cpu", url=fast_url))
                    rounds["now"].append(run(ROOT, "cpu", url=fast_url))
                results["cpu"] = rounds
            if "startup" in args.parts:
                results["startup"] = {
                    **run(ROOT, "startup", "--mode", "memory"),
                    **run(ROOT, "startup", "--mode", "time"),
                }
        finally:
            slow.kill()
            fast.kill()
    print(json.dumps(results))
    _summary(results, args)


def _summary(results: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    if fair := results.get("fair"):
        alone = fair["alone"]["quiet_p50_ms"]
        for name in ("fifo", "fair"):
            p50 = fair[name]["quiet_p50_ms"]
            goal = f"(goal <= 1.5x: {verdict(p50 <= 1.5 * alone)})" if name == "fair" else "(FIFO)"
            print(
                f"quiet tenant p50, {name:4}: {p50:7.1f} ms = {p50 / alone:5.2f}x alone "
                f"({alone:.1f} ms) {goal}"
            )
    if weights := results.get("weights"):
        ratio = weights["heavy"] / weights["light"] if weights["light"] else float("inf")
        ok = abs(ratio - 3) <= 0.3
        print(
            f"weights 3:1: {weights['heavy']} vs {weights['light']} completions = {ratio:.2f}:1 "
            f"({verdict(ok)})"
        )
    if deadline := results.get("deadline"):
        for name in ("today", "now"):
            run = deadline[name]
            if run is None:
                continue
            refusal = run["refusal_p99_ms"]
            shown = f"{refusal:.2f} ms" if refusal is not None else "none"
            doomed = run["timed_out_in_queue"] + run["timed_out_after_waiting"]
            print(
                f"overload {name:5}: of {run['requests']}, {doomed} waited and timed out "
                f"({run['timed_out_in_queue']} in the queue, "
                f"{run['timed_out_after_waiting']} in a call they got too late), "
                f"{run['refused']} refused (p99 {shown}); outcomes {run['outcomes']}"
            )
        now = deadline["now"]
        ok = now["timed_out_in_queue"] == 0 and (now["refusal_p99_ms"] or 0) < 10
        print(f"  goal: 0 timed out in the queue, refusal p99 < 10 ms: {verdict(ok)}")
    if cpu := results.get("cpu"):
        now = median(cpu["now"], "cpu_ms")
        if cpu["today"]:
            today = median(cpu["today"], "cpu_ms")
            print(
                f"engine CPU per prediction at 64 concurrent: {now:.3f} ms now vs {today:.3f} ms today = "
                f"{now / today:.3f}x (goal <= 1.05x: {verdict(now <= 1.05 * today)})"
            )
        else:
            print(f"engine CPU per prediction at 64 concurrent: {now:.3f} ms (no baseline)")
    if startup := results.get("startup"):
        print(
            f"{startup['tenants']:,} tenants: start-up {startup['startup_cpu_s']:.3f} s of CPU "
            f"({startup['startup_s']:.3f} s wall; goal < 1 s: {verdict(startup['startup_cpu_s'] < 1)}), "
            f"memory held {startup['held_mb']:.1f} MB (goal < 20 MB: {verdict(startup['held_mb'] < 20)}), "
            f"peak while parsing {startup['peak_mb']:.1f} MB, RSS +{startup['rss_growth_mb']:.1f} MB"
        )


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    main()
