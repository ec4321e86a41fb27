"""The dspy-trio command line, run as users run it: a subprocess, its exit code, its stdout and stderr.

Exit codes: 0 done, 1 internal error, 2 usage or configuration error, 3 no answer within --timeout,
4 the prediction failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from dspy_trio.web.cli import main

ROOT = Path(__file__).resolve().parent.parent
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
LOG_LINE = re.compile(rf"^{TIMESTAMP} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
LM_VARIABLES = (
    "LM_PROVIDER",
    "LM_API_BASE",
    "LM_MODEL",
    "LM_API_KEY",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "DSPY_TRIO_CONFIG",
    "DSPY_TRIO_PORT",
    "PYTHONPATH",
)


def clean_env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LM_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", **changes}


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = await trio.run_process(
        [sys.executable, "-m", "dspy_trio.web.cli", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env or clean_env(),
        cwd=ROOT,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def problem_lines(stderr: str) -> list[str]:
    """What stderr says besides the timestamped log lines."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not LOG_LINE.match(line) and not line.startswith('{"ts":')
    ]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    (tmp_path / "broken.toml").write_text("[lms.default\nprovider = 'openai'\n")
    (tmp_path / "unknown_key.toml").write_text("[engine]\nmax_in_fligth = 3\n")
    # An LM nobody listens to: only the LM_* variables can make this configuration answer.
    (tmp_path / "dead_lm.toml").write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "m"\napi_base = "http://127.0.0.1:9/v1"\n'
        "retry = { max_attempts = 1 }\nhttp = { connect_timeout = 2 }\n"
    )
    return tmp_path


async def test_user_errors_are_one_line_and_exit_code_2(busy_port: int, configs: Path) -> None:
    cases = {
        ("--bogus", "predict", "q"): "unrecognized arguments: --bogus",
        ("predict", "--timeout", "-1", "q"): "argument --timeout: must be more than 0, got '-1'",
        ("predict", "--timeout", "soon", "q"): "argument --timeout: expected a number, got 'soon'",
        ("predict", "--config", str(configs / "missing.toml"), "q"): "cannot read config file",
        ("predict", "--config", str(configs / "broken.toml"), "q"): "cannot read config file",
        ("serve", "--config", str(configs / "unknown_key.toml")): "unknown key(s) max_in_fligth",
        ("predict", "--program", "summarize", "--input", "text=x"): "unknown program 'summarize'",
        ("predict", "--input", "nope=1"): "unknown input field 'nope'",
        ("predict", "--input", "novalue"): "--input takes FIELD=VALUE, got 'novalue'",
        ("serve", "--port", str(busy_port)): f"cannot listen on 127.0.0.1:{busy_port}: the address is "
        "already in use",
        ("serve", "--workers", "0"): "argument --workers: must be more than 0, got '0'",
        ("--log-level", "LOUD", "predict", "q"): "unknown level 'LOUD'",
        ("fake-upstream", "--port", str(busy_port)): "cannot listen: Address already in use",
    }
    results: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}

    async def run(args: tuple[str, ...]) -> None:
        results[args] = await cli(*args)

    async with trio.open_nursery() as nursery:
        for args in cases:
            nursery.start_soon(run, args)
    for args, expected in cases.items():
        result = results[args]
        assert "Traceback" not in result.stderr, (args, result.stderr)
        [line] = problem_lines(result.stderr)
        assert line.startswith("dspy-trio"), (args, line)
        assert expected in line, (args, line)
        assert result.returncode == 2, (args, result.returncode, result.stderr)


