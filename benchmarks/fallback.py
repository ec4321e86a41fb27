"""Fallbacks and circuit breakers, in one run: a primary LM that fails while a backup is healthy.

``python -m benchmarks.fallback [--outage 30] [--clients 16] [--rounds 5]``. The engine runs in this
process with an OpenAI-compatible primary (``fallbacks = ["backup"]``, breaker: ``min_calls`` 10,
``failure_ratio`` 0.5, ``window`` 10 s, ``open_for`` 5 s, ``half_open_calls`` 1; ``timeouts.attempt``
1 s) and backup, each a fake upstream in a process of its own (50 ms per answer), under ``--clients``
closed-loop callers with a 10 s deadline each. Parts, each with its goal:

  outage    the backup alone first (its own p50), then the primary answers 503 to everything for
            ``--outage`` seconds: failed requests (goal 0); calls that reached the primary while its
            breaker was open (goal <= half_open_calls per open_for); p50 once the breaker opened
            (goal <= 1.2x the backup's own p50 + 5 ms).
  recovery  the primary heals at the end of the outage: the time until its breaker closes (goal <=
            open_for + one probe) and its share of the calls after that (goal >= 90%).
  stalled   the primary accepts and never answers: every request must still succeed within its
            deadline through the backup; the time until the breaker opened.
  layers    CPU per LM call of the layers alone, in process with a backend that answers at once (no
            network, little noise): the upstream guard, with a breaker, and inside a fallback chain;
            what they add, against the CPU of a whole prediction measured by ``healthy``.
  paired    the goal's measure: engine CPU per prediction with the primary's fallback chain and
            breakers against the same tree's one LM, both engines in one process, alternated blocks of
            ``--block`` predictions (64 concurrent, 20 ms upstream), ``--pairs`` per process in
            ``--processes`` processes; the median of the ABBA ratios and their spread, beside an A/A
            control (one LM against one LM) that shows the method's own noise; goal <= 1.02x.
  healthy   engine CPU per prediction, 64 concurrent, 20 ms upstream, each measurement in a fresh
            process, rounds alternated: the baseline tree (``--baseline``, default the merge base of HEAD
            and main; one LM), this tree with one LM, and this tree with the primary's fallback chain and
            breaker (healthy); goal: <= 1.02x the baseline, and <= 2.0x the floor (benchmarks.floor) as
            the hot path's bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from benchmarks._baseline import HELP, ROOT, baseline_tree
from benchmarks._measure import abba_ratios, ratio_spread, run_worker, verdict
from benchmarks._upstream import start_upstream

LATENCY = 0.05  # seconds per answer of both fake upstreams
DEADLINE = 10.0
OPEN_FOR = 5.0
HALF_OPEN_CALLS = 1
ATTEMPT_TIMEOUT = 1.0
QUESTION = "question number {}"


# ------------------------------------------------------------------------------- failover (in process)


@attrs.define
class Call:
    started: float
    ended: float = 0.0
    ok: bool = False
    lm: str = ""
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Transitions(logging.Handler):
    """The breaker's log lines, with the time each was written (Trio's clock and the wall clock)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((trio.current_time(), time.time(), record.getMessage()))

    def first(self, words: str, after: float) -> tuple[float, float] | None:
        return next(((at, wall) for at, wall, line in self.seen if at >= after and words in line), None)


def engine_config(primary: str, backup: str) -> Any:
    from dspy_trio.engine import (
        BreakerSettings,
        CallTimeouts,
        EngineConfig,
        LMConfig,
        OpenAISettings,
        ProgramSpec,
        RetryPolicy,
    )

    breaker = BreakerSettings(
        failure_ratio=0.5, min_calls=10, window=10.0, open_for=OPEN_FOR, half_open_calls=HALF_OPEN_CALLS
    )
    lms = {
        "primary": LMConfig(
            model="primary",
            settings=OpenAISettings(api_base=primary),
            fallbacks=("backup",),
            breaker=breaker,
            timeouts=CallTimeouts(attempt=ATTEMPT_TIMEOUT),
            retry=RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0),
        ),
        "backup": LMConfig(model="backup", settings=OpenAISettings(api_base=backup)),
    }
    programs = {
        "default": ProgramSpec("question -> answer", lm="primary"),
        "backup_only": ProgramSpec("question -> answer", lm="backup"),
    }
    return EngineConfig(lms=lms, programs=programs, max_in_flight=256, max_queued=1024)


