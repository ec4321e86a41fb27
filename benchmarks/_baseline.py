"""A baseline tree for benchmarks that measure this tree against another commit in one run.

``export_tree(ref)`` extracts ``git archive REF`` into a temporary directory and copies this tree's
``benchmarks/`` package over its own, so the baseline's workers run the same measuring code on the other
tree's engine (``PYTHONPATH`` set to the directory, see ``_measure.run_worker``). The workers therefore
configure the engine in a form every tree takes: the flat tables of ``LMConfig.from_mapping``. A tree from
before the folders were installed as ``dspy_trio.engine`` and ``dspy_trio.web`` gets a ``dspy_trio``
package of two symlinks, so the script's imports reach *that* tree's engine; and the export is refused
unless ``dspy_trio.engine`` really imports from it. Without that check a baseline silently measured the
installed (current) engine twice.

``baseline_tree(given)`` is what a benchmark's ``--baseline`` option means: the ref given, ``none``, or by
default the merge base of HEAD and main.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent

HELP = "git ref measured as 'before' (default: the merge base of HEAD and main; 'none' to skip)"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def export_tree(ref: str, *, prefix: str = "baseline-") -> tuple[Path, str]:
    """The tree of ``ref`` in a temporary directory, with this tree's ``benchmarks/`` in it.

    Blocks for ``git archive`` and one interpreter start. Returns (directory, short commit).

    Raises:
        SystemExit: if ``dspy_trio.engine`` would not import from the exported tree.
    """
    commit = _git("rev-parse", "--short", ref)
    target = Path(tempfile.mkdtemp(prefix=prefix))
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    shutil.copytree(
        BENCHMARKS,
        target / "benchmarks",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("results", "__pycache__"),
    )
    package = target / "dspy_trio"
    if not package.exists() and (target / "engine").is_dir():
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in ("engine", "web"):
            if (target / name).is_dir():
                (package / name).symlink_to(Path("..") / name, target_is_directory=True)
    found = subprocess.run(
        [sys.executable, "-c", "import dspy_trio.engine as e; print(e.__file__)"],
        capture_output=True,
        text=True,
        check=False,
        cwd=target,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.strip()
    if not found.startswith(str(target)):
        raise SystemExit(f"the baseline {ref} ({commit}) would not run its own engine (imported {found!r})")
    return target, commit


@contextmanager
def baseline_tree(given: str | None, *, prefix: str = "baseline-") -> Iterator[tuple[Path, str] | None]:
    """The baseline of a benchmark's ``--baseline`` option, exported for the block and removed after.

    ``given`` is a git ref, ``"none"`` (no baseline), or None: the merge base of HEAD and main, and no
    baseline when HEAD is that merge base (there is nothing to compare). Says which on stdout. Yields
    (directory, short commit), or None.
    """
    if given == "none":
        yield None
        return
    ref = given or _git("merge-base", "HEAD", "main")
    if given is None and ref == _git("rev-parse", "HEAD"):
        print("baseline: none (HEAD is on main; pass --baseline REF to measure one)")
        yield None
        return
    directory, commit = export_tree(ref, prefix=prefix)
    print(f"baseline: {given or 'merge-base of HEAD and main'} = {commit} ({directory})")
    try:
        yield directory, commit
    finally:
        shutil.rmtree(directory, ignore_errors=True)