def free_port() -> int:
    """A port nothing listens on now (for a command that must fail before it listens)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def user_mistakes(tmp_path: Path) -> Path:
    """Config files and program modules with the mistakes a new user makes."""
    (tmp_path / "typo_module.toml").write_text('[programs.summarize]\nsource = "summarise_prog:program"\n')
    (tmp_path / "raising.py").write_text('raise RuntimeError("the database is down")\n')
    (tmp_path / "raising.toml").write_text('[programs.boom]\nsource = "raising:program"\n')
    return tmp_path


# (arguments, environment, what the one line must say): every user error of `serve` (and the same of
# `predict`) is one line on stderr and exit code 2, before anything listens. One case per path through
# the command; the value checks behind them are tested in process (test_web_settings.py, test_config.py,
# test_web_preflight.py).
SERVE_MISTAKES: list[tuple[tuple[str, ...], dict[str, str], str]] = [
    (("serve", "--config", "{d}/typo_module.toml"), {}, "program 'summarize': cannot import"),
    (("predict", "--config", "{d}/typo_module.toml", "--program", "summarize"), {}, "cannot import"),
    (
        ("serve", "--config", "{d}/raising.toml"),
        {"PYTHONPATH": "{d}"},
        "program 'boom': importing 'raising:program' raised RuntimeError: the database is down",
    ),
    (
        ("predict", "--config", "{d}/raising.toml", "--program", "boom"),
        {"PYTHONPATH": "{d}"},
        "raised RuntimeError: the database is down",
    ),
    (
        ("serve", "--workers", "2", "--port", "{free_port}", "--config", "{d}/typo_module.toml"),
        {},
        "program 'summarize': cannot import",
    ),
    (
        ("serve", "--workers", "2", "--port", "0"),
        {},
        "2 workers need a fixed port (--port or DSPY_TRIO_PORT)",
    ),
    (("serve", "--port", "99999"), {}, "argument --port: must be a port number (0-65535), got '99999'"),
    (("serve", "--host", "192.0.2.1"), {}, "the address is not one of this machine's"),
    (("serve",), {"DSPY_TRIO_PORT": "99999"}, "DSPY_TRIO_PORT='99999': port must be at most 65535"),
    (("serve",), {"DSPY_TRIO_PORT": "80.5"}, "DSPY_TRIO_PORT must be an integer, got '80.5'"),
    (("serve",), {"LM_ADAPTER": "jsn"}, "LM_ADAPTER='jsn': adapter must be one of chat, json"),
    (("serve",), {"DSPY_TRIO_REDIS_URL": "127.0.0.1:6379"}, "DSPY_TRIO_REDIS_URL='127.0.0.1:6379'"),
    (
        ("serve",),
        {"LM_API_BASE": "https://api.openai.com/v1", "LM_MODEL": "gpt-4o-mini"},
        "LM 'default' calls https://api.openai.com/v1 without an API key: set LM_API_KEY (or OPENAI_API_KEY)",
    ),
    (
        ("predict", "q"),
        {"LM_PROVIDER": "anthropic", "LM_MODEL": "claude-x"},
        "calls https://api.anthropic.com without an API key: set LM_API_KEY (or ANTHROPIC_API_KEY)",
    ),
]


async def test_every_user_error_of_serve_is_one_line_and_exit_code_2(user_mistakes: Path) -> None:
    results: dict[int, subprocess.CompletedProcess[str]] = {}
    limiter = trio.CapacityLimiter(4)  # each run imports DSPy: a few at a time on 2 cores

    async def run(index: int, args: tuple[str, ...], env: dict[str, str]) -> None:
        async with limiter:
            arguments = [a.format(d=user_mistakes, free_port=free_port()) for a in args]
            if arguments[0] == "serve" and "--port" not in arguments:
                arguments += ["--port", "0"]  # should a mistake go unnoticed: never the default port
            results[index] = await cli(
                *arguments, env=clean_env(**{k: v.format(d=user_mistakes) for k, v in env.items()})
            )

    async with trio.open_nursery() as nursery:
        for index, (args, env, _) in enumerate(SERVE_MISTAKES):
            nursery.start_soon(run, index, args, env)
    for index, (args, env, expected) in enumerate(SERVE_MISTAKES):
        result = results[index]
        assert "Traceback" not in result.stderr, (args, env, result.stderr)
        assert "internal error" not in result.stderr, (args, env, result.stderr)
        [line] = problem_lines(result.stderr)
        assert line.startswith("dspy-trio"), (args, env, line)
        assert expected in line, (args, env, line)
        assert result.returncode == 2, (args, env, result.returncode, result.stderr)


async def test_env_port_that_is_not_a_number_is_a_configuration_error() -> None:
    result = await cli("serve", env=clean_env(DSPY_TRIO_PORT="eighty"))
    assert result.returncode == 2
    assert problem_lines(result.stderr) == [
        "dspy-trio: configuration error: DSPY_TRIO_PORT must be a number, got 'eighty'"
    ]


async def test_version() -> None:
    result = await cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"dspy-trio \d+\.\d+\.\d+\S*\n", result.stdout)


async def test_predict_announces_the_simulated_lm_and_stamps_logs_in_utc() -> None:
    result = await cli("predict", "What is Trio?")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["answer"]
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, result.stderr
    assert "SIMULATED LM" in warnings[0]
    assert re.match(rf"^{TIMESTAMP} WARNING dspy_trio.web.cli: no LM configured", warnings[0])
    # the request's log line stays one JSON object, now with its time first
    [request_line] = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert re.fullmatch(TIMESTAMP, request_line["ts"])
    assert request_line["outcome"] == "succeeded"
    assert next(iter(request_line)) == "ts"


async def serve_until_listening(*args: str, env: dict[str, str]) -> tuple[trio.Process, str, str]:
    """Start `dspy-trio serve --port 0 ...`; return it with its URL and what it wrote to stderr so far."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dspy_trio.web.cli", "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert process.stderr is not None
    buffer = ""
    while "serving on " not in buffer:
        chunk = await process.stderr.receive_some()
        if not chunk:
            raise AssertionError(f"server exited early: {buffer}")
        buffer += chunk.decode()
    url = buffer.split("serving on ")[1].split()[0]
    return process, url, buffer


