"""A call's value (web/call.py): built once per request below the framework (by the front door,
web/door.py), one per ``/ws`` question and per ``/v1/ws`` frame, and the only place request ids are
minted; what the handlers, the engine and the response headers see is that one value."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from dspy_trio.web.call import Call

from .helpers import CountingLM, wait_until
from .web_helpers import running, settings

WEB = Path(__file__).resolve().parent.parent / "web"
KEY = {"Authorization": "Bearer k"}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every Call built while the test runs, in order."""
    built: list[Call] = []
    original = Call.__init__

    def counting(self: Call, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Call, "__init__", counting)
    return built


REQUESTS = [
    ("POST", "/predict", {"question": "q"}, {}),
    ("POST", "/v1/programs/default/predict", {"inputs": {"question": "q"}}, {}),
    ("POST", "/stream", {"question": "q"}, {}),
    ("POST", "/v1/programs/default/stream", {"inputs": {"question": "q"}}, {}),
    ("POST", "/v1/programs/default/batch", {"items": [{"question": "a"}, {"question": "b"}]}, {}),
    (
        "POST",
        "/v1/programs/default/batch",
        {"items": [{"question": "a"}, {"question": "b"}]},
        {"Accept": "application/x-ndjson"},
    ),
    ("GET", "/health", None, {}),
    ("GET", "/v1/programs", None, {}),
    ("GET", "/metrics", None, {}),
    ("POST", "/v1/programs/nope/predict", {"inputs": {}}, {}),  # 404 from the engine
    ("POST", "/predict", {"question": 5}, {}),  # 422 from the body's model
    ("GET", "/predict", None, {}),  # 405 from the router
    ("GET", "/no/such/path", None, {}),  # 404 from the router
    ("DELETE", "/v1/requests/nothing", None, {}),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), REQUESTS)
async def test_every_http_request_builds_exactly_one_call_whose_id_is_the_answers(
    calls: list[Call], method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    service = settings(api_keys=("k",))
    async with running(service) as server, httpx.AsyncClient(base_url=server.url) as client:
        calls.clear()
        response = await client.request(
            method, path, json=body, headers={**KEY, "X-Request-ID": "lbl-1", **headers}
        )
        await response.aread()
    [call] = calls
    assert call.request_id == response.headers["x-server-request-id"]
    assert call.label == response.headers["x-request-id"] == "lbl-1"
    assert call.owner == ("" if path == "/health" else "k")  # an open route has no owner
    if path.endswith("/predict") and response.status_code == 200:
        assert response.json()["request_id"] == call.request_id


async def test_a_request_the_door_refuses_builds_one_call_too(calls: list[Call]) -> None:
    async with running(settings(api_keys=("k",))) as server, httpx.AsyncClient(base_url=server.url) as client:
        calls.clear()
        refused = await client.post("/predict", json={"question": "q"})
    assert refused.status_code == 401
    [call] = calls
    assert call.request_id == refused.headers["x-server-request-id"]
    assert call.owner == ""


async def test_a_socket_is_one_call_and_each_frame_one_more_of_the_same_owner(calls: list[Call]) -> None:
    async with running(settings(api_keys=("k",))) as server:
        url = server.url.replace("http", "ws") + "/v1/ws?api_key=k"
        calls.clear()
        async with open_websocket_url(url) as ws:
            for label in ("a", "b"):
                frame = {"id": label, "type": "predict", "inputs": {"question": label}}
                await ws.send_message(json.dumps(frame))
            answers = [json.loads(await ws.get_message()) for _ in range(2)]
    socket, *frames = calls
    assert socket.owner == "k"
    assert sorted(frame.label for frame in frames if frame.label) == ["a", "b"]
    assert all(frame.owner == "k" for frame in frames)
    by_label = {frame.label: frame.request_id for frame in frames}
    assert {answer["id"]: answer["request_id"] for answer in answers} == by_label
    assert len({socket.request_id, *by_label.values()}) == 3  # every id minted once


async def test_each_seed_websocket_question_is_one_call(calls: list[Call]) -> None:
    async with running() as server:
        calls.clear()
        async with open_websocket_url(server.url.replace("http", "ws") + "/ws") as ws:
            for question in ("a", "b"):
                await ws.send_message(question)
                while await ws.get_message() != "[DONE]":
                    pass
    assert len(calls) == 3
    assert len({call.request_id for call in calls}) == 3


async def test_the_call_the_engine_runs_is_the_one_the_headers_name(calls: list[Call]) -> None:
    """The id in ``X-Server-Request-ID`` is the id the engine runs the request under: a cancel by that
    id reaches it, and no other id exists for it."""
    lm = CountingLM(first_token_delay=30.0)
    async with (
        running(lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/stream", json={"question": "q"}) as stream,
    ):
        await wait_until(lambda: lm.started == 1)
        [call] = calls[-1:]
        assert call.request_id == stream.headers["x-server-request-id"]
        with trio.fail_after(10):
            assert (await client.delete(f"/v1/requests/{call.request_id}")).status_code == 200
            assert '"code":"cancelled"' in (await stream.aread()).decode()


def test_no_web_module_keeps_request_state_in_quart_g() -> None:
    """Request state travels in the Call, explicitly: nothing in web/ imports Quart's ``g``."""
    for module in sorted(WEB.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "quart":
                assert "g" not in {alias.name for alias in node.names}, module.name


def test_one_function_mints_request_ids() -> None:
    """uuid4 / token_hex appear in web/ only where ids are minted (web/call.py)."""
    minting = [
        module.name
        for module in sorted(WEB.glob("*.py"))
        if "uuid4" in module.read_text() or "token_hex" in module.read_text()
    ]
    assert minting == ["call.py"]
