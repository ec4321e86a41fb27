"""Single-flight and the response cache, in one run: upstream calls saved, what a shared or cached answer
costs against a full prediction, what the miss path costs against single-flight off, Redis round trips
per Redis-backed hit, stream fan-out, and how fast the last waiter's leaving closes the upstream socket.

Measurements of CPU run each mode in a fresh worker process (modes alternate over ``--rounds``; medians
are shown) against an upstream in its own process; the table shows the goals as ratios::

    python -m benchmarks.coalescing                    # everything, 3 rounds
    python -m benchmarks.coalescing --parts cpu --rounds 5 --n 3000
    python -m benchmarks.coalescing --parts cpu --cpu-modes off miss --rounds 8 --baseline REF

Each ratio is the median of the rounds' ratios (the two measurements of a round run one after the
other), printed with their range: on a shared machine one round's ratio swings by 20%.

Parts:
  calls   1,000 concurrent identical predictions, in process and over HTTP (``dspy-trio serve``), and 10
          questions x 100 concurrent each in process; upstream requests as the fake upstream counted
          them. Goals: 1, 1 and 10.
  cpu     engine CPU per prediction in process, 64 concurrent, 20 ms canned upstream, lean transport:
          ``off`` (single-flight and cache off: the path without the layer), ``miss`` (single-flight on,
          distinct questions: the default path), ``coalesced`` (questions in groups of 64 identical:
          a waiter's own cost is what is left once the group's one full prediction is counted), ``hit``
          (memory cache, every answer cached), off and miss again with the collector as ``dspy-trio
          serve`` sets it (``-tuned``), the same prediction on a baseline tree (``--baseline``, default
          the merge base of HEAD and main: the engine before single-flight), and the floor
          (``benchmarks.floor``). Goals: miss <= 1.05x off and the baseline; a coalesced waiter <= 0.3x
          a full prediction; miss <= 2.0x the floor. A waiter or a hit of a ``Predict`` program shares
          the whole prediction (no adapter work); the miss path is the prediction's flight.
  http    ``dspy-trio serve``'s CPU per request (16 keep-alive clients, 20 ms upstream, memory cache):
          misses (distinct questions) against hits (one question). Goal: hit <= 0.5x miss.
  redis   Redis round trips (counted by the engine's link) per Redis-backed hit, and per miss. Goal: a
          hit <= 2.
  fanout  100 identical streams in process of one upstream stream at 20,000 tokens/s (a synthetic
          backend pacing 20,000 tokens over 1 s): the upstream read's rate against its pace with every
          consumer reading, and with one more that reads nothing under ``drop``; every reading consumer
          gets the whole text. Goals: the read keeps >= 0.95x its pace, and the stalled consumer costs
          it <= 5%.
  close   three identical predictions against a 60 s upstream, cancelled one after another: the delay
          from the last one leaving to the upstream seeing its connection closed, over 30 trials.
          Goal: <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks._baseline import export_tree
from benchmarks._canned_upstream import start_canned_upstream
from benchmarks._measure import ROOT, median, process_cpu, run_worker, verdict
from benchmarks._upstream import start_upstream

CPU_MODES = ("off", "miss", "coalesced", "hit", "off-tuned", "miss-tuned")
GROUP = 64  # concurrency of the cpu part, and the size of a group of identical questions


def _cache(mode: str) -> Any:
    if mode == "today":  # a baseline tree: no [cache] at all
        return None

    from dspy_trio.engine import CacheConfig

    if mode == "off":
        return CacheConfig(single_flight=False)
    if mode == "hit":
        return CacheConfig(backend="memory")
    return CacheConfig()


def _engine(url: str, cache: Any, concurrency: int, **cluster: Any) -> Any:
    from dspy_trio.engine import EngineConfig, LMConfig, open_engine
    from dspy_trio.engine._cluster_config import ClusterConfig
    from dspy_trio.engine.lm import HTTPSettings, OpenAICompatibleLM

    # The flat table every tree takes (a --baseline worker runs on the other tree's engine).
    table = {"provider": "openai", "model": "bench", "api_base": url, "retry": {"max_attempts": 1}}
    lm_config = LMConfig.from_mapping(table)
    config = EngineConfig(
        lms={"default": lm_config},
        max_in_flight=concurrency,
        max_queued=100_000,
        cluster=ClusterConfig(**cluster) if cluster else ClusterConfig(),
        **({"cache": cache} if cache is not None else {}),
    )
    lm = OpenAICompatibleLM("bench", api_base=url, http=HTTPSettings(client="lean"))
    return open_engine(config, lms={"default": lm})


# ------------------------------------------------------------------------------------------------ workers


def _cpu_worker(url: str, mode: str, n: int) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import tune_gc_for_serving

    mode, _, gc_mode = mode.partition("-")

    async def run() -> dict[str, Any]:
        async with _engine(url, _cache(mode), GROUP) as engine:
            for i in range(20):
                await engine.predict("default", {"question": f"warm-up {i}"})
            if gc_mode == "tuned":  # the collector as `dspy-trio serve` sets it once started
                tune_gc_for_serving()
            if mode == "hit":  # every answer of the run in the cache already
                for i in range(GROUP):
                    await engine.predict("default", {"question": f"cached {i}"})
            limit = trio.Semaphore(GROUP)

            def question(i: int) -> str:
                if mode == "coalesced":
                    return f"group {i // GROUP}"
                if mode == "hit":
                    return f"cached {i % GROUP}"
                return f"question number {i}"

            async def one(i: int) -> None:
                async with limit:
                    await engine.predict("default", {"question": question(i)})

            before = getattr(engine.statistics(), "sharing", None)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            after = getattr(engine.statistics(), "sharing", None)
            saved = (after.upstream_calls_saved - before.upstream_calls_saved) if after and before else 0
            return {"cpu_ms": cpu / n * 1000, "wall": wall, "saved": saved, "n": n}

    return dict(trio.run(run))


def _redis_worker(upstream: str, redis_url: str, n: int) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import CacheConfig

    async def run() -> dict[str, Any]:
        cache = CacheConfig(backend="redis", ttl=600)
        async with _engine(
            upstream, cache, GROUP, redis_url=redis_url, key_prefix=f"bench-{os.getpid()}"
        ) as engine:
            link = engine.cluster.link
            await trio.sleep(0.5)  # the first heartbeat and the subscription
            misses0 = link.round_trips
            for i in range(n):
                await engine.predict("default", {"question": f"question {i}"})
            await trio.sleep(0.5)  # the queued announcements (stores) are sent
            miss_trips = (link.round_trips - misses0) / n
            hits0, wall0 = link.round_trips, time.perf_counter()
            for i in range(n):
                result = await engine.predict("default", {"question": f"question {i}"})
                assert result.timings.cached, "expected a hit"
            wall = time.perf_counter() - wall0
            heartbeats = wall / engine.config.cluster.heartbeat_interval + 1
            return {
                "hit_round_trips": (link.round_trips - hits0) / n,
                "hit_round_trips_less_heartbeats": (link.round_trips - hits0 - heartbeats) / n,
                "miss_round_trips": miss_trips,
            }

    return dict(trio.run(run))


def _fanout_worker(waiters: int, tokens: int, rate: float, stalled: bool) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import EngineConfig, FieldDelta, FinalEvent, StreamOptions, open_engine
    from dspy_trio.engine.lm import Completion, TrioLM

    words = [f"w{i} " for i in range(tokens)]
    answer = "[[ ## answer ## ]]\n" + "".join(words) + "\n\n[[ ## completed ## ]]"

    class Firehose(TrioLM):
        """Streams ``tokens`` tokens at ``rate`` a second (bursts every millisecond)."""

        read_seconds = 0.0

        def __init__(self) -> None:
            super().__init__("firehose")

        async def complete(
            self, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any], sink: Any
        ) -> Any:
            pieces = ["[[ ## answer ## ]]\n", *words, "\n\n[[ ## completed ## ]]"]
            start = trio.current_time()
            for index, piece in enumerate(pieces):
                due = start + index / rate
                if due - trio.current_time() > 0.001:
                    await trio.sleep_until(due)
                if sink is not None:
                    await sink.send(piece)
            Firehose.read_seconds = trio.current_time() - start
            return Completion([answer], {"prompt_tokens": 10, "completion_tokens": tokens})

    async def run() -> dict[str, Any]:
        async with open_engine(
            EngineConfig(max_in_flight=waiters + 8), lms={"default": Firehose()}
        ) as engine:
            texts: list[str] = []

            async def read() -> None:
                text = []
                async with engine.stream("default", {"question": "fan out"}) as events:
                    async for event in events:
                        if isinstance(event, FieldDelta):
                            text.append(event.text)
                        elif isinstance(event, FinalEvent):
                            texts.append("".join(text))

            cpu0 = time.process_time()
            async with trio.open_nursery() as nursery:
                for _ in range(waiters):
                    nursery.start_soon(read)
                if stalled:  # one more consumer that reads nothing until the upstream has finished
                    options = StreamOptions(backpressure="drop", buffer_size=4)
                    async with engine.stream("default", {"question": "fan out"}, options=options) as events:
                        await trio.sleep(tokens / rate + 0.5)
                        async for _event in events:
                            pass
            cpu = time.process_time() - cpu0
            whole = "".join(words).strip()
            return {
                "read_seconds": Firehose.read_seconds,
                "pace_ratio": (tokens / rate) / Firehose.read_seconds,
                "complete_texts": sum(t.strip() == whole for t in texts),
                "readers": len(texts),
                "cpu_s": cpu,
            }

    return dict(trio.run(run))


def _close_worker(trials: int) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import EngineConfig, LMConfig, open_engine
    from dspy_trio.engine.testing.fake_upstream import Behavior, open_fake_upstream

    async def run() -> dict[str, Any]:
        delays: list[float] = []
        async with open_fake_upstream(Behavior(latency=60)) as upstream:
            lm = LMConfig.from_mapping(
                {"provider": "openai", "model": "m", "api_base": upstream.url, "api_key": "k"}
            )
            async with open_engine(EngineConfig(lms={"default": lm})) as engine:
                for trial in range(trials):
                    scopes = [trio.CancelScope() for _ in range(3)]

                    async def predict(scope: trio.CancelScope, trial: int = trial) -> None:
                        with scope:
                            await engine.predict("default", {"question": f"trial {trial}"})

                    async with trio.open_nursery() as nursery:
                        for scope in scopes:
                            nursery.start_soon(predict, scope)
                        while len(upstream.records) <= trial:  # noqa: ASYNC110 - the upstream's own state
                            await trio.sleep(0.001)
                        for scope in scopes[:2]:
                            scope.cancel()
                            await trio.sleep(0.01)
                        scopes[2].cancel()
                        left_at = trio.current_time()
                    record = upstream.records[trial]
                    with trio.fail_after(10):
                        await upstream.wait_for(lambda u, record=record: record.ended)
                    assert record.client_closed_at is not None, "the upstream answered instead"
                    delays.append(record.client_closed_at - left_at)
        delays.sort()
        return {
            "p50_ms": delays[len(delays) // 2] * 1000,
            "p99_ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000,
            "max_ms": delays[-1] * 1000,
            "upstream_requests": trials,
        }

    return dict(trio.run(run))


# --------------------------------------------------------------------------------------------------- calls


def _records(upstream_url: str) -> int:
    import httpx

    root = upstream_url.removesuffix("/v1")
    return len(httpx.get(f"{root}/_fake/records", timeout=30).json()["records"])


def _calls_in_process(upstream_url: str) -> dict[str, int]:
    import trio

    async def run() -> dict[str, int]:
        async with _engine(upstream_url, _cache("miss"), 2048) as engine:
            before = _records(upstream_url)
            async with trio.open_nursery() as nursery:
                for _ in range(1000):
                    nursery.start_soon(engine.predict, "default", {"question": "one question"})
            identical = _records(upstream_url) - before
            before = _records(upstream_url)
            async with trio.open_nursery() as nursery:
                for question in range(10):
                    for _ in range(100):
                        nursery.start_soon(engine.predict, "default", {"question": f"question {question}"})
            distinct = _records(upstream_url) - before
            assert engine.statistics().succeeded == 2000
        return {"identical_1000": identical, "questions_10x100": distinct}

    return dict(trio.run(run))


def _calls_over_http(upstream_url: str) -> dict[str, Any]:
    import trio

    from benchmarks.hotpath_http import _connect, start_ours, stop

    os.environ["DSPY_TRIO_CACHE"] = "off"
    server, url = start_ours(upstream_url, in_flight=2048, queued=0)
    host = url.removeprefix("http://")
    body = b'{"inputs":{"question":"one question over http"}}'
    request = (
        f"POST /v1/programs/default/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def run() -> dict[str, Any]:
        conns = await _connect(url, 1000)
        before = _records(upstream_url)
        statuses: dict[int, int] = {}

        async def one(conn: Any) -> None:
            status, _, _ = await conn.exchange(request)
            statuses[status] = statuses.get(status, 0) + 1

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(one, conn)
        for conn in conns:
            await conn.stream.aclose()
        return {"identical_1000_http": _records(upstream_url) - before, "statuses": statuses}

    try:
        return dict(trio.run(run))
    finally:
        stop(server)
        del os.environ["DSPY_TRIO_CACHE"]


# ---------------------------------------------------------------------------------------------------- http


def _http_cpu(upstream_url: str, clients: int, n: int) -> dict[str, float]:
    import trio

    from benchmarks.hotpath_http import _connect, start_ours, stop

    os.environ["DSPY_TRIO_CACHE"] = "memory"
    server, url = start_ours(upstream_url, in_flight=256, queued=4096)
    host = url.removeprefix("http://")

    def request(question: str) -> bytes:
        body = json.dumps({"inputs": {"question": question}}).encode()
        head = (
            f"POST /v1/programs/default/predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def load(conns: list[Any], questions: Any, count: int) -> dict[int, int]:
        statuses: dict[int, int] = {}
        numbers = iter(range(count))

        async def client(conn: Any) -> None:
            for i in numbers:
                status, _, _ = await conn.exchange(request(questions(i)))
                statuses[status] = statuses.get(status, 0) + 1

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(client, conn)
        return statuses

    async def run() -> dict[str, float]:
        conns = await _connect(url, clients)
        await load(conns, lambda i: f"warm-up {i}", 300)
        await load(conns, lambda i: "the cached question", 1)
        result: dict[str, float] = {}
        for kind, questions in (
            ("miss", lambda i: f"question number {i:08d}"),
            ("hit", lambda i: "the cached question"),
            ("miss2", lambda i: f"another question {i:08d}"),
            ("hit2", lambda i: "the cached question"),
        ):
            cpu0 = process_cpu(server.pid)
            statuses = await load(conns, questions, n)
            assert statuses == {200: n}, statuses
            result[kind] = (process_cpu(server.pid) - cpu0) / n * 1000
        for conn in conns:
            await conn.stream.aclose()
        return {
            "miss_ms": (result["miss"] + result["miss2"]) / 2,
            "hit_ms": (result["hit"] + result["hit2"]) / 2,
        }

    try:
        return dict(trio.run(run))
    finally:
        stop(server)
        del os.environ["DSPY_TRIO_CACHE"]


# ---------------------------------------------------------------------------------------------------- main


def _run(worker: str, args: argparse.Namespace, tree: Path = ROOT, **extra: Any) -> dict[str, Any]:
    arguments = ["--worker", worker, "--n", str(args.n)]
    for key, value in extra.items():
        arguments += [f"--{key}", str(value)]
    result = run_worker("benchmarks.coalescing", arguments, tree=tree)
    print(f"  {worker:18s} {json.dumps(result)}", file=sys.stderr)
    return result


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    kind, _, option = args.worker.partition(":")
    if kind == "cpu":
        return _cpu_worker(args.url, option, args.n)
    if kind == "floor":
        from benchmarks.floor import measure

        return measure(args.url, args.n)
    if kind == "redis":
        return _redis_worker(args.url, args.redis, min(args.n, 500))
    if kind == "fanout":
        return _fanout_worker(100, 20_000, 20_000.0, stalled=option == "stalled")
    if kind == "close":
        return _close_worker(30)
    raise SystemExit(f"unknown worker {args.worker}")


def _paired(runs: Mapping[str, list[dict[str, Any]]], mode: str, against: str) -> str:
    """``mode``'s CPU against ``against``'s: the median of the rounds' ratios (each round's two
    measurements ran one after the other), and their range."""
    ratios = sorted(a["cpu_ms"] / b["cpu_ms"] for a, b in zip(runs[mode], runs[against], strict=True))
    return f"{statistics.median(ratios):.3f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"


def _cpu_lines(runs: Mapping[str, list[dict[str, Any]]], rounds: int, commit: str) -> list[str]:
    """Part cpu's lines: each ratio as the median of the rounds' ratios, with their range."""

    def ms(mode: str) -> str:
        return f"{median(runs[mode], 'cpu_ms'):.3f} ms"

    def ratio(mode: str, against: str) -> float:
        pairs = zip(runs[mode], runs[against], strict=True)
        return float(statistics.median(a["cpu_ms"] / b["cpu_ms"] for a, b in pairs))

    lines = [
        f"engine CPU per prediction (64 concurrent, {rounds} rounds, medians): off {ms('off')}, miss "
        f"{ms('miss')} = {_paired(runs, 'miss', 'off')} off (goal <= 1.05x: "
        f"{verdict(ratio('miss', 'off') <= 1.05)}); the floor {median(runs['floor'], 'floor64_ms'):.3f} ms, "
        f"miss {median(runs['miss'], 'cpu_ms') / median(runs['floor'], 'floor64_ms'):.2f}x it"
    ]
    if runs.get("miss-tuned"):
        lines.append(
            f"with the collector tuned as served: off {ms('off-tuned')}, miss {ms('miss-tuned')} = "
            f"{_paired(runs, 'miss-tuned', 'off-tuned')} (goal <= 1.05x: "
            f"{verdict(ratio('miss-tuned', 'off-tuned') <= 1.05)})"
        )
    if runs.get("today"):
        line = (
            f"against the engine before single-flight ({commit}): today {ms('today')}, miss "
            f"{_paired(runs, 'miss', 'today')} (goal <= 1.05x: {verdict(ratio('miss', 'today') <= 1.05)}), "
            f"off {_paired(runs, 'off', 'today')}"
        )
        if runs.get("today-tuned") and runs.get("miss-tuned"):
            line += (
                f"; tuned: today {ms('today-tuned')}, miss {_paired(runs, 'miss-tuned', 'today-tuned')} "
                f"(goal <= 1.05x: {verdict(ratio('miss-tuned', 'today-tuned') <= 1.05)})"
            )
        lines.append(line)
    if runs.get("coalesced"):
        costs = []
        for group, full in zip(runs["coalesced"], runs["miss"], strict=True):
            n, saved = group["n"], group["saved"]
            waiter = (group["cpu_ms"] * n - (n - saved) * full["cpu_ms"]) / max(saved, 1)
            costs.append(waiter / full["cpu_ms"])
        costs.sort()
        lines.append(
            f"a coalesced waiter {statistics.median(costs):.2f}x a full prediction (rounds "
            f"{costs[0]:.2f}-{costs[-1]:.2f}; goal <= 0.3x: {verdict(statistics.median(costs) <= 0.3)})"
        )
    if runs.get("hit"):
        lines.append(f"a memory-cache hit {ms('hit')} = {_paired(runs, 'hit', 'miss')} a miss")
    return lines


def _baseline(ref: str | None) -> tuple[Path | None, str]:
    """The tree part cpu measures as 'today' (None: none), and its commit."""
    if ref == "none":
        return None, ""
    if ref is None:
        ref = subprocess.run(
            ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        if ref == head:
            return None, ""
    tree, commit = export_tree(ref, prefix="coalescing-baseline-")
    print(f"baseline: {commit} ({tree})", file=sys.stderr)
    return tree, commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["calls", "cpu", "http", "redis", "fanout", "close"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000, help="predictions (requests) per CPU measurement")
    parser.add_argument("--clients", type=int, default=16, help="keep-alive clients of part http")
    parser.add_argument(
        "--cpu-modes",
        nargs="+",
        default=list(CPU_MODES),
        choices=CPU_MODES,
        help="the modes part cpu measures (off and miss always; coalesced and hit for their ratios)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="git ref of part cpu's 'today' (default: the merge base of HEAD and main; 'none' to skip)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    lines: list[str] = []
    if "calls" in args.parts:
        upstream, url = start_upstream(2.0)
        try:
            local = _calls_in_process(url)
        finally:
            upstream.kill()
        upstream, url = start_upstream(15.0)  # long enough for all 1,000 requests to be in at once
        try:
            remote = _calls_over_http(url)
        finally:
            upstream.kill()
        print(f"  calls              {json.dumps({**local, **remote})}", file=sys.stderr)
        lines.append(
            f"upstream calls: 1,000 identical concurrent predictions in process {local['identical_1000']} "
            f"(goal 1: {verdict(local['identical_1000'] == 1)}), over HTTP {remote['identical_1000_http']} "
            f"(goal 1: {verdict(remote['identical_1000_http'] == 1)}, statuses {remote['statuses']}); "
            f"10 questions x 100: {local['questions_10x100']} (goal 10: "
            f"{verdict(local['questions_10x100'] == 10)})"
        )
    if "cpu" in args.parts:
        baseline, commit = _baseline(args.baseline)
        upstream, url = start_canned_upstream(0.02)
        try:
            chosen = tuple(m for m in CPU_MODES if m in {"off", "miss", *args.cpu_modes})
            tuned = any(m.endswith("-tuned") for m in chosen)
            modes = (*chosen, *((("today", "today-tuned") if tuned else ("today",)) if baseline else ()))
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in (*modes, "floor")}
            for _ in range(args.rounds):
                for mode in modes:
                    tree = baseline if baseline is not None and mode.startswith("today") else ROOT
                    runs[mode].append(_run(f"cpu:{mode}", args, tree, url=url))
                runs["floor"].append(_run("floor", args, url=url))
        finally:
            upstream.kill()
            if baseline is not None:
                shutil.rmtree(baseline, ignore_errors=True)
        lines.extend(_cpu_lines(runs, args.rounds, commit))
    if "http" in args.parts:
        upstream, url = start_upstream(0.02)
        try:
            http = [_http_cpu(url, args.clients, args.n) for _ in range(args.rounds)]
        finally:
            upstream.kill()
        for run in http:
            print(f"  http               {json.dumps(run)}", file=sys.stderr)
        miss_ms, hit_ms = median(http, "miss_ms"), median(http, "hit_ms")
        ratios = sorted(run["hit_ms"] / run["miss_ms"] for run in http)
        lines.append(
            f"server CPU per request over HTTP ({args.rounds} rounds, medians): miss {miss_ms:.3f} ms, hit "
            f"{hit_ms:.3f} ms = {statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}; "
            f"goal <= 0.5x: {verdict(statistics.median(ratios) <= 0.5)})"
        )
    if "redis" in args.parts:
        from benchmarks.scaleout import start_redis

        redis, redis_url = start_redis()
        upstream, url = start_canned_upstream(0.005)
        try:
            result = _run("redis", args, url=url, redis=redis_url)
        finally:
            upstream.kill()
            redis.kill()
        trips, bare = result["hit_round_trips"], result["hit_round_trips_less_heartbeats"]
        lines.append(
            f"Redis round trips per Redis-backed hit {trips:.2f} ({bare:.2f} without heartbeats; goal <= 2: "
            f"{verdict(trips <= 2)}), per miss {result['miss_round_trips']:.2f}"
        )
    if "fanout" in args.parts:
        plain = [_run("fanout:plain", args) for _ in range(args.rounds)]
        stalled = [_run("fanout:stalled", args) for _ in range(args.rounds)]
        pace, pace_stalled = median(plain, "pace_ratio"), median(stalled, "pace_ratio")
        complete = min(r["complete_texts"] for r in plain + stalled)
        lines.append(
            f"fan-out, 100 streams of one 20,000 tokens/s upstream stream: the read at {pace:.2f}x its pace "
            f"(goal >= 0.95x: {verdict(pace >= 0.95)}), {complete}/100 streams with the whole text; with a "
            f"consumer that reads nothing under drop {pace_stalled:.2f}x, its cost "
            f"{max(0.0, 1 - pace_stalled / pace):.1%} (goal <= 5%: {verdict(pace_stalled / pace >= 0.95)}); "
            f"CPU {median(plain, 'cpu_s'):.2f} s for the 1 s stream"
        )
    if "close" in args.parts:
        close = [_run("close", args) for _ in range(args.rounds)]
        worst = max(r["max_ms"] for r in close)
        lines.append(
            f"last waiter leaves -> upstream connection closed: p50 {median(close, 'p50_ms'):.1f} ms, p99 "
            f"{median(close, 'p99_ms'):.1f} ms, max of all {worst:.1f} ms over {30 * args.rounds} trials "
            f"(goal <= 50 ms: {verdict(worst <= 50)})"
        )
    print("\nsingle-flight and the response cache")
    for line in lines:
        print(f"  {line}")


if __name__ == "__main__":
    main()
