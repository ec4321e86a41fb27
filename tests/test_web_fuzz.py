"""Property test: whatever bytes arrive at an endpoint, the answer is a 4xx JSON error and the server
stays healthy."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from dspy_trio.web.server import open_server

from .web_helpers import settings as service_settings

ENDPOINTS = [
    "/predict",
    "/predict/stream",
    "/stream",
    "/v1/programs/default/predict",
    "/v1/programs/default/stream",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
# Bodies that are valid for some endpoint are excluded by the assertion's filter below.
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["question", "inputs", "timeout_secs", "x"]), json_values, max_size=3
    ).map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """A real server in a thread of its own (Hypothesis runs examples synchronously)."""
    started: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    async def main() -> None:
        stop = trio.Event()
        async with open_server(service_settings(max_body_bytes=4096)) as server:
            started.put((server.url, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    url, token, stop = started.get(timeout=30)
    yield url
    trio.from_thread.run_sync(stop.set, trio_token=token)
    thread.join(timeout=30)


def _valid(path: str, body: bytes) -> bool:
    try:
        value: Any = json.loads(body)
    except ValueError:
        return False
    if not isinstance(value, dict):
        return False
    if path.startswith("/v1/"):
        inputs = value.get("inputs")
        return (
            set(value) <= {"inputs", "timeout_secs"}
            and isinstance(inputs, dict)
            and set(inputs) == {"question"}
            and isinstance(inputs["question"], str)
        )
    return set(value) <= {"question", "timeout_secs"} and isinstance(value.get("question"), str)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), body=bodies)
def test_malformed_bodies_get_a_4xx_json_error(server_url: str, path: str, body: bytes) -> None:
    with httpx.Client(base_url=server_url, timeout=30) as client:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        if _valid(path, body):
            assert response.status_code in (200, 422)  # e.g. a timeout_secs of the wrong kind
            return
        assert 400 <= response.status_code < 500, (path, body, response.status_code, response.text)
        error = response.json()["error"]
        assert error["code"]
        assert error["message"]
        assert client.get("/health").text == "OK"


# WebSocket frames: nesting, size, types and Unicode (lone surrogates in JSON escapes included).
nested = st.integers(min_value=0, max_value=300).map(lambda n: "[" * n + "]" * n)
escapes = st.lists(
    st.sampled_from(["a", "\\ud800", "\\udfff", "\\u00e9", "\\u0000", "é", "😀"]), max_size=8
).map(lambda parts: '{"id": "u", "type": "predict", "inputs": {"question": "' + "".join(parts) + '"}}')
frames = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    nested,
    escapes,
    st.integers(min_value=0, max_value=6000).map(
        lambda n: json.dumps({"id": "big", "type": "predict", "inputs": {"question": "x" * n}})
    ),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"id": st.text(max_size=3), "type": st.sampled_from(["predict", "stream", "cancel", "x"])},
        optional={"inputs": json_values, "timeout_secs": json_values, "program": json_values},
    ).map(json.dumps),
)

LAST = {"result", "final", "error", "cancelled"}


async def _send_frame(url: str, frame: str | bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send ``frame`` to /v1/ws; return what came back for it, and the answer to a valid request after it."""
    async with open_websocket_url(url.replace("http", "ws") + "/v1/ws") as ws:
        await ws.send_message(frame)
        await ws.send_message(json.dumps({"id": "probe", "type": "predict", "inputs": {"question": "q"}}))
        answers: list[dict[str, Any]] = []
        with trio.fail_after(20):
            while True:
                answer = json.loads(await ws.get_message())
                if answer.get("id") == "probe" and answer["type"] in LAST:
                    return answers, answer
                answers.append(answer)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_malformed_websocket_frames_get_an_error_frame_and_the_socket_lives_on(
    server_url: str, frame: str | bytes
) -> None:
    answers, probe = trio.run(_send_frame, server_url, frame)
    assert probe["type"] == "result", probe  # the socket and its other requests live on
    finished = [a for a in answers if a["type"] in LAST]
    assert len(finished) <= 1
    if finished and finished[0]["type"] == "error":
        assert finished[0]["error"]["code"]
        assert finished[0]["error"]["message"]
        assert finished[0]["error"]["code"] != "internal_error"
    with httpx.Client(base_url=server_url, timeout=30) as client:
        assert client.get("/health").text == "OK"


# OpenAI's chat completions: bodies shaped like one, with every part of it wrong in turn.
roles = st.sampled_from(["user", "assistant", "system", "developer", "tool", "wizard", 5, None])
contents = st.one_of(
    st.text(max_size=20),
    json_values,
    st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url", "file", "x"])}, optional={"text": json_values}
            ),
            json_values,
        ),
        max_size=3,
    ),
)
messages = st.lists(
    st.fixed_dictionaries(
        {}, optional={"role": roles, "content": contents, "name": json_values, "x": json_values}
    ),
    max_size=4,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["default", "nope", 5, ""]),
        "messages": messages | json_values,
        "stream": json_values,
        "n": json_values,
        "temperature": json_values,
        "max_tokens": json_values,
        "stop": json_values,
        "response_format": json_values | st.just({"type": "json_object"}),
        "tools": json_values,
        "ignore_history": json_values,
        "timeout": json_values,
        "extra": json_values,
    },
).map(lambda v: json.dumps(v).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies | bodies)
def test_chat_completions_answer_any_body_with_a_completion_or_a_named_4xx(
    server_url: str, body: bytes
) -> None:
    with httpx.Client(base_url=server_url, timeout=30) as client:
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        if response.status_code == 200:
            answer = response.text
            assert "chat.completion" in answer, answer[:300]
        else:
            assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
            assert response.status_code != 422  # OpenAI's API: bad input is 400
            error = response.json()["error"]
            assert error["code"]
            assert error["message"]
        assert client.get("/health").text == "OK"
