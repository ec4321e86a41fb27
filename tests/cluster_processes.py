"""Real processes for the scale-out tests: the fake upstream in its own process, and replicas of
``dspy-trio serve --workers N`` sharing one Redis. Everything listens on 127.0.0.1, ephemeral ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.redis_server import free_port


def _wait_for(path: Path, text: str, count: int, process: subprocess.Popen[bytes], seconds: float) -> None:
    limit = time.monotonic() + seconds
    while time.monotonic() < limit:  # real time: other processes are starting
        if path.read_text(errors="replace").count(text) >= count:
            return
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{path.read_text(errors='replace')}")
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} x{count} not seen in {seconds}s:\n{path.read_text(errors='replace')}")


class Process:
    """A child process whose output goes to a log file."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="dspy-trio-test-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            )

    def wait_for(self, text: str, count: int = 1, seconds: float = 60) -> None:
        _wait_for(self.log, text, count, self.popen, seconds)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, seconds: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(seconds)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.unlink(missing_ok=True)
        return self.popen.returncode


def fake_upstream(latency: float = 0.0, token_delay: float = 0.0) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        [
            sys.executable,
            "-m",
            "web.cli",
            "fake-upstream",
            "--port",
            str(port),
            "--latency",
            str(latency),
            "--token-delay",
            str(token_delay),
        ],
        {},
    )
    process.wait_for("fake upstream listening")
    return process, f"http://127.0.0.1:{port}"


def replica(workers: int, env: dict[str, str]) -> tuple[Process, str]:
    """``dspy-trio serve --workers N`` on a port of its own; returns once every worker serves."""
    port = free_port()
    process = Process(
        [sys.executable, "-m", "dspy_trio.web.cli", "serve", "--port", str(port), "--workers", str(workers)],
        env,
    )
    return process, f"http://127.0.0.1:{port}"


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
