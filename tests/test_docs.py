"""The documents' shape: a README a newcomer reads in minutes, the reference in docs/ reachable from it,
no link that leads nowhere, and no words about how the work was organised.

- README.md has at most 400 lines and links every docs/*.md;
- every relative link of README.md and docs/*.md names a file that exists and, with ``#anchor``, a heading
  of that file (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens, ``-1`` for repeats);
- no document, benchmark or module of engine/ and web/ speaks of issue numbers.

The code blocks of the same documents are run by tests/test_readme.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS]
FENCE = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
# "issue #13", "issue 13", "issues #4 and #5", "#13's goals": an issue tracker's numbers, not the software.
ISSUE_WORDING = re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w&/#-])#\d+\b", flags=re.IGNORECASE)


def prose(text: str) -> str:
    """``text`` without fenced code blocks (their ``#`` lines are comments, not headings)."""
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, everything but letters, digits, ``_``, ``-`` and
    spaces dropped (backticks and other punctuation too), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), flags=re.MULTILINE):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(path.read_text()))
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: ...
    ]


def test_the_anchor_rule_is_githubs() -> None:
    assert github_anchor("WebSocket: `/ws` and `/v1/ws`") == "websocket-ws-and-v1ws"
    assert github_anchor("Upstream streaming for predict (`stream_upstream`)") == (
        "upstream-streaming-for-predict-stream_upstream"
    )
    assert github_anchor("HTTP/1.1 and WebSocket only") == "http11-and-websocket-only"
    assert github_anchor("The project's own suite") == "the-projects-own-suite"


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 400, f"README.md has {lines} lines: move reference material into docs/"


def test_readme_links_every_document_in_docs() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    assert DOCS
    missing = [path.relative_to(ROOT).as_posix() for path in DOCS if path.resolve() not in linked]
    assert missing == [], "documents README.md does not link"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with this anchor")
        elif anchor and destination.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that has no headings")
    assert broken == [], f"{path.relative_to(ROOT)}: broken links"


def test_links_that_lead_nowhere_are_found() -> None:
    """The checks above can fail: a missing file, a missing anchor."""
    readme_anchors = anchors(README)
    assert "embed-the-engine" in readme_anchors
    assert "no-such-heading" not in readme_anchors
    assert not (ROOT / "docs" / "no-such-file.md").exists()


def _issue_wording(path: Path) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if ISSUE_WORDING.search(line)
    ]


def test_the_issue_rule_matches_what_it_should() -> None:
    for wording in ("issue #13's goals", "the hot path (issue 13)", "in issues #4", "see #16"):
        assert ISSUE_WORDING.search(wording), wording
    for fine in ("docs/http-api.md#errors-and-statuses", "a [link](#anchor)", "&dspy-trio:*", "0x1F"):
        assert not ISSUE_WORDING.search(fine), fine


def test_no_document_speaks_of_issues() -> None:
    found = [hit for path in DOCUMENTS for hit in _issue_wording(path)]
    assert found == [], "say what the software does and the command that measures it"


def test_no_code_comment_or_benchmark_speaks_of_issues() -> None:
    files = [
        *(ROOT / "engine").rglob("*.py"),
        *(ROOT / "web").rglob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "benchmarks" / "results").glob("*.txt"),
    ]
    assert len(files) > 50
    found = [hit for path in files for hit in _issue_wording(path)]
    assert found == [], "docstrings and comments say what the code does"
