"""Per-field text of ChatAdapter output equals what DSPy parses, however the text is chunked."""

from __future__ import annotations

import dspy
import pytest

from dspy_trio.engine._chat_fields import ChatFieldScanner

from .helpers import random_chunks

SIGNATURE = dspy.Signature("question -> reasoning, answer")
TEXT = (
    "Sure.\n[[ ## reasoning ## ]]\n  First [a] then [[b]] and [[ not a header ]] too.\n\n"
    "Second paragraph   \n\n[[ ## answer ## ]]\nThe answer: x[0] = 1 [\n\n[[ ## completed ## ]]\n"
)


def scan(pieces: list[str]) -> dict[str, str]:
    scanner = ChatFieldScanner(["reasoning", "answer"])
    out: dict[str, str] = {}
    for piece in pieces:
        for field, text in scanner.feed(piece):
            assert text, "no empty deltas"
            out[field] = out.get(field, "") + text
    for field, text in scanner.finish():
        out[field] = out.get(field, "") + text
    return out


@pytest.mark.parametrize("seed", range(30))
def test_any_chunking_matches_dspys_own_parse(seed: int) -> None:
    expected = dspy.ChatAdapter().parse(SIGNATURE, TEXT)
    assert scan(random_chunks(TEXT, seed, 8)) == expected


def test_text_is_emitted_as_soon_as_it_cannot_be_a_header() -> None:
    scanner = ChatFieldScanner(["answer"])
    assert scanner.feed("[[ ## answer ## ]]\nHello") == [("answer", "Hello")]
    assert scanner.feed(" world [") == [("answer", " world")]
    assert scanner.feed("x") == [("answer", " [x")]
    assert scanner.feed("  ") == []
    assert scanner.feed("\n\n[[ ## completed ## ]]") == []
    assert scanner.finish() == []


def test_a_stream_cut_before_its_end_marker_flushes_on_finish() -> None:
    scanner = ChatFieldScanner(["answer"])
    assert scanner.feed("[[ ## answer ## ]]\nabc [[ #") == [("answer", "abc")]
    assert scanner.finish() == [("answer", " [[ #")]
