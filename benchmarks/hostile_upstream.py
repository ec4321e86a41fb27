"""A hostile upstream against the engine's LM backends, before and after, in one run: memory, event-loop
stalls and the outcome of each attack.

The fake upstream (this tree's, in its own process) answers with one hostile fault per call; each call
runs in a fresh worker process, on this tree and on a baseline tree (an export of a git ref, default:
the merge base of HEAD and main), with the lean transport and with httpx::

    python -m benchmarks.hostile_upstream                      # every attack, both trees, ~2 minutes
    python -m benchmarks.hostile_upstream --attacks bomb-predict bomb-stream --baseline none

Measured per call: how it ended (the error's code, or "still reading" when the worker gave up after
--seconds), the wall time, the peak RSS above the worker's RSS before the call, the RSS left after it (and
after a garbage collection), and the longest the event loop went without running a 1 ms ticker task
(its worst stall). ``html-stream`` goes through the engine with its default retries (3 attempts) and
reports the upstream requests two streamed calls cost.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks._baseline import HELP as BASELINE_HELP
from benchmarks._baseline import ROOT, baseline_tree
from benchmarks._measure import WorkerFailed, rss_mb, run_worker
from benchmarks._upstream import start_upstream

TRANSPORTS = ("lean", "httpx")
# attack -> (fault sent to the fake upstream, path)
ATTACKS: dict[str, tuple[dict[str, Any], str]] = {
    "endless-event": ({"kind": "endless_event"}, "stream"),
    "endless-stream": ({"kind": "endless_stream"}, "stream"),
    "bomb-predict": ({"kind": "bomb", "size": 100_000_000}, "predict"),
    "bomb-stream": ({"kind": "bomb", "size": 100_000_000}, "stream"),
    "nested-predict": ({"kind": "nested"}, "predict"),
    "bad-utf8-stream": ({"kind": "bad_utf8", "after_tokens": 2}, "stream"),
    "echo-key-predict": ({"kind": "echo_key"}, "predict"),
    "html-stream": ({"kind": "html"}, "engine-stream"),
}
KEY = "sk-hostile-benchmark-0123456789abcdef"


# ---------------------------------------------------------------------------------------------- worker


def _worker(transport: str, path: str, url: str, seconds: float) -> dict[str, Any]:
    import trio

    from dspy_trio.engine import EngineConfig, EngineError, ErrorEvent, LMConfig, open_engine
    from dspy_trio.engine.lm import HTTPSettings, OpenAICompatibleLM

    messages = [{"role": "user", "content": "[[ ## question ## ]]\nWhat is Trio?"}]
    result: dict[str, Any] = {}

    class Sink:
        async def send(self, text: str) -> None:
            pass

    http = HTTPSettings(client=transport)  # type: ignore[arg-type]
    backend = OpenAICompatibleLM("fake", api_base=url, api_key=KEY, http=http)

    async def warm_up() -> None:
        """One exchange that takes no fault (a path the fake upstream does not serve: 404), so the
        measured call pays no first-use cost (imports, TLS context, connection)."""
        with contextlib.suppress(EngineError):
            await backend._clients.post_json("fake", "warm-up", {})

    async def call() -> str:
        if path == "engine-stream":
            # The flat table every tree takes: this worker also runs on the baseline's engine.
            table = {"provider": "openai", "model": "fake", "api_base": url, "api_key": KEY}
            lm = LMConfig.from_mapping({**table, "http": {"client": transport}})
            codes = []
            async with open_engine(EngineConfig(lms={"default": lm})) as engine:
                for _ in range(2):
                    async with engine.stream("default", {"question": "q"}) as events:
                        last = [event async for event in events][-1]
                    codes.append(last.error.code if isinstance(last, ErrorEvent) else "ok")
            return "/".join(codes)
        try:
            await backend.complete(messages, {}, Sink() if path == "stream" else None)
        except EngineError as exc:
            result["leaked_key"] = KEY in exc.message
            return exc.code
        except Exception as exc:  # the defect being measured: an error the engine did not type
            result["leaked_key"] = KEY in str(exc)
            return f"untyped {type(exc).__name__}"
        finally:
            await backend.aclose()
        return "ok"

    async def main() -> None:
        worst = 0.0

        async def ticker() -> None:
            nonlocal worst
            while True:
                before = time.perf_counter()
                await trio.sleep(0.001)
                worst = max(worst, time.perf_counter() - before - 0.001)

        await warm_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.05)
            worst = 0.0
            started = time.perf_counter()
            with trio.move_on_after(seconds):
                result["outcome"] = await call()
            result.setdefault("outcome", f"still reading after {seconds:g} s")
            result["wall_s"] = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        result["worst_stall_ms"] = worst * 1000

    gc.collect()
    base = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trio.run(main)
    result["peak_rss_mb"] = max(
        0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - max(base, peak_before)
    )
    gc.collect()
    result["rss_after_mb"] = rss_mb() - base
    return result


# ----------------------------------------------------------------------------------------- orchestrator


def _post(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _records(root: str) -> int:
    with urllib.request.urlopen(f"{root}/_fake/records", timeout=30) as response:
        return len(json.loads(response.read())["records"])


def _run(tree: Path, attack: str, transport: str, url: str, seconds: float) -> dict[str, Any]:
    fault, path = ATTACKS[attack]
    root = url.removesuffix("/v1")
    count = 8 if path == "engine-stream" else 1
    _post(f"{root}/_fake/faults", {"faults": [fault] * count, "clear": True})
    before = _records(root)
    arguments = ["--worker", transport, path, url, "--seconds", str(seconds)]
    try:
        result = run_worker("benchmarks.hostile_upstream", arguments, tree=tree)
    except WorkerFailed as failed:
        return {"outcome": f"worker crashed: {(failed.stderr.strip().splitlines() or [''])[-1][:80]}"}
    result["upstream_requests"] = _records(root) - before - 1  # the worker's warm-up is not counted
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=tuple(ATTACKS), default=list(ATTACKS))
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--baseline", default=None, help=BASELINE_HELP)
    parser.add_argument("--seconds", type=float, default=10.0, help="give up on one call after this long")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        transport, path, url = args.worker
        print(json.dumps(_worker(transport, path, url, args.seconds)))
        return

    with baseline_tree(args.baseline, prefix="hostile-upstream-baseline-") as baseline:
        trees = {f"before ({baseline[1]})": baseline[0]} if baseline else {}
        trees["after (this tree)"] = ROOT
        _attack(args, trees)


def _attack(args: argparse.Namespace, trees: dict[str, Path]) -> None:
    process, url = start_upstream(token_delay=0.0)
    print(
        f"{'attack':18s} {'transport':9s} {'tree':20s} {'outcome':34s} {'wall s':>6s} "
        f"{'peak RSS':>9s} {'RSS after':>9s} {'stall ms':>8s} {'requests':>8s}"
    )
    try:
        for attack in args.attacks:
            for transport in args.transports:
                for name, tree in trees.items():
                    r = _run(tree, attack, transport, url, args.seconds)
                    outcome = str(r.get("outcome"))
                    if r.get("leaked_key"):
                        outcome += " +KEY"
                    print(
                        f"{attack:18s} {transport:9s} {name:20s} {outcome[:34]:34s} "
                        f"{r.get('wall_s', 0):6.2f} {r.get('peak_rss_mb', 0):+8.0f}M "
                        f"{r.get('rss_after_mb', 0):+8.0f}M {r.get('worst_stall_ms', 0):8.1f} "
                        f"{r.get('upstream_requests', 0):8d}",
                        flush=True,
                    )
    finally:
        process.kill()


if __name__ == "__main__":
    main()
