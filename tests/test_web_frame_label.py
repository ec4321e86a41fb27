"""The bounded scan for the ``id`` of a ``/v1/ws`` frame refused before parsing (web/frame_label.py):
frames built to fool it or to make it expensive."""

from __future__ import annotations

import json
from typing import Any, SupportsIndex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_trio.web.frame_label import SCAN_BYTES, frame_label


@pytest.mark.parametrize(
    ("frame", "label"),
    [
        ('{"id": "a", "type": "predict"}', "a"),
        ('  {"type": "predict", "id": "b"}', "b"),
        ('{"id":"c"' + ', "x": 1' * 10, "c"),  # not JSON (cut short): the id is still there
        ('{"a": [[[[{"id": "inner"}]]]], "id": "outer"}', "outer"),  # deep nesting before the id
        ('{"inputs": {"id": "inner"}, "type": "stream"}', None),  # a nested object's id is not the frame's
        ('{"x": "\\"id\\": \\"fake\\"", "id": "real"}', "real"),  # "id" inside a string, escaped quotes
        ('{"x": "\\\\", "id": "after-backslash"}', "after-backslash"),  # a string ending in a backslash
        ('{"\\"id\\"": "quoted-key"}', None),  # the key is '"id"', not 'id'
        ('{"\\u0069d": "escaped-key"}', "escaped-key"),  # decoded as JSON decodes it
        ('{"id": "tab\\there"}', "tab\there"),
        ('{"id": "\\ud83d\\ude00"}', "\U0001f600"),
        ('{"id": 5}', None),
        ('{"id": ["a"]}', None),
        ('{"id": {"a": "b"}}', None),
        ('{"id": null}', None),
        ('{"id": ""}', None),
        ('{"id": "' + "x" * 129 + '"}', None),
        ('{"id": "' + "x" * 128 + '"}', "x" * 128),
        ('["id", "a"]', None),
        ('"id"', None),
        ("", None),
        ('{"id": "unterminated', None),
        ('{"a": 1} {"id": "second object"}', None),
        ('{"id" "no-colon"}', "no-colon"),  # not JSON, but plainly the client's label
    ],
)
def test_finds_the_top_level_id_and_nothing_else(frame: str, label: str | None) -> None:
    assert frame_label(frame) == label
    assert frame_label(frame.encode("utf-8", "surrogatepass")) == label


def test_an_id_past_the_window_is_not_looked_for() -> None:
    head = '{"pad": "' + "x" * (SCAN_BYTES - 30) + '", '
    assert frame_label(head + '"id": "in"}') == "in"
    assert frame_label('{"pad": "' + "x" * SCAN_BYTES + '", "id": "out"}') is None
    deep = '{"a": ' + "[" * SCAN_BYTES + "]" * SCAN_BYTES + ', "id": "out"}'
    assert frame_label(deep) is None
    cut = '{"pad": "' + "x" * (SCAN_BYTES - 20) + '", "id": "straddles-the-end"}'
    assert frame_label(cut) is None  # the id's value ends past the window


class _Watched(bytes):
    """A frame that records the largest index the scan asked it for."""

    asked = 0

    def __getitem__(self, key: SupportsIndex | slice) -> Any:
        stop = key.stop if isinstance(key, slice) else int(key) + 1
        type(self).asked = max(type(self).asked, stop or len(self))
        return super().__getitem__(key)


@pytest.mark.parametrize(
    "frame",
    [
        b'{"a": ' + b"[" * 4_000_000 + b', "id": "x"}',  # nested four million deep
        b'{"a": "' + b'\\"' * 2_000_000 + b'", "id": "x"}',  # escaped quotes all the way
        b'{"a": "' + b"\\" * 4_000_000,  # backslashes all the way, no string end
        b'{"' + b'\\"' * 2_000_000,  # one endless key of escaped quotes
        b"{" + b'"":"",' * 700_000 + b'"id": "x"}',  # many tiny keys
    ],
)
def test_a_hostile_frame_is_read_only_as_far_as_the_window(frame: bytes) -> None:
    _Watched.asked = 0
    assert frame_label(_Watched(frame)) is None
    assert _Watched.asked == SCAN_BYTES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "id"), json_values, max_size=4),
    after=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "id"), json_values, max_size=4),
    label=st.one_of(st.text(max_size=140), st.integers(), st.none(), st.lists(st.text(), max_size=2)),
    ascii_only=st.booleans(),
)
def test_agrees_with_json_on_frames_within_the_window(
    before: dict[str, Any], after: dict[str, Any], label: Any, ascii_only: bool
) -> None:
    """For any JSON object whose ``"id": value`` lies within the window, the scan finds what
    ``json.loads`` finds, when that is a label of 1 to 128 characters, and nothing otherwise."""
    value = {**before, "id": label, **after}
    frame = json.dumps(value, ensure_ascii=ascii_only)
    found = frame_label(frame)
    keys = list(value)
    through_id = {key: value[key] for key in keys[: keys.index("id") + 1]}
    id_end = len(json.dumps(through_id, ensure_ascii=ascii_only).encode()) - 1  # without its "}"
    valid = isinstance(label, str) and 0 < len(label) <= 128
    if valid and id_end <= SCAN_BYTES:
        assert found == label
    else:
        assert found is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_never_raises_on_any_input(frame: bytes | str) -> None:
    found = frame_label(frame)
    assert found is None or 0 < len(found) <= 128
