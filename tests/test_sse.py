"""The event-stream reader both transports share (engine/lm/_sse.py): framing for any segmentation of
the bytes, the cap on one event (and one line), and strict UTF-8."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine.lm._body import BadResponse
from dspy_trio.engine.lm._sse import EventReader


def read(chunks: list[bytes], cap: int = 1 << 20) -> list[tuple[str, str]]:
    reader = EventReader(cap)
    events: list[tuple[str, str]] = []
    for chunk in chunks:
        events += reader.feed(chunk)
    return events + reader.end()


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({min(p, len(data)) for p in points})
    return [data[a:b] for a, b in zip([0, *marks], [*marks, len(data)], strict=True)]


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=6)
events = st.lists(
    st.tuples(st.sampled_from([None, "delta", "ping"]), st.lists(texts, min_size=1, max_size=3)), max_size=6
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=events,
    ending=st.sampled_from(["\n", "\r\n", "\r"]),
    comments=st.booleans(),
    points=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_segmentation_gives_the_events_of_the_whole_body(
    stream: list[tuple[str | None, list[str]]], ending: str, comments: bool, points: list[int]
) -> None:
    """Events split across reads anywhere — inside a line, between ``\\r`` and ``\\n``, inside a UTF-8
    character — come out as they went in."""
    body = ""
    for name, lines in stream:
        body += f": keep-alive{ending}" if comments else ""
        body += f"event: {name}{ending}" if name else ""
        body += "".join(f"data: {line}{ending}" for line in lines) + ending
    data = body.encode()
    expected = [(name or "message", "\n".join(lines)) for name, lines in stream]
    assert read([data]) == expected
    assert read(cut(data, points)) == expected


def test_a_cr_ending_one_read_and_a_lf_starting_the_next_are_one_line_end() -> None:
    reader = EventReader(1024)
    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\n") == []
    assert reader.feed(b"\r\n") == [("message", "a")]


def test_the_last_event_completes_when_the_body_ends_without_a_blank_line() -> None:
    assert read([b"data: a\n\ndata: b"]) == [("message", "a"), ("message", "b")]
    assert read([b"data: a\n\n: only a comment"]) == [("message", "a")]


def test_fields_other_than_data_and_event_are_ignored_and_a_bare_data_line_is_empty() -> None:
    assert read([b"id: 7\nretry: 10\ndata\ndata:x\nfoo: bar\n\n"]) == [("message", "\nx")]


# --- the cap on one event ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", [None, 1, 7, 8, 9, 100])
def test_an_event_exactly_at_the_cap_passes_and_one_byte_more_is_refused(split: int | None) -> None:
    """The cap counts an event's data with the newlines joining its lines; the same wherever the
    reads are cut (at the cap's boundary too)."""
    at_cap = b"data: " + b"a" * 49 + b"\ndata: " + b"b" * 50 + b"\n\n"  # 49 + 1 + 50 = 100 bytes of data
    over = b"data: " + b"a" * 50 + b"\ndata: " + b"b" * 50 + b"\n\n"
    chunks = (
        (lambda d: [d]) if split is None else (lambda d: [d[i : i + split] for i in range(0, len(d), split)])
    )
    assert read(chunks(at_cap), cap=100) == [("message", "a" * 49 + "\n" + "b" * 50)]
    with pytest.raises(BadResponse, match="larger than 100 bytes"):
        read(chunks(over), cap=100)


def test_data_lines_that_never_end_an_event_are_refused_at_the_cap() -> None:
    reader = EventReader(10_000)
    line = b"data: " + b"x" * 1000 + b"\n"
    for _ in range(9):
        assert reader.feed(line) == []
    with pytest.raises(BadResponse, match="larger than 10000 bytes"):
        reader.feed(line)


def test_a_line_that_never_ends_is_refused_at_the_cap_without_holding_more() -> None:
    reader = EventReader(1000)
    for _ in range(9):
        assert reader.feed(b"x" * 100) == []
    with pytest.raises(BadResponse):
        reader.feed(b"x" * 101)


def test_a_comment_line_longer_than_the_cap_is_refused_too() -> None:
    with pytest.raises(BadResponse):
        read([b": " + b"x" * 2000 + b"\n"], cap=1000)


# --- UTF-8 ---------------------------------------------------------------------------------------------


def test_invalid_utf8_in_an_event_is_refused_not_replaced() -> None:
    with pytest.raises(BadResponse, match="not UTF-8"):
        read([b'data: {"content": "caf\xe9"}\n\n'])
    with pytest.raises(BadResponse, match="not UTF-8"):
        read([b"event: \xff\ndata: x\n\n"])


def test_a_character_split_across_reads_is_one_character() -> None:
    data = 'data: "日本"\n\n'.encode()
    assert read([data[:8], data[8:10], data[10:]]) == [("message", '"日本"')]


# --- attacks on the reader (found by the upstream attack round; the fix flips them) -------------------


@pytest.mark.parametrize("split", [None, 1, 2, 3, 4])
def test_a_byte_order_mark_before_the_first_event_is_stripped_not_the_event(split: int | None) -> None:
    """The SSE standard strips one leading U+FEFF from the stream. Without that, an upstream (or a proxy)
    that starts its stream with a BOM loses its first event: for a chat completion, the first delta of
    the answer disappears and the call still succeeds with a truncated text."""
    body = b"\xef\xbb\xbfdata: first\n\ndata: second\n\n"
    chunks = [body] if split is None else [body[:split], body[split:]]
    assert read(chunks) == [("message", "first"), ("message", "second")]


@pytest.mark.parametrize("split", [None, 1, 6, 7, 100])
def test_one_data_line_of_exactly_the_cap_passes(split: int | None) -> None:
    """``max_event_bytes`` is documented as the most one event's data may hold: an event whose one
    ``data:`` line carries exactly that many bytes is within it (and one byte more is not)."""
    at_cap = b"data: " + b"a" * 100 + b"\n\n"
    over = b"data: " + b"a" * 101 + b"\n\n"
    chunks = (
        (lambda d: [d]) if split is None else (lambda d: [d[i : i + split] for i in range(0, len(d), split)])
    )
    assert read(chunks(at_cap), cap=100) == [("message", "a" * 100)]
    with pytest.raises(BadResponse, match="larger than 100 bytes"):
        read(chunks(over), cap=100)
