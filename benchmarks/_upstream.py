"""Running the fake upstream in its own process for a benchmark."""

from __future__ import annotations

import subprocess
import sys


def start_upstream(
    latency: float = 0.0, *, first_token_delay: float = 0.0, token_delay: float = 0.0, words: int = 16
) -> tuple[subprocess.Popen[str], str]:
    """Start ``dspy-trio fake-upstream`` on an ephemeral port; return the process and its API root."""
    command = [
        sys.executable,
        "-m",
        "dspy_trio.web.cli",
        "--log-level",
        "WARNING",
        "fake-upstream",
        "--port",
        "0",
    ]
    command += ["--latency", str(latency), "--first-token-delay", str(first_token_delay)]
    command += ["--token-delay", str(token_delay), "--words-per-field", str(words)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("fake upstream listening on "):
        process.kill()
        raise SystemExit(f"fake upstream did not start: {line!r}")
    return process, line.removeprefix("fake upstream listening on ")
