"""The modules of ``dspy_trio.engine`` import each other in one direction only: no import circle, counting
the imports made only for type checking (``if TYPE_CHECKING:``) and those inside functions.

The graph is read from the source, not from ``sys.modules``: an import made only for mypy is a
dependency of the design all the same, and a circle hidden behind ``TYPE_CHECKING`` is the one that
turns into an ``ImportError`` the day somebody needs the name at run time.

An edge ``a -> b`` is written for every module or package ``a`` names in an ``import`` or ``from ...
import`` (``from .x import name`` names ``x``; ``from . import x`` names the submodule ``x``, or the
package itself when ``x`` is an attribute of its ``__init__``), and for the packages Python imports on
the way to ``b`` (``dspy_trio.engine.lm._transport`` imports ``dspy_trio.engine.lm`` first) unless ``a``
lives inside them: its own packages are already being imported when ``a`` runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

from dspy_trio import engine

PACKAGE = "dspy_trio.engine"


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module of the package under ``root``: dotted name -> (file, is a package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join([PACKAGE, *parts])] = (path, is_package)
    return found


def _imported(module: str, is_package: bool, tree: ast.AST, known: Mapping[str, object]) -> Iterator[str]:
    """The dotted names of the modules ``tree`` (the source of ``module``) imports, anywhere in it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield submodule if submodule in known else source


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (see the module docstring)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target in _imported(name, is_package, tree, modules):
            if not target.startswith(PACKAGE):
                continue
            parts = target.split(".")
            on_the_way = {".".join(parts[:i]) for i in range(1, len(parts))} - own_packages
            graph[name].update(step for step in on_the_way if step in modules)
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def _described(graph: Mapping[str, set[str]], group: list[str]) -> str:
    short = {name: name.removeprefix(PACKAGE) or "." for name in group}
    lines = [
        f"{short[name]} -> {', '.join(sorted(short[t] for t in graph[name] if t in short))}" for name in group
    ]
    return "\n  ".join(lines)


def test_the_engine_has_no_import_circle() -> None:
    graph = import_graph(Path(engine.__file__).parent)
    found = circles(graph)
    assert not found, "import circles in dspy_trio.engine:\n  " + "\n\n  ".join(
        _described(graph, group) for group in found
    )


def test_a_circle_through_a_package_init_is_found() -> None:
    """The circle finder itself: three modules in a ring are one circle; a module outside it is not."""
    graph = {
        f"{PACKAGE}._a": {f"{PACKAGE}.sub"},
        f"{PACKAGE}.sub": {f"{PACKAGE}.sub._b"},
        f"{PACKAGE}.sub._b": {f"{PACKAGE}._a"},
        f"{PACKAGE}._c": set(),
    }
    assert circles(graph) == [sorted([f"{PACKAGE}._a", f"{PACKAGE}.sub", f"{PACKAGE}.sub._b"])]


def test_the_reader_counts_type_only_relative_and_on_the_way_imports(tmp_path: Path) -> None:
    """The source reader itself: a ``TYPE_CHECKING`` import is an edge, packages imported on the way are
    edges unless the importer lives inside them, and ``from . import name`` names the package when
    ``name`` is not a submodule."""
    (tmp_path / "lm" / "_transport").mkdir(parents=True)
    (tmp_path / "__init__.py").write_text("from ._errors import E\n")
    (tmp_path / "_errors.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._stats import Outcome\n"
    )
    (tmp_path / "_stats.py").write_text("from .lm._transport._pool import Pool\n")
    (tmp_path / "lm" / "__init__.py").write_text("from . import openai\n")
    (tmp_path / "lm" / "openai.py").write_text("from .. import _errors\nfrom . import TrioLM\n")
    (tmp_path / "lm" / "_transport" / "__init__.py").write_text("")
    (tmp_path / "lm" / "_transport" / "_pool.py").write_text("from ..._errors import E\n")
    graph = {
        name.removeprefix(PACKAGE): {t.removeprefix(PACKAGE) for t in targets}
        for name, targets in import_graph(tmp_path).items()
    }
    assert graph == {
        "": {"._errors"},
        "._errors": {"._stats"},
        "._stats": {".lm", ".lm._transport", ".lm._transport._pool"},
        ".lm": {".lm.openai"},
        ".lm.openai": {"._errors", ".lm"},
        ".lm._transport": set(),
        ".lm._transport._pool": {"._errors"},
    }


def test_the_command_line_imports_the_serving_stack_only_to_serve() -> None:
    """``dspy-trio predict``, ``--version`` and every usage error start without the app, Hypercorn's
    serving code and the MCP SDK (about a second of imports): ``web/cli.py`` imports ``web/server.py``
    only on the serve path."""
    import subprocess
    import sys

    heavy = ("dspy_trio.web.server", "dspy_trio.web.app", "mcp", "quart")
    probe = f"import sys, dspy_trio.web.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
