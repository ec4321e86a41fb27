"""The body decoder both transports share (engine/lm/_body.py): the cap on a whole answer, bounded
inflation, and the encodings it refuses."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine.lm._body import PIECE, BadResponse, BodyDecoder, check_content_type, content_coding


def decode(chunks: list[bytes], coding: str | None, limit: int) -> tuple[bytes, int]:
    """The body, and the largest piece the decoder ever made."""
    decoder = BodyDecoder(coding, limit)
    out: list[bytes] = []
    for chunk in chunks:
        out += list(decoder.feed(chunk))
    decoder.end()
    return b"".join(out), max((len(p) for p in out), default=0)


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize("coding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("size", [1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE])
def test_a_body_exactly_at_the_cap_passes_and_one_byte_more_is_refused(coding: str | None, size: int) -> None:
    """At the cap, wherever it falls against the pieces (64 KiB) the inflater makes."""
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    packed = {None: body, "gzip": gzip.compress(body), "deflate": deflate(body)}[coding]
    assert decode([packed], coding, size)[0] == body
    with pytest.raises(BadResponse, match=f"larger than {size - 1} bytes"):
        decode([packed], coding, size - 1)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=0, max_value=3 * PIECE),
    limit_delta=st.integers(min_value=-3, max_value=3),
    points=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_the_cap_holds_for_any_segmentation_of_the_compressed_bytes(
    size: int, limit_delta: int, points: list[int]
) -> None:
    body = b"ab" * (size // 2)
    packed = gzip.compress(body)
    marks = sorted({min(p, len(packed)) for p in points})
    chunks = [packed[a:b] for a, b in zip([0, *marks], [*marks, len(packed)], strict=True)]
    limit = max(0, len(body) + limit_delta)
    if limit >= len(body):
        assert decode(chunks, "gzip", limit)[0] == body
    else:
        with pytest.raises(BadResponse, match="larger than"):
            decode(chunks, "gzip", limit)


def test_a_bomb_in_one_chunk_is_inflated_a_piece_at_a_time_and_stops_at_the_cap() -> None:
    """100 MB in ~100 KB, all at once: no piece is larger than PIECE, and inflating stops one byte past
    the cap (the decoder's count), not at the end of the chunk."""
    bomb = gzip.compress(b"\0" * 100_000_000)
    decoder = BodyDecoder("gzip", 4 << 20)
    sizes: list[int] = []

    def inflate() -> None:
        for piece in decoder.feed(bomb):
            sizes.append(len(piece))
            assert decoder.more

    with pytest.raises(BadResponse):
        inflate()
    assert decoder.size == (4 << 20) + 1
    assert sizes == [PIECE] * ((4 << 20) // PIECE)


def test_more_says_when_another_piece_of_the_same_chunk_follows() -> None:
    decoder = BodyDecoder("gzip", 1 << 30)
    flags = [decoder.more for _ in decoder.feed(gzip.compress(b"z" * (2 * PIECE + 10)))]
    assert flags == [True, True, False]


def test_a_compressed_body_cut_short_or_followed_by_more_data_is_refused() -> None:
    packed = gzip.compress(b"hello world" * 100)
    with pytest.raises(BadResponse, match="ended early"):
        decode([packed[:-6]], "gzip", 1 << 20)
    with pytest.raises(BadResponse, match="after the end"):
        decode([packed + b"garbage"], "gzip", 1 << 20)
    with pytest.raises(BadResponse, match="after the end"):
        decode([packed, packed], "gzip", 1 << 20)  # a second gzip member is more data, not more body
    with pytest.raises(BadResponse, match="corrupt"):
        decode([b"not gzip at all"], "gzip", 1 << 20)


@pytest.mark.parametrize(
    ("values", "coding"),
    [([], None), (["identity"], None), (["GZIP"], "gzip"), (["x-gzip"], "x-gzip"), (["deflate"], "deflate")],
)
def test_the_codings_decoded(values: list[str], coding: str | None) -> None:
    assert content_coding(values) == coding


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (["br"], "br"),
        (["zstd"], "zstd"),
        (["compress"], "compress"),
        (["gzip, gzip"], "stacked"),
        (["gzip", "deflate"], "stacked"),
        (["Bearer sk-live-secret"], "an unknown one"),
    ],
)
def test_other_codings_are_refused_and_an_unknown_name_is_not_repeated(values: list[str], named: str) -> None:
    with pytest.raises(BadResponse, match=named) as info:
        content_coding(values)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "stream", "ok"),
    [
        ("text/event-stream", True, True),
        ("Text/Event-Stream; charset=utf-8", True, True),
        (None, True, False),
        ("text/html", True, False),
        ("application/json", True, False),
        ("application/json", False, True),
        ("application/problem+json", False, True),
        (None, False, True),
        ("text/html; charset=utf-8", False, False),
    ],
)
def test_content_types(value: str | None, stream: bool, ok: bool) -> None:
    if ok:
        check_content_type(value, stream=stream)
    else:
        with pytest.raises(BadResponse, match="was asked for"):
            check_content_type(value, stream=stream)


def test_a_content_type_not_in_the_known_list_is_not_repeated() -> None:
    with pytest.raises(BadResponse) as info:
        check_content_type("sk-live-secret/value", stream=True)
    assert "secret" not in str(info.value)
    assert "another Content-Type" in str(info.value)
