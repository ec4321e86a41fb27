"""Cancel by id, for every kind of call: ``DELETE /v1/requests/{id}`` reaches a JSON prediction, an SSE
stream (the plain one and the v1 one), a batch (JSON, SSE, NDJSON), a ``/v1/ws`` frame and a ``/ws``
question, through the engine alone (``Engine.cancel_anywhere`` with the caller's key as owner): another
key's cancel is a 404 that leaves the call running, the owner's ends it with its one ``cancelled``
outcome, and the id is then gone. A batch is cancelled by the id the server gave it, and a call
by its owner while the server drains."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from dspy_trio.web.server import Server

from .helpers import CountingLM, wait_until
from .web_helpers import running, settings

A = {"Authorization": "Bearer a"}
B = {"Authorization": "Bearer b"}
ITEMS = {"items": [{"question": "x"}, {"question": "y"}], "concurrency": 2}

Start = Callable[[Server], Awaitable[Any]]


async def _http(server: Server, path: str, body: Any, **headers: str) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(path, json=body, headers={**A, **headers})
        return response.status_code, response.text


async def _ws_frame(server: Server, kind: str) -> Any:
    url = server.url.replace("http", "ws") + "/v1/ws?api_key=a"
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"id": "f", "type": kind, "inputs": {"question": "q"}}))
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] in ("result", "final", "error", "cancelled"):
                return frame


async def _ws_seed(server: Server) -> Any:
    async with open_websocket_url(server.url.replace("http", "ws") + "/ws?api_key=a") as ws:
        await ws.send_message("q")
        frames = []
        while (frame := await ws.get_message()) != "[DONE]":
            frames.append(frame)
        return frames


def _cancelled_json(outcome: Any) -> None:
    status, text = outcome
    assert status == 499, text
    assert json.loads(text)["error"]["code"] == "cancelled"


def _cancelled_sse(outcome: Any) -> None:
    status, text = outcome
    assert status == 200
    assert "event: error" in text
    assert '"code":"cancelled"' in text


def _cancelled_batch(outcome: Any) -> None:
    status, text = outcome
    assert status == 200
    assert text.count('"code":"cancelled"') == 2, text


KINDS: dict[str, tuple[Start, Callable[[Any], None]]] = {
    "json predict": (
        lambda s: _http(s, "/v1/programs/default/predict", {"inputs": {"question": "q"}}),
        _cancelled_json,
    ),
    "seed predict": (lambda s: _http(s, "/predict", {"question": "q"}), _cancelled_json),
    "v1 sse": (
        lambda s: _http(s, "/v1/programs/default/stream", {"inputs": {"question": "q"}}),
        _cancelled_sse,
    ),
    "seed sse": (lambda s: _http(s, "/stream", {"question": "q"}), _cancelled_sse),
    "batch json": (lambda s: _http(s, "/v1/programs/default/batch", ITEMS), _cancelled_batch),
    "batch sse": (
        lambda s: _http(s, "/v1/programs/default/batch", ITEMS, Accept="text/event-stream"),
        _cancelled_batch,
    ),
    "batch ndjson": (
        lambda s: _http(s, "/v1/programs/default/batch", ITEMS, Accept="application/x-ndjson"),
        _cancelled_batch,
    ),
    "/v1/ws predict": (
        lambda s: _ws_frame(s, "predict"),
        lambda frame: frame["type"] == "cancelled" or _fail(frame),
    ),
    "/v1/ws stream": (
        lambda s: _ws_frame(s, "stream"),
        lambda frame: frame["type"] == "cancelled" or _fail(frame),
    ),
    "/ws": (_ws_seed, lambda frames: json.loads(frames[-1])["error"]["code"] == "cancelled" or _fail(frames)),
}


def _fail(outcome: Any) -> None:
    raise AssertionError(outcome)


def _server_id(server: Server, *, batch: bool) -> str:
    """The server's id of the one call in flight (a batch's items run as ``{id}-{index}``)."""
    engine = server.state.engine
    assert engine is not None
    ids = {request.request_id for request in engine._ledger._active.values()}
    if batch:
        ids = {request_id.rsplit("-", 1)[0] for request_id in ids}
    [found] = ids
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_the_owners_delete_cancels_every_kind_of_call_and_no_one_elses_does(kind: str) -> None:
    start, check = KINDS[kind]
    lm = CountingLM(first_token_delay=30.0)
    outcome: list[Any] = []
    async with (
        running(settings(api_keys=("a", "b")), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
        trio.open_nursery() as nursery,
    ):

        async def run() -> None:
            outcome.append(await start(server))

        nursery.start_soon(run)
        batch = kind.startswith("batch")
        await wait_until(lambda: lm.started == (2 if batch else 1), seconds=30)
        server_id = _server_id(server, batch=batch)
        with trio.fail_after(30):
            other = await client.delete(f"/v1/requests/{server_id}", headers=B)
            assert other.status_code == 404, other.text
            assert other.json()["error"]["code"] == "unknown_request"
            assert lm.finished == 0
            mine = await client.delete(f"/v1/requests/{server_id}", headers=A)
            assert mine.status_code == 200, mine.text
            assert mine.json() == {"cancelled": server_id}
            await wait_until(lambda: bool(outcome), seconds=30)
            again = await client.delete(f"/v1/requests/{server_id}", headers=A)
            assert again.status_code == 404
    check(outcome[0])
    assert lm.finished == 0


async def test_a_v1_ws_cancel_frame_reaches_only_its_own_sockets_request() -> None:
    """The cancel frame names the client's label; the socket turns it into the server's id and asks the
    engine, under the socket's owner."""
    lm = CountingLM(first_token_delay=30.0)
    async with running(settings(api_keys=("a",)), lms={"default": lm}) as server:
        url = server.url.replace("http", "ws") + "/v1/ws?api_key=a"
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"id": "f", "type": "stream", "inputs": {"question": "q"}}))
            await wait_until(lambda: lm.started == 1, seconds=30)
            await ws.send_message(json.dumps({"id": "f", "type": "cancel"}))
            with trio.fail_after(30):
                while (frame := json.loads(await ws.get_message()))["type"] not in ("cancelled", "error"):
                    pass
    assert frame == {"id": "f", "type": "cancelled"}
    assert lm.finished == 0