async def stop(process: trio.Process) -> None:
    process.terminate()
    assert await process.wait() == 0


async def test_serve_logs_which_lm_it_serves_and_never_its_key() -> None:
    """One line per LM before serving: provider, model, API root (no password, no query), whether a key
    is set and stream_upstream; the key itself appears nowhere."""
    env = clean_env(
        LM_API_BASE="http://user:hunter2@127.0.0.1:9/v1?token=t0ps3cret",
        LM_MODEL="smollm2",
        LM_API_KEY="sk-never-shown",
        LM_STREAM_UPSTREAM="true",
    )
    process, _, stderr = await serve_until_listening(env=env)
    await stop(process)
    [line] = [line for line in stderr.splitlines() if " dspy_trio.web.cli: LM " in line]
    assert line.endswith(
        "INFO dspy_trio.web.cli: LM default: openai, model 'smollm2', at http://127.0.0.1:9/v1, API key set, "
        "stream_upstream on"
    ), line
    for secret in ("sk-never-shown", "hunter2", "t0ps3cret"):
        assert secret not in stderr


async def test_serve_warns_of_a_remote_server_without_an_api_key() -> None:
    """A self-hosted server elsewhere may need no key: serve starts, with a warning that says what to set."""
    env = clean_env(LM_API_BASE="https://gpu.example.invalid/v1", LM_MODEL="m")
    process, _, stderr = await serve_until_listening(env=env)
    await stop(process)
    [warning] = [line for line in stderr.splitlines() if " WARNING " in line]
    assert warning.endswith(
        "WARNING dspy_trio.web.cli: LM 'default' sends requests to https://gpu.example.invalid/v1 "
        "without an API key: fine for a self-hosted server that needs none, else set LM_API_KEY"
    ), warning


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({}, True),
        ({"LM_API_BASE": "http://127.0.0.1:9/v1", "LM_MODEL": "m"}, False),
    ],
)
async def test_serve_announces_the_simulated_lm_before_serving(env: dict[str, str], warned: bool) -> None:
    process, url, stderr = await serve_until_listening(env=clean_env(**env))
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/ready")).status_code == 200
    finally:
        await stop(process)
    warnings = [line for line in stderr.splitlines() if " WARNING " in line]
    assert bool(warnings) is warned, stderr
    if warned:
        assert re.match(
            rf"^{TIMESTAMP} WARNING dspy_trio.web.cli: no LM configured: the built-in SIMULATED LM",
            warnings[0],
        )
    assert all(LOG_LINE.match(line) for line in stderr.splitlines() if line.strip()), stderr


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """main() installs its log handlers; take them away again, with their captured stderr."""
    root, requests = logging.getLogger(), logging.getLogger("dspy_trio.engine.requests")
    saved = (list(root.handlers), root.level, list(requests.handlers), requests.propagate)
    yield
    root.handlers[:], root.level, requests.handlers[:], requests.propagate = saved


@pytest.mark.usefixtures("_restore_logging")
async def test_an_internal_error_exits_1_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr("dspy_trio.web.cli._run", broken)
    assert main(["predict", "q"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err
    assert "Traceback" in err
    assert "RuntimeError: a bug" in err


async def test_predict_and_serve_let_lm_variables_override_the_config_file(configs: Path) -> None:
    """The config file names an LM nobody listens to; LM_* variables replace it, for both commands."""
    config = str(configs / "dead_lm.toml")
    as_configured = await cli("predict", "--config", config, "q")
    assert as_configured.returncode == 4, as_configured.stderr  # the config file was read
    assert problem_lines(as_configured.stderr)[0].startswith("dspy-trio: UpstreamConnectionError")

    overridden = clean_env(LM_PROVIDER="simulated", LM_MODEL="simulated/lm")
    predicted = await cli("predict", "--config", config, "q", env=overridden)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["outputs"]["answer"]

    process, url, _ = await serve_until_listening("--config", config, env=overridden)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/v1/programs/default/predict", json={"inputs": {"question": "q"}})
            assert response.status_code == 200, response.text
    finally:
        await stop(process)


async def test_a_key_in_a_tenant_and_in_dspy_trio_api_keys_is_a_configuration_error(tmp_path: Path) -> None:
    """`serve` refuses before it listens, naming both places and never the key."""
    config = tmp_path / "tenants.toml"
    config.write_text('[tenants.acme]\nkeys = ["sk-shared-secret-1"]\n')
    env = clean_env(DSPY_TRIO_CONFIG=str(config), DSPY_TRIO_API_KEYS="other,sk-shared-secret-1")
    result = await cli("serve", env=env)
    assert result.returncode == 2
    [line] = problem_lines(result.stderr)
    assert "tenants.acme.keys[0] is the same key as DSPY_TRIO_API_KEYS[1]" in line
    assert "sk-shared-secret-1" not in result.stderr
