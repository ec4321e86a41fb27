"""README.md and docs/ as typed: their code blocks are extracted and run, so they cannot rot.

- README opens with the two set-up commands, ``make serve`` and ``make test``, exactly;
- every ``python`` block compiles (fragments with top-level ``await`` included); complete programs
  (``trio.run(main)``) run, against a real server on an ephemeral port when they call one;
- every line of every ``sh`` block is either run (``curl``, ``dspy-trio predict``/``--version``), started and
  stopped (``dspy-trio serve``/``fake-upstream``), or named here as not runnable offline;
- every ``toml`` block loads as an ``EngineConfig``;
- the pytest-plugin example runs as written in a fresh project, and the plugin stays out of projects that
  did not ask for it.

The documents' structure (length, links, anchors, wording) is checked in tests/test_docs.py.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio

from dspy_trio.engine import EngineConfig
from tests.helpers import variables_the_service_reads
from tests.web_helpers import running

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCUMENTS = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
}
# Complete programs that are measurements of a minute's CPU, not examples: compiled, not run.
NOT_RUN_PROGRAMS = ("docs/dspy-engines.md",)
BIN = str(Path(sys.executable).parent)
LM_VARIABLES = ("LM_PROVIDER", "LM_API_BASE", "LM_MODEL", "LM_API_KEY", "DSPY_TRIO_CONFIG", "PYTHONPATH")
# Lines that need more than this machine offers offline, or that install: shown, not run.
NOT_RUN = ("make ", "scripts/", "docker ", "vllm ", "ollama ")


def blocks(language: str, documents: tuple[str, ...] | None = None) -> list[str]:
    """The ``language`` code blocks of every document (or of those named), in order."""
    found = []
    for name, text in DOCUMENTS.items():
        if documents is None or name in documents:
            found += re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    return found


def sh_lines() -> list[str]:
    """Each command of the sh blocks, continuation lines joined."""
    lines = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


def as_typed(line: str, port: int | None = None) -> str:
    """The command with the venv prefix resolved (the README's `.venv/bin/`) and, given a port, the
    README's default address replaced by the test server's."""
    line = line.replace(".venv/bin/", f"{BIN}/")
    if port is not None:
        line = line.replace("localhost:8000", f"127.0.0.1:{port}")
    return line


def clean_env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LM_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", **changes}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kind(line: str) -> str:
    command = re.sub(r"^(\w+=\S+ )+", "", line)  # leading VAR=value assignments
    if command.startswith(NOT_RUN):
        return "not run"
    if command.startswith("curl "):
        return "curl"
    if command.startswith(".venv/bin/dspy-trio serve") or command.startswith(
        ".venv/bin/dspy-trio fake-upstream"
    ):
        return "server"
    if command.startswith(".venv/bin/dspy-trio"):
        return "command"
    return "unknown"


def test_readme_opens_with_the_two_setup_commands() -> None:
    """The first thing a newcomer types: ``make serve`` and ``make test``, in the README's first code
    block, before any other command."""
    first = re.search(r"^```(\w*)\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)
    assert first is not None
    assert first.group(1) == "sh"
    commands = [line.split("#")[0].strip() for line in first.group(2).splitlines() if line.strip()]
    assert commands == ["make serve", "make test"]


def test_every_toml_block_loads_as_an_engine_config() -> None:
    """A configuration shown in the documents is one the engine accepts (keys, tables, values)."""
    found = blocks("toml")
    assert found
    for block in found:
        data = tomllib.loads(block.replace('secret = "..."', 'secret = "an-example-secret-of-32-chars"'))
        config = EngineConfig.from_mapping(data, env={"OPENAI_API_KEY": "sk-example", "ACME_KEYS": "k1,k2"})
        assert config.lms


def test_every_shell_line_is_understood() -> None:
    lines = sh_lines()
    assert len(lines) > 10
    unknown = [line for line in lines if kind(line) == "unknown"]
    assert unknown == [], "a README command this test does not know how to check"
    not_run = [line for line in lines if kind(line) == "not run"]
    assert all(line.startswith("make ") for line in not_run), not_run


def test_commands_for_a_self_hosted_model_stop_it_on_cancel() -> None:
    """A self-hosted server (llama.cpp) finishes a non-streamed request whose client left, its only slot
    busy for the whole generation, unless calls go upstream as streams: every README command that points
    the service at a model on this machine sets LM_STREAM_UPSTREAM=true."""
    self_hosted = [
        line for line in sh_lines() if re.search(r"LM_API_BASE=http://(127\.0\.0\.1|localhost)", line)
    ]
    assert self_hosted
    for line in self_hosted:
        assert "LM_STREAM_UPSTREAM=true" in line, line


def test_commands_set_only_variables_the_service_reads() -> None:
    named = {name for line in sh_lines() for name in re.findall(r"\b((?:LM|DSPY_TRIO)_[A-Z_]+)=", line)}
    assert "LM_API_BASE" in named
    assert named <= variables_the_service_reads(), named - variables_the_service_reads()


def test_every_python_block_compiles() -> None:
    found = blocks("python")
    assert len(found) >= 6
    for code in found:
        compile(code, "<README>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


async def test_commands_run_as_typed() -> None:
    """`dspy-trio predict ...` and `--version` lines exit 0 (offline: the simulated LM answers)."""
    commands = [line for line in sh_lines() if kind(line) == "command"]
    assert any("--program summarize" in line for line in commands)
    assert any("PYTHONPATH=examples" in line for line in commands)
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(line: str) -> None:
        results[line] = await trio.run_process(
            ["bash", "-c", as_typed(line)],
            cwd=ROOT,
            env=clean_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    async with trio.open_nursery() as nursery:
        for line in commands:
            nursery.start_soon(run, line)
    for line, result in results.items():
        assert result.returncode == 0, (line, result.stderr.decode())
        assert result.stdout.strip(), line


async def test_servers_start_as_typed() -> None:
    """`dspy-trio serve ...` and `fake-upstream` lines listen (on a free port) and stop on SIGTERM."""
    lines = [line for line in sh_lines() if kind(line) == "server"]
    assert len(lines) >= 3

    async def start_and_stop(line: str) -> None:
        # A free port; port 0 where one process listens (several workers need one fixed port).
        port = free_port() if "--workers" in line else 0
        command = re.sub(r"--port \d+", f"--port {port}", as_typed(line))
        process = await trio.lowlevel.open_process(
            ["bash", "-c", command],  # one simple command: bash execs it, so SIGTERM reaches it,
            cwd=ROOT,
            env=clean_env(DSPY_TRIO_PORT="0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        output = b""
        try:
            while b"serving on " not in output and b"listening on " not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, (line, output.decode())
                output += chunk
        finally:
            process.send_signal(signal.SIGTERM)
            await process.wait()
        assert b"Traceback" not in output, output.decode()

    async with trio.open_nursery() as nursery:
        for line in lines:
            nursery.start_soon(start_and_stop, line)


async def test_try_it_curls_and_python_programs_against_a_real_server() -> None:
    curls = [line for line in sh_lines() if kind(line) == "curl"]
    runnable = tuple(name for name in DOCUMENTS if name not in NOT_RUN_PROGRAMS)
    programs = [code for code in blocks("python", runnable) if "trio.run(main)" in code]
    assert len(curls) >= 5
    assert len(programs) >= 3
    async with running() as server:
        port = int(server.url.rsplit(":", 1)[1])
        for line in curls:
            # --fail-with-body: an HTTP error is a failed command here (the README omits it for brevity)
            typed = as_typed(line, port).replace("curl ", "curl --fail-with-body --max-time 20 ")
            result = await trio.run_process(
                ["bash", "-c", typed], capture_stdout=True, capture_stderr=True, check=False
            )
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            assert result.stdout, line
        for code in programs:
            result = await trio.run_process(
                [sys.executable, "-c", code.replace("http://127.0.0.1:8000", server.url)],
                cwd=ROOT,
                env=clean_env(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()
            assert result.stdout.strip()


def plugin_example() -> tuple[str, str]:
    conftest = next(code for code in blocks("python") if code.startswith("# conftest.py"))
    test = next(code for code in blocks("python") if code.startswith("# test_upstream.py"))
    return conftest, test


async def pytest_in(project: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=clean_env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_the_pytest_plugin_example_runs_as_written(tmp_path: Path) -> None:
    conftest, test = plugin_example()
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_upstream.py").write_text(test)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    result = await pytest_in(tmp_path)
    assert result.returncode == 0, result.stdout.decode()
    assert b"2 passed" in result.stdout


async def test_the_plugin_is_opt_in_and_stays_out_of_other_projects(tmp_path: Path) -> None:
    """A project with its own `engine` package runs its tests; our plugin is not loaded there."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("NAME = 'theirs'\n")
    (tmp_path / "test_theirs.py").write_text(
        "import engine\n\n\ndef test_their_engine():\n    assert engine.NAME == 'theirs'\n"
    )
    result = await pytest_in(tmp_path, "--trace-config")
    assert result.returncode == 0, result.stdout.decode()
    assert b"1 passed" in result.stdout
    assert b"dspy_trio.engine.testing" not in result.stdout
    assert b"anyio.pytest_plugin" in result.stdout  # (the listing does name the plugins loaded)
    # and `-p` loads it on request
    other = tmp_path / "other"
    other.mkdir()
    (other / "test_fixture.py").write_text(
        "async def test_fixture(fake_upstream):\n    assert fake_upstream.url.startswith('http://127.0.0.1:')\n"
    )
    (other / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    loaded = await pytest_in(other, "-p", "dspy_trio.engine.testing.pytest_plugin")
    assert loaded.returncode == 0, loaded.stdout.decode()
    without = await pytest_in(other)
    assert b"fixture 'fake_upstream' not found" in without.stdout


@pytest.mark.parametrize("name", ["conftest", "test"])
def test_plugin_example_names_what_it_uses(name: str) -> None:
    """The example imports what it uses (it once used pytest and an error class without importing them)."""
    conftest, test = plugin_example()
    code = {"conftest": conftest, "test": test}[name]
    tree = ast.parse(code)
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    used = {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    fixtures = {"fake_upstream", "fake_upstream_engine", "simulated_engine"}
    assigned = {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }
    params = {
        arg.arg for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef) for arg in node.args.args
    }
    builtins = set(dir(__builtins__)) if isinstance(__builtins__, dict) is False else set(__builtins__)
    assert used - imported - fixtures - assigned - params - builtins == set()
