"""Overload at 2x capacity over HTTP, dspy-trio alone: refusal p99 and admitted p99 vs unloaded.

The server runs 16 in flight + 16 queued against a fake upstream answering in 0.2 s (capacity 80
requests/s); the load is open-loop, 20 requests/s unloaded, then 160 requests/s. Uses the helpers of
``benchmarks.serving`` (its ``--part overload`` also runs a FastAPI peer)::

    python -m benchmarks.overload
"""

from __future__ import annotations

import json

import trio

from benchmarks._upstream import start_upstream
from benchmarks.serving import _overload, _warm, start_server, stop


def main() -> None:
    upstream, upstream_url = start_upstream(0.2)
    try:
        server, url = start_server("dspy-trio", upstream_url, 16, in_flight=16, queued=16)
        try:
            trio.run(_warm, url)
            unloaded = trio.run(_overload, url, 20.0, 3.0)
            loaded = trio.run(_overload, url, 160.0, 5.0)
        finally:
            stop(server)
    finally:
        upstream.kill()
    print(json.dumps({"unloaded": unloaded, "loaded": loaded}))
    base, admitted = unloaded["admitted_p99_ms"], loaded["admitted_p99_ms"]
    refused = loaded["refused_p99_ms"]
    ratio = f"{admitted / base:.2f}x" if base and admitted else "n/a"
    print(f"admitted p99 {admitted} ms = {ratio} unloaded ({base} ms) (goal <= 2x)")
    counts = f"{loaded['refused']} refused, {loaded['failures']} failures"
    print(f"refused p99 {refused} ms (goal <= 10 ms), {counts}")


if __name__ == "__main__":
    main()
