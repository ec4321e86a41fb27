"""The benchmarks' entry point: ``python -m benchmarks [all|throughput|serving|concurrency|streaming|http]``.

Each workload starts the fake upstream in its own process, runs dspy-trio and its peers alternately, prints a
table of medians and ratios, and (throughput, serving) writes raw JSON and a PNG plot to benchmarks/results/.
"""

from __future__ import annotations

import subprocess
import sys

WORKLOADS = ("throughput", "serving", "concurrency", "streaming", "http")


def main() -> int:
    chosen = sys.argv[1:] or ["all"]
    names = list(WORKLOADS) if chosen == ["all"] else chosen
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}; choose from all, {', '.join(WORKLOADS)}")
        return 2
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
