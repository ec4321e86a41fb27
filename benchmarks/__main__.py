"""The benchmarks' entry point: ``python -m benchmarks [all|hot|<workload> ...]``.

Each workload starts its upstream in its own process, runs dspy-trio and its peers (or its floor)
alternately, prints a table of medians and ratios, and (throughput, serving) writes raw JSON and a PNG plot
to benchmarks/results/. ``hot`` is the hot path against its floor (hotpath, hotpath_http, hotpath_stream);
``all`` is every workload.
"""

from __future__ import annotations

import subprocess
import sys

HOT = ("hotpath", "hotpath_http", "hotpath_stream")
WORKLOADS = (
    "throughput",
    "serving",
    "concurrency",
    "streaming",
    "http",
    "coalescing",
    "tenants",
    "openai_route",
    *HOT,
)


def main() -> int:
    chosen = sys.argv[1:] or ["all"]
    groups = {"all": WORKLOADS, "hot": HOT}
    names = [name for choice in chosen for name in groups.get(choice, (choice,))]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}; choose from all, hot, {', '.join(WORKLOADS)}")
        return 2
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
