"""Project-wide pytest set-up: the engine's pytest plugin, loaded explicitly as any user's project would,
and the project's own options."""

from __future__ import annotations

import pytest

pytest_plugins = ["dspy_trio.engine.testing.pytest_plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sc-deep",
        action="store_true",
        default=False,
        help="run the structured-concurrency properties with ten times the examples, randomized",
    )
    parser.addoption(
        "--schema-examples",
        type=int,
        default=None,
        help="run Schemathesis over /openapi.json with this many examples per operation, randomized",
    )
