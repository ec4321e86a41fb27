"""The bench extra (matplotlib, FastAPI, uvicorn) is optional: a benchmark that needs a package of it says so
at its start, and one that only plots with it prints its tables and JSON without the plot."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

INSTALL = ".venv/bin/pip install -e '.[bench]' (or make bench)"


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that are not installed (found without importing them)."""
    return [module for module in modules if importlib.util.find_spec(module) is None]


def require(*modules: str, why: str) -> None:
    """Stop at once, with one line saying what to install, if a module the benchmark needs is missing.

    Raises:
        SystemExit: exit code 2, after a line on stderr naming the modules, why they are needed and how
            to get them.
    """
    if absent := missing(*modules):
        print(f"{', '.join(absent)} not installed ({why}): {INSTALL}", file=sys.stderr)
        raise SystemExit(2)


def plot_if_possible(plot: Callable[[], None], path: Path) -> None:
    """Run ``plot`` (which writes ``path``) when matplotlib is installed; else say how to get the plot."""
    if missing("matplotlib"):
        print(f"no plot ({path.name}): matplotlib is not installed; for plots: {INSTALL}")
        return
    plot()
    print(f"plot: {path}")