async def test_a_batch_is_cancelled_by_the_id_the_server_gave_it() -> None:
    """``DELETE /v1/requests/{id}`` with a batch's ``X-Server-Request-ID`` (the only id the client is
    given for it) cancels the batch, every item ending ``cancelled``; a ledger knowing only the items'
    ids (``{id}-{index}``) would answer 404 while the batch runs on."""
    lm = CountingLM(first_token_delay=30)
    async with (
        running(lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        body = {"items": [{"question": "a"}, {"question": "b"}]}
        headers = {"Accept": "text/event-stream"}
        with trio.fail_after(10):
            async with client.stream(
                "POST", "/v1/programs/default/batch", json=body, headers=headers
            ) as stream:
                assert stream.status_code == 200
                server_id = stream.headers["x-server-request-id"]
                await wait_until(lambda: lm.started == 2)
                cancelled = await client.delete(f"/v1/requests/{server_id}")
                assert cancelled.status_code == 200, cancelled.text
                text = (await stream.aread()).decode()
        assert text.count('"code":"cancelled"') == 2, text


async def test_the_owner_can_cancel_its_request_while_the_server_drains() -> None:
    """During the drain (SIGTERM) an in-flight request runs for up to ``drain_timeout``; its owner asks to
    cancel it and it is cancelled (200, outcome ``cancelled``), not refused with 503 ``not_ready`` while
    the request keeps its slot and the shutdown waits for it."""
    lm = CountingLM(first_token_delay=30)
    engine = attrs.evolve(settings().engine, drain_timeout=20.0)
    async with (
        running(settings(engine=engine), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/stream", json={"question": "q"}) as stream,
    ):
        server_id = stream.headers["x-server-request-id"]
        await wait_until(lambda: lm.started == 1)
        server.shutdown()
        await wait_until(lambda: server.state.draining)
        with trio.fail_after(5):
            cancelled = await client.delete(f"/v1/requests/{server_id}")
            assert cancelled.status_code == 200, cancelled.text
            text = (await stream.aread()).decode()
        assert '"code":"cancelled"' in text, text
