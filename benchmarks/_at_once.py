"""Many predictions at once through one engine, in one worker process: wall time, CPU per prediction,
peak OS threads and peak RSS (the c1000 part of ``hotpath`` and the modes of ``concurrency``)."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any


def predict_at_once(
    open_engine: Callable[[], AbstractAsyncContextManager[Any]],
    n: int,
    *,
    warm: bool = False,
    tuned: bool = False,
) -> dict[str, Any]:
    """Start ``n`` predictions of the ``default`` program at once on the engine ``open_engine()`` opens,
    and measure them. Runs ``trio.run``; blocks until all have ended.

    One prediction first warms the engine up (imports, the first connection, DSPy's lazy set-up).

    Args:
        warm: First run ``n`` predictions at once unmeasured, so the pool holds ``n`` kept-alive
            connections, as a server's does once it has served at this concurrency.
        tuned: Set the collector as ``dspy-trio serve`` does once started (``tune_gc_for_serving``)
            before measuring.

    Returns:
        ``wall`` seconds, ``cpu_ms`` per prediction, ``ok`` (predictions that succeeded),
        ``peak_threads`` (sampled every 10 ms while they run) and ``peak_rss_mb`` of the process.
    """
    import trio

    from dspy_trio.engine import tune_gc_for_serving

    async def run() -> dict[str, Any]:
        async with open_engine() as engine:
            await engine.predict("default", {"question": "warm-up"})
            if warm:
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(engine.predict, "default", {"question": f"warm-up {i}"})
            if tuned:
                tune_gc_for_serving()
            ok = 0
            peak_threads = threading.active_count()

            async def one(i: int) -> None:
                nonlocal ok
                await engine.predict("default", {"question": f"question number {i}"})
                ok += 1

            async def sample_threads() -> None:
                nonlocal peak_threads
                while True:
                    peak_threads = max(peak_threads, threading.active_count())
                    await trio.sleep(0.01)

            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as sampler:
                sampler.start_soon(sample_threads)
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(one, i)
                sampler.cancel_scope.cancel()
            return {
                "wall": time.perf_counter() - wall0,
                "cpu_ms": (time.process_time() - cpu0) / n * 1000,
                "ok": ok,
                "peak_threads": peak_threads,
            }

    result: dict[str, Any] = trio.run(run)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result
