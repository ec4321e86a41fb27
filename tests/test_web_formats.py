"""The wire formats (web/formats.py): the plain token stream is one format carried two ways (SSE and
``/ws``), the same tokens, error and ``[DONE]`` whatever the transport; and an NDJSON batch stays NDJSON
while it is quiet (its keep-alive is a blank line, never an SSE comment)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from dspy_trio.engine import (
    DeadlineExceededError,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    PredictionResult,
    StatusEvent,
    StreamEvent,
    Timings,
    Usage,
)
from dspy_trio.web.formats import seed_frames, seed_sse, ws_frame

from .helpers import CountingLM
from .web_helpers import running, settings


def _result(**outputs: Any) -> PredictionResult:
    return PredictionResult("r1", "default", outputs, Usage(), Timings(0.0, 0.0, 0.0))


STREAMS: dict[str, list[StreamEvent]] = {
    "tokens": [
        StatusEvent("running"),
        FieldDelta("self", "answer", "Hel"),
        FieldDelta("self", "answer", "lo\nthere"),
        FinalEvent(_result(answer="Hello\nthere")),
    ],
    "no deltas": [StatusEvent("running"), FinalEvent(_result(answer="whole"))],
    "no answer field": [FinalEvent(_result(summary="first output"))],
    "failed": [FieldDelta("self", "answer", "par"), ErrorEvent(DeadlineExceededError("too late"))],
}


def _sse_data(body: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event; multi-line data joined as the format says."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_the_seed_format_says_the_same_over_sse_and_websocket(name: str) -> None:
    sse, frames = seed_sse(), seed_frames()
    over_sse = _sse_data(b"".join(piece for event in STREAMS[name] if (piece := sse(event)) is not None))
    over_ws = [frame for event in STREAMS[name] for frame in frames(event)]
    assert [data for _, data in over_sse] == over_ws
    assert over_ws[-1] == "[DONE]"
    names = [event for event, _ in over_sse]
    assert names == [("error" if data.startswith('{"error"') else None) for data in over_ws]


def _frames(events: list[StreamEvent]) -> list[str]:
    encode = seed_frames()  # one encoder per stream: it remembers whether a delta went out
    return [frame for event in events for frame in encode(event)]


def test_the_seed_format_of_each_stream() -> None:
    frames = {name: _frames(events) for name, events in STREAMS.items()}
    assert frames["tokens"] == ["Hel", "lo\nthere", "[DONE]"]
    assert frames["no deltas"] == ["whole", "[DONE]"]
    assert frames["no answer field"] == ["first output", "[DONE]"]
    assert frames["failed"][0] == "par"
    assert json.loads(frames["failed"][1])["error"]["code"] == "deadline_exceeded"
    assert frames["failed"][2:] == ["[DONE]"]


def test_a_v1_ws_frame_carries_the_label_and_the_events_json() -> None:
    assert json.loads(ws_frame("a", FieldDelta("self", "answer", "x"))) == {
        "id": "a",
        "type": "delta",
        "predictor": "self",
        "field": "answer",
        "text": "x",
    }
    assert json.loads(ws_frame("a", _result(answer="y")))["type"] == "result"


async def test_a_quiet_ndjson_batch_sends_blank_lines_not_sse_comments() -> None:
    lm = CountingLM(first_token_delay=0.5)
    async with (
        running(settings(sse_keepalive=0.05), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        response = await client.post(
            "/v1/programs/default/batch",
            json={"items": [{"question": "q"}]},
            headers={"Accept": "application/x-ndjson"},
        )
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = response.text.split("\n")
    assert "" in lines[:-1]  # the quiet half second was kept alive
    assert [json.loads(line) for line in lines if line][-1] == {"done": True, "count": 1}
