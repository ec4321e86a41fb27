"""Schemathesis over /openapi.json against the real server: every documented operation, with data that fits
the schema and data that does not (its examples, coverage and fuzzing phases), and every answer checked.

The checks (Schemathesis's, plus tests/schema_checks.py): no 5xx; every status, content type, header and
body as documented for that operation; schema-valid requests accepted and invalid ones refused; requests
without the API key refused; every 4xx a JSON error naming the problem (the service's shape, OpenAI's; on
/mcp the SDK's JSON-RPC errors too). Afterwards the server is healthy: ready, nothing left in flight, and
it still answers a prediction.

The run is bounded and deterministic (``tests/schemathesis.toml``, a few examples per operation); ``pytest
tests/test_web_schema_fuzz.py --schema-examples 200`` runs a longer, randomized one (docs/testing.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import trio

from .helpers import wait_until
from .web_helpers import running, settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "schemathesis.toml"
EXAMPLES = 5  # per operation and phase, in the default (deterministic) run
KEY = "k"


def command(url: str, examples: int | None) -> list[str]:
    """The Schemathesis CLI run over the server at ``url`` (``examples``: a longer, randomized run)."""
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "not_a_server_error",  # schema_checks.no_server_error instead
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        str(examples or EXAMPLES),
        *([] if examples else ["--generation-deterministic"]),
        "--workers",
        "1",
        "--no-color",
        "--output-truncate",
        "false",
        "--output-sanitize",
        "false",
    ]


async def test_every_documented_operation_holds_to_its_schema(request: pytest.FixtureRequest) -> None:
    examples: int | None = request.config.getoption("--schema-examples")
    async with (
        running(settings(api_keys=(KEY,))) as server,
        httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client,
    ):
        run = await trio.run_process(
            command(server.url, examples),
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        report = (run.stdout + run.stderr).decode(errors="replace")
        print(report)  # pytest -s shows it: the operations, phases, cases generated, the seed
        assert run.returncode == 0, report
        assert "Tested: " in report, report
        # Healthy afterwards: ready, no request left in flight, and a prediction still answered.
        assert (await client.get("/ready")).status_code == 200
        engine = server.state.require_engine()
        await wait_until(lambda: engine.statistics().in_flight == 0)
        answer = await client.post("/predict", json={"question": "still there?"})
        assert answer.status_code == 200, answer.text