class Load:
    """``clients`` closed-loop callers of one program; every call is recorded."""

    def __init__(self, engine: Any, clients: int) -> None:
        self.engine = engine
        self.clients = clients
        self.calls: list[Call] = []
        self.program = "default"
        self._count = 0

    async def run(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.clients):
                nursery.start_soon(self._client)
            task_status.started()

    async def _client(self) -> None:
        from dspy_trio.engine import EngineError

        while True:
            self._count += 1
            call = Call(trio.current_time())
            self.calls.append(call)
            try:
                with trio.fail_after(DEADLINE):
                    result = await self.engine.predict(
                        self.program, {"question": QUESTION.format(self._count)}
                    )
                call.ok, call.lm = True, result.lm_calls[-1].lm
            except EngineError as error:
                call.error = error.code
            except trio.TooSlowError:
                call.error = "deadline"
            call.ended = trio.current_time()

    def between(self, start: float, end: float) -> list[Call]:
        """Calls started in [start, end) that have ended."""
        return [c for c in self.calls if start <= c.started < end and c.ended]


async def _faults(client: Any, url: str, faults: list[dict[str, Any]] | None) -> None:
    root = url.removesuffix("/v1")
    body = {"faults": faults or [], "clear": True}
    (await client.post(f"{root}/_fake/faults", json=body)).raise_for_status()


async def _records(client: Any, url: str) -> list[dict[str, Any]]:
    root = url.removesuffix("/v1")
    response = await client.get(f"{root}/_fake/records")
    response.raise_for_status()
    records: list[dict[str, Any]] = response.json()["records"]
    return records


def _p50(calls: list[Call]) -> float:
    return statistics.median(c.seconds for c in calls) if calls else math.nan


async def failover(args: argparse.Namespace) -> dict[str, Any]:
    """The outage, recovery and stalled parts against two fake upstream processes."""
    from dspy_trio.engine import open_engine

    report: dict[str, Any] = {}
    primary_process, primary = start_upstream(LATENCY)
    backup_process, backup = start_upstream(LATENCY)
    transitions = Transitions()
    logging.getLogger("dspy_trio.engine.lm").setLevel(logging.ERROR)  # one warning per failed attempt
    logger = logging.getLogger("dspy_trio.engine.breaker")
    logger.addHandler(transitions)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        async with (
            httpx.AsyncClient(timeout=30) as control,
            open_engine(engine_config(primary, backup)) as engine,
            trio.open_nursery() as nursery,
        ):
            load = Load(engine, args.clients)
            await nursery.start(load.run)
            await trio.sleep(2.0)  # warm-up: connections, caches

            load.program = "backup_only"
            start = trio.current_time()
            await trio.sleep(5.0)
            backup_alone = load.between(start + 0.5, trio.current_time())
            load.program = "default"
            start = trio.current_time()
            await trio.sleep(3.0)
            healthy = load.between(start + 0.5, trio.current_time())
            report["backup_p50"] = _p50(backup_alone)
            report["healthy_p50"] = _p50(healthy)

            # --- outage: every call to the primary answers 503 ---
            outage_start = trio.current_time()
            await _faults(control, primary, [{"kind": "unavailable"}] * 200_000)
            await trio.sleep(args.outage)
            await _faults(control, primary, None)  # healed
            heal, heal_wall = trio.current_time(), time.time()
            opened = transitions.first("circuit breaker open", outage_start)
            outage = load.between(outage_start, heal)
            report["outage"] = {
                "seconds": heal - outage_start,
                "requests": len(outage),
                "failed": sum(not c.ok for c in outage),
                "errors": sorted({c.error for c in outage if not c.ok}),
                "time_to_open": opened[0] - outage_start if opened else None,
            }
            if opened:
                after_open = [c for c in outage if c.started >= opened[0] and c.ended <= heal]
                records = await _records(control, primary)
                # Received after the breaker opened: attempts sent before it are not the breaker's.
                while_open = [r for r in records if opened[1] < (r["received_wall"] or 0) <= heal_wall]
                windows = math.ceil((heal - opened[0]) / OPEN_FOR)
                report["outage"] |= {
                    "p50_after_open": _p50(after_open),
                    "requests_after_open": len(after_open),
                    "primary_calls_while_open": len(while_open),
                    "open_for_windows": windows,
                    "by_lm_after_open": _count_lms(after_open),
                }

            # --- recovery ---
            await trio.sleep(OPEN_FOR + 4.0)
            closed = transitions.first("circuit breaker closed", heal)
            recovery: dict[str, Any] = {"time_to_close": closed[0] - heal if closed else None}
            settle = heal + OPEN_FOR + max(0.1, report["healthy_p50"])  # open_for + one probe
            after = load.between(settle, trio.current_time())
            recovery["share_primary"] = sum(c.lm == "primary" for c in after) / max(1, len(after))
            recovery["requests"] = len(after)
            report["recovery"] = recovery

            # --- stalled: the primary accepts and never answers ---
            stall_start = trio.current_time()
            await _faults(control, primary, [{"kind": "hang"}] * 200_000)
            await trio.sleep(args.stall)
            stall_end = trio.current_time()
            await _faults(control, primary, None)
            opened = transitions.first("circuit breaker open", stall_start)
            stalled = load.between(stall_start, stall_end)
            report["stalled"] = {
                "seconds": stall_end - stall_start,
                "requests": len(stalled),
                "failed": sum(not c.ok for c in stalled),
                "slowest": max((c.seconds for c in stalled), default=math.nan),
                "past_deadline": sum(c.seconds > DEADLINE for c in stalled),
                "time_to_open": opened[0] - stall_start if opened else None,
                "by_lm": _count_lms(stalled),
            }
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(transitions)
        for process in (primary_process, backup_process):
            process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
    return report


