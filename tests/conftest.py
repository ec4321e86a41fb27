"""Project-wide pytest options."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sc-deep",
        action="store_true",
        default=False,
        help="run the structured-concurrency properties with ten times the examples, randomized",
    )
