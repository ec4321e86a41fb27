"""A baseline tree for benchmarks that measure this tree against another commit in one run.

``export_tree(ref, script)`` extracts ``git archive REF`` into a temporary directory and copies the running
benchmark script into it, so the baseline's workers run the same measuring code on the other tree's engine
(``PYTHONPATH`` set to the directory). A tree from before the folders were installed as ``dspy_trio.engine``
and ``dspy_trio.web`` gets a ``dspy_trio`` package of two symlinks, so the script's imports reach *that*
tree's engine; and the export is refused unless ``dspy_trio.engine`` really imports from it. Without that
check a baseline silently measured the installed (current) engine twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export_tree(ref: str, script: Path, *, prefix: str = "baseline-") -> tuple[Path, str]:
    """The tree of ``ref`` in a temporary directory, with ``script`` (and this module) copied into its
    ``benchmarks/``.

    Blocks for ``git archive`` and one interpreter start. Returns (directory, short commit).

    Raises:
        SystemExit: if ``dspy_trio.engine`` would not import from the exported tree.
    """
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=prefix))
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    for source in (script, Path(__file__)):  # the script imports this module
        (target / "benchmarks" / source.name).write_bytes(source.read_bytes())
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