def _count_lms(calls: list[Call]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in calls:
        key = call.lm if call.ok else f"error:{call.error}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------- healthy path CPU (workers)


def _cpu_worker(url: str, mode: str, n: int, concurrency: int) -> dict[str, Any]:
    """CPU ms per ``engine.predict``: ``single`` (one LM, works on any tree) or ``chain`` (the primary's
    fallback chain and breaker, this tree only); both call the same healthy upstream."""
    from dspy_trio.engine import EngineConfig, open_engine

    # LMConfig.from_mapping's flat tables: the form every tree takes (the worker runs on the baseline's).
    lm: dict[str, Any] = {
        "provider": "openai",
        "model": "bench",
        "api_base": url,
        "retry": {"max_attempts": 1},
    }
    tables = {"default": lm}
    if mode == "chain":
        tables = {"default": {**lm, "fallbacks": ["backup"], "breaker": {}}, "backup": lm}
    engine = {"max_in_flight": concurrency, "max_queued": 100_000}
    config = EngineConfig.from_mapping({"engine": engine, "lms": tables})

    async def run() -> dict[str, Any]:
        async with open_engine(config) as engine:
            for i in range(50):
                await engine.predict("default", {"question": f"warm-up {i}"})
            limit = trio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with limit:
                    await engine.predict("default", {"question": QUESTION.format(i)})

            cpu = time.process_time()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            return {"cpu_ms": (time.process_time() - cpu) / n * 1000}

    return dict(trio.run(run))


def _paired_worker(url: str, n: int, pairs: int, concurrency: int, control: bool = False) -> dict[str, Any]:
    """Both engines in one process (one LM; the primary's fallback chain and breakers), calling the same
    upstream; ``pairs`` pairs of blocks of ``n`` predictions, alternated (single first in even pairs),
    each block's CPU ms per prediction. ``control``: the second engine has one LM too (an A/A run that
    shows the method's own noise)."""
    from dspy_trio.engine import EngineConfig, open_engine

    lm: dict[str, Any] = {
        "provider": "openai",
        "model": "bench",
        "api_base": url,
        "retry": {"max_attempts": 1},
    }
    engine = {"max_in_flight": concurrency, "max_queued": 100_000}
    chained = {"default": {**lm, "fallbacks": ["backup"], "breaker": {}}, "backup": lm}
    configs = {
        "single": EngineConfig.from_mapping({"engine": engine, "lms": {"default": lm}}),
        "chain": EngineConfig.from_mapping(
            {"engine": engine, "lms": {"default": lm} if control else chained}
        ),
    }

    async def run() -> dict[str, Any]:
        async with open_engine(configs["single"]) as single, open_engine(configs["chain"]) as chain:
            engines = {"single": single, "chain": chain}
            limit = trio.Semaphore(concurrency)

            async def block(name: str, start: int, count: int) -> float:
                engine = engines[name]

                async def one(i: int) -> None:
                    async with limit:
                        await engine.predict("default", {"question": QUESTION.format(i)})

                cpu = time.process_time()
                async with trio.open_nursery() as nursery:
                    for i in range(start, start + count):
                        nursery.start_soon(one, i)
                return (time.process_time() - cpu) / count * 1000

            for _ in range(2):  # warm-up
                for name in engines:
                    await block(name, 0, n // 2)
            blocks: dict[str, list[float]] = {"single": [], "chain": []}
            for pair in range(pairs):
                for name in ("single", "chain") if pair % 2 == 0 else ("chain", "single"):
                    blocks[name].append(await block(name, (pair + 1) * n, n))
            return blocks

    return dict(trio.run(run))


def _run_worker(kind: str, url: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = run_worker(
        "benchmarks.fallback", ["--worker", kind, "--url", url, "--n", str(args.n)], tree=tree
    )
    print(f"  {kind:8s} {tree.name[:28]:28s} {json.dumps(result)}", file=sys.stderr)
    return result


def healthy(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"floor": [], "baseline": [], "single": [], "chain": []}
    with baseline_tree(args.baseline, prefix="fallback-baseline-") as exported:
        if exported is None:
            raise SystemExit("the healthy part needs a baseline: pass --baseline REF")
        baseline, commit = exported
        process, url = start_upstream(0.02)
        try:
            modes = [("floor", ROOT), ("baseline", baseline), ("single", ROOT), ("chain", ROOT)]
            for r in range(args.rounds):
                for name, tree in modes if r % 2 == 0 else modes[::-1]:
                    kind = "floor" if name == "floor" else ("chain" if name == "chain" else "single")
                    result = _run_worker(kind, url, tree, args)
                    runs[name].append(result["floor64_ms"] if name == "floor" else result["cpu_ms"])
        finally:
            process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
    # The machine's load drifts between rounds: the ratios are taken within each round, then the median.
    ratios: dict[str, float] = {}
    for name in ("single", "chain"):
        each = [a / b for a, b in zip(runs[name], runs["baseline"], strict=True)]
        ratios |= {
            f"{name}_ratio": statistics.median(each),
            f"{name}_low": min(each),
            f"{name}_high": max(each),
        }
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {"baseline_commit": commit, **medians, **ratios}


def paired(args: argparse.Namespace) -> dict[str, Any]:
    """The goal's measure: engine CPU per prediction with the fallback chain and breakers over the same
    tree's one LM (``paired``), and one LM over one LM (``control``: the method's own noise), each in
    ``--processes`` fresh worker processes of ``--pairs`` alternated pairs of blocks: the median of the
    ABBA ratios, and their spread."""
    process, url = start_upstream(0.02)
    report: dict[str, Any] = {}
    try:
        for kind in ("paired", "control"):
            ratios: list[float] = []
            blocks: dict[str, list[float]] = {"single": [], "chain": []}
            for _ in range(args.processes):
                arguments = ["--url", url, "--n", str(args.block), "--pairs", str(args.pairs)]
                result = run_worker("benchmarks.fallback", ["--worker", kind, *arguments])
                each = abba_ratios(result["chain"], result["single"])
                ratios += each
                for name in blocks:
                    blocks[name] += result[name]
                print(f"  {kind} worker: ABBA ratios {' '.join(f'{r:.3f}' for r in each)}", file=sys.stderr)
            medians = {name: statistics.median(values) for name, values in blocks.items()}
            report[kind] = {**medians, "ratio": ratio_spread(ratios)}
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    return report


def layers(n: int = 20_000) -> dict[str, float]:
    """CPU microseconds per LM call through each stack of layers (medians of 5 runs of ``n`` calls), and
    per call an open breaker refuses (``open``: it raises ``CircuitOpenError`` without any wait)."""
    from dspy_trio.engine import CircuitOpenError, UpstreamServerError
    from dspy_trio.engine._breaker import BreakerSettings, CircuitBreaker
    from dspy_trio.engine._fallback import FallbackLM
    from dspy_trio.engine._trace import tracing
    from dspy_trio.engine._upstream import UpstreamGuard, UpstreamPolicy
    from dspy_trio.engine.lm import Completion, GuardedLM, TrioLM

    answer = Completion(["text"], {"prompt_tokens": 30, "completion_tokens": 10})

    class AtOnce(TrioLM):
        async def complete(self, messages: Any, params: Any, sink: Any) -> Completion:
            return answer

    def guarded(name: str, breaker: bool) -> GuardedLM:
        settings = BreakerSettings()
        cut = CircuitBreaker(name, settings) if breaker else None
        return GuardedLM(AtOnce("m"), UpstreamGuard(name, UpstreamPolicy(), breaker=cut))

    stacks = {
        "guard": guarded("a", False),
        "guard+breaker": guarded("b", True),
        "chain(1)": FallbackLM([("c", guarded("c", False))]),
        "chain(2)+breakers": FallbackLM([("d", guarded("d", True)), ("e", guarded("e", True))]),
    }
    messages = [{"role": "user", "content": "question"}]
    opened = CircuitBreaker("f", BreakerSettings(min_calls=1, failure_ratio=1.0, open_for=1e6))
    refusing = GuardedLM(AtOnce("m"), UpstreamGuard("f", UpstreamPolicy(), breaker=opened))

    async def run() -> dict[str, float]:
        ticket = await opened.admit()
        opened.failed(ticket, UpstreamServerError("503", status=503))  # open for the whole run
        runs: dict[str, list[float]] = {name: [] for name in [*stacks, "open"]}
        with tracing() as trace:
            for _ in range(5):
                for name, lm in stacks.items():
                    cpu = time.process_time()
                    for _ in range(n):
                        await lm.complete(messages, {}, None)
                    runs[name].append((time.process_time() - cpu) / n * 1e6)
                    trace.answers.clear()
                cpu = time.process_time()
                for _ in range(n):
                    with contextlib.suppress(CircuitOpenError):
                        await refusing.complete(messages, {}, None)
                runs["open"].append((time.process_time() - cpu) / n * 1e6)
        return {name: statistics.median(values) for name, values in runs.items()}

    return dict(trio.run(run))


# ------------------------------------------------------------------------------------------- summary


def summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    upstream_ms = LATENCY * 1000
    print(
        f"\nfallback and circuit breaker, {args.clients} closed-loop clients, {upstream_ms:.0f} ms upstreams"
    )
    if "outage" in report:
        backup_p50, outage = report["backup_p50"], report["outage"]
        healthy_p50 = report["healthy_p50"]
        print(
            f"  backup alone p50 {backup_p50 * 1000:.1f} ms; healthy primary p50 {healthy_p50 * 1000:.1f} ms"
        )
        failed, errors = outage["failed"], outage["errors"]
        print(
            f"  outage ({outage['seconds']:.0f} s of 503s): {outage['requests']} requests, {failed} failed "
            f"(goal 0: {verdict(failed == 0)}){' ' + str(errors) if errors else ''}; "
            f"breaker open after {_ms(outage['time_to_open'])}"
        )
        if "p50_after_open" in outage:
            windows, calls = outage["open_for_windows"], outage["primary_calls_while_open"]
            allowed = windows * HALF_OPEN_CALLS
            p50, goal = outage["p50_after_open"], 1.2 * backup_p50 + 0.005
            print(
                f"    calls reaching the primary while its breaker was open: {calls} in {windows} open_for "
                f"windows of {OPEN_FOR:g} s (goal <= {allowed}: {verdict(calls <= allowed)})"
            )
            print(
                f"    p50 once open: {p50 * 1000:.1f} ms over {outage['requests_after_open']} requests = "
                f"{p50 / backup_p50:.2f}x the backup's own (goal <= 1.2x + 5 ms = {goal * 1000:.1f} ms: "
                f"{verdict(p50 <= goal)}); answered by {outage['by_lm_after_open']}"
            )
    if "recovery" in report:
        recovery = report["recovery"]
        closed, share = recovery["time_to_close"], recovery["share_primary"]
        bound = OPEN_FOR + max(0.1, report["healthy_p50"])
        print(
            f"  recovery: breaker closed {_ms(closed)} after the primary healed (goal <= open_for + one "
            f"probe = {bound:.2f} s: {verdict(closed is not None and closed <= bound)}); then the primary "
            f"answered {share:.1%} of {recovery['requests']} calls (goal >= 90%: {verdict(share >= 0.9)})"
        )
    if "stalled" in report:
        stalled = report["stalled"]
        ok = stalled["failed"] == 0 and stalled["past_deadline"] == 0
        print(
            f"  stalled primary ({stalled['seconds']:.0f} s, attempt timeout {ATTEMPT_TIMEOUT:g} s, deadline "
            f"{DEADLINE:g} s): {stalled['requests']} requests, {stalled['failed']} failed, "
            f"{stalled['past_deadline']} past the deadline, slowest {stalled['slowest']:.2f} s "
            f"(goal: all succeed within the deadline: {verdict(ok)}); breaker open after "
            f"{_ms(stalled['time_to_open'])}; answered by {stalled['by_lm']}"
        )
    if "layers" in report:
        us = report["layers"]
        added = us["chain(2)+breakers"] - us["guard"]
        line = ", ".join(f"{name} {value:.2f}" for name, value in us.items() if name != "open")
        print(f"  layers, CPU us per LM call with an instant backend: {line}")
        print(
            f"    a call an open breaker refuses: {us['open']:.2f} us (goal: well under a millisecond: "
            f"{verdict(us['open'] < 100)}), nothing sent"
        )
        if "healthy" in report:
            share = added / (report["healthy"]["baseline"] * 1000)
            print(
                f"    a fallback chain with breakers adds {added:.2f} us per LM call = {share:.2%} of the "
                f"baseline's CPU per prediction (goal <= 2%: {verdict(share <= 0.02)})"
            )
        else:
            print(f"    a fallback chain with breakers adds {added:.2f} us per LM call")
    if "paired" in report:
        cpu, control = report["paired"]["paired"], report["paired"]["control"]
        spread, noise = cpu["ratio"], control["ratio"]
        print(
            f"  healthy path, engine CPU per prediction with a fallback chain and breakers over one LM (same "
            f"tree and process, 64 concurrent, {args.processes} processes x {args.pairs} alternated blocks "
            f"of {args.block} predictions per engine): one LM {cpu['single']:.3f} ms, chain "
            f"{cpu['chain']:.3f} ms; median of the ABBA ratios {spread['median']:.4f}x (p25-p75 "
            f"{spread['p25']:.4f}-{spread['p75']:.4f}, range {spread['low']:.3f}-{spread['high']:.3f}, "
            f"{spread['pairs']} ratios; goal <= 1.02x: {verdict(spread['median'] <= 1.02)})\n"
            f"    the method's own noise, one LM against one LM: median {noise['median']:.4f}x (p25-p75 "
            f"{noise['p25']:.4f}-{noise['p75']:.4f}, range {noise['low']:.3f}-{noise['high']:.3f})"
        )
    if "healthy" in report:
        cpu = report["healthy"]
        base, single, chain, floor = cpu["baseline"], cpu["single"], cpu["chain"], cpu["floor"]
        ratio = cpu["chain_ratio"]
        print(
            f"  healthy path, engine CPU per prediction (64 concurrent, medians of {args.rounds} rounds; "
            f"ratios within each round, then their median): baseline {cpu['baseline_commit']} {base:.3f} "
            f"ms; this tree, one LM {single:.3f} ms ({cpu['single_ratio']:.3f}x); with a fallback chain "
            f"and breaker {chain:.3f} ms ({ratio:.3f}x the baseline, rounds {cpu['chain_low']:.2f}-"
            f"{cpu['chain_high']:.2f}x; goal <= 1.02x: {verdict(ratio <= 1.02)}); floor {floor:.3f} ms: the "
            f"chain {chain / floor:.2f}x it, the "
            f"baseline {base / floor:.2f}x (the hot path's bar: <= 2.0x: {verdict(chain / floor <= 2.0)})"
        )


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parts = ("failover", "layers", "paired", "healthy")
    parser.add_argument("--parts", nargs="+", choices=parts, default=list(parts))
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the primary answers 503")
    parser.add_argument("--stall", type=float, default=20.0, help="seconds the primary never answers")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the healthy-path CPU measurement")
    parser.add_argument("--n", type=int, default=2000, help="predictions per CPU measurement")
    parser.add_argument("--processes", type=int, default=3, help="worker processes of the paired part")
    parser.add_argument("--pairs", type=int, default=16, help="interleaved pairs per paired worker")
    parser.add_argument("--block", type=int, default=500, help="predictions per block of a pair")
    parser.add_argument("--baseline", default=None, help=HELP)
    parser.add_argument("--json", default=None, help="also write the raw report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if args.worker:
        if args.worker == "floor":
            from benchmarks.floor import measure

            print(json.dumps(measure(args.url, args.n)))
        elif args.worker in ("paired", "control"):
            control = args.worker == "control"
            print(json.dumps(_paired_worker(args.url, args.n, args.pairs, 64, control=control)))
        else:
            print(json.dumps(_cpu_worker(args.url, args.worker, args.n, 64)))
        return
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if "failover" in args.parts:
        report |= trio.run(failover, args)
    if "layers" in args.parts:
        report["layers"] = layers()
    if "paired" in args.parts:
        report["paired"] = paired(args)
    if "healthy" in args.parts:
        report["healthy"] = healthy(args)
    summary(report, args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
