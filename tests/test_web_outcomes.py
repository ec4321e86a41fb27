"""Outcomes per transport, as /metrics labels them: a deadline is ``timed_out``, a client that leaves is
``abandoned``, a cancel by id is ``cancelled`` — the same on predict, SSE, /ws, /v1/ws and batch. The
deadline counts from the arrival of the request's head. A fail-fast batch gives every item one outcome."""

from __future__ import annotations

import functools
import json
import re

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from dspy_trio.web.client import open_client
from dspy_trio.web.server import Server

from .helpers import CountingLM, wait_until
from .web_helpers import running, settings

SLOW = {"question": "q"}


async def outcomes(server: Server) -> dict[str, float]:
    """``dspy_trio_requests_total`` by outcome, read from /metrics."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        text = (await client.get("/metrics")).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dspy_trio_requests_total{"):
            name = re.search(r'outcome="([a-z_]+)"', line)
            assert name is not None
            counts[name.group(1)] = counts.get(name.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return counts


async def eventually(server: Server, outcome: str, count: int = 1) -> None:
    async def reached() -> bool:
        return (await outcomes(server)).get(outcome, 0) >= count

    with trio.fail_after(5):
        while not await reached():  # noqa: ASYNC110 - polls /metrics over HTTP
            await trio.sleep(0.02)
    assert sum((await outcomes(server)).values()) == count, await outcomes(server)


async def test_http_predict_past_its_deadline_is_timed_out() -> None:
    async with running(lms={"default": CountingLM(first_token_delay=30)}) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post("/predict", json={**SLOW, "timeout_secs": 0.2})
        assert response.status_code == 504
        await eventually(server, "timed_out")


async def test_http_predict_whose_client_left_is_abandoned() -> None:
    lm = CountingLM(first_token_delay=30)
    async with running(lms={"default": lm}) as server:
        async with httpx.AsyncClient(base_url=server.url) as client, trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(client.post, "/predict", json=SLOW))
            await wait_until(lambda: lm.started == 1)  # leave once the engine runs it
            nursery.cancel_scope.cancel()
        await eventually(server, "abandoned")


async def test_sse_past_its_deadline_is_timed_out_with_an_error_event() -> None:
    async with running(lms={"default": CountingLM(first_token_delay=30)}) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            body = {"inputs": SLOW, "timeout_secs": 0.2}
            text = (await client.post("/v1/programs/default/stream", json=body)).text
        assert "event: error" in text
        assert "deadline_exceeded" in text
        await eventually(server, "timed_out")


async def test_sse_whose_client_left_is_abandoned() -> None:
    async with running(lms={"default": CountingLM(first_token_delay=30)}) as server:
        async with (
            httpx.AsyncClient(base_url=server.url) as client,
            client.stream("POST", "/v1/programs/default/stream", json={"inputs": SLOW}) as stream,
        ):
            assert stream.status_code == 200
            await wait_until(lambda: server.state.engine.statistics().in_flight == 1)  # type: ignore[union-attr]
        await eventually(server, "abandoned")


async def test_sse_cancelled_by_id_is_cancelled() -> None:
    async with running(lms={"default": CountingLM(first_token_delay=30)}) as server:
        async with (
            httpx.AsyncClient(base_url=server.url) as client,
            client.stream("POST", "/stream", json=SLOW) as stream,
        ):
            server_id = stream.headers["x-server-request-id"]
            await wait_until(lambda: server.state.engine.statistics().in_flight == 1)  # type: ignore[union-attr]
            assert (await client.delete(f"/v1/requests/{server_id}")).status_code == 200
            text = (await stream.aread()).decode()
        assert text.endswith("data: [DONE]\n\n")
        await eventually(server, "cancelled")


async def test_seed_websocket_past_its_deadline_is_timed_out() -> None:
    lm = CountingLM(first_token_delay=30)
    async with running(settings(default_timeout=0.2), lms={"default": lm}) as server:
        async with open_websocket_url(server.url.replace("http", "ws") + "/ws") as ws:
            await ws.send_message("q")
            assert json.loads(await ws.get_message())["error"]["code"] == "deadline_exceeded"
            assert await ws.get_message() == "[DONE]"
        await eventually(server, "timed_out")


async def test_multiplexed_websocket_deadline_and_cancel_frame() -> None:
    lm = CountingLM(first_token_delay=30)
    async with running(lms={"default": lm}) as server:
        async with open_client(server.url) as client, client.open_multiplexed() as ws:
            async with ws.stream("default", SLOW, timeout_secs=0.2) as answers:
                late = [f async for f in answers]
            assert late[-1]["type"] == "error"
            assert late[-1]["error"]["code"] == "deadline_exceeded"
            await eventually(server, "timed_out")
            frames: list[dict[str, object]] = []

            async def run() -> None:
                async with ws.frames({"id": "c", "type": "predict", "inputs": SLOW}) as answers:
                    frames.extend([f async for f in answers])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await wait_until(lambda: lm.started == 2)
                await ws.cancel("c")
            assert frames[-1]["type"] == "cancelled"
        assert (await outcomes(server)).get("cancelled") == 1


async def test_multiplexed_websocket_closed_by_its_client_is_abandoned() -> None:
    lm = CountingLM(first_token_delay=30)
    async with running(lms={"default": lm}) as server:
        async with open_client(server.url) as client, client.open_multiplexed() as ws:
            await ws.send_raw(json.dumps({"id": "a", "type": "stream", "inputs": SLOW}))
            await wait_until(lambda: lm.started == 1)
        await eventually(server, "abandoned")


async def test_the_deadline_counts_from_the_arrival_of_the_request_head() -> None:
    """A 1 s request whose body arrives 0.7 s after its head, for a 0.6 s prediction, is late: 504 at
    about 1 s after the head (it used to succeed at 1.3 s)."""
    lm = CountingLM(first_token_delay=0.6)
    async with running(lms={"default": lm}) as server:
        body = json.dumps({"question": "q", "timeout_secs": 1.0}).encode()
        port = int(server.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            head = (
                "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sent = trio.current_time()
            await stream.send_all(head.encode())
            await trio.sleep(0.7)
            await stream.send_all(body)
            with trio.fail_after(5):
                answer = await stream.receive_some(65536)
            waited = trio.current_time() - sent
        assert answer.startswith(b"HTTP/1.1 504"), answer[:100]
        assert 0.9 < waited < 1.25
        await eventually(server, "timed_out")


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream", "application/x-ndjson"])
async def test_fail_fast_batch_gives_every_item_one_outcome(accept: str) -> None:
    """Item 0 is invalid; with one worker the other three never start: each is ``cancelled``."""
    items = [{"wrong": "a"}, {"question": "b"}, {"question": "c"}, {"question": "d"}]
    body = {"items": items, "concurrency": 1, "fail_fast": True}
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/v1/programs/default/batch", json=body, headers={"Accept": accept})
    assert response.status_code == 200
    if accept == "application/json":
        results = response.json()["results"]
    elif accept == "text/event-stream":
        blocks = [b for b in response.text.split("\n\n") if b.strip()]
        results = [json.loads(b.split("data: ", 1)[1]) for b in blocks if b.startswith("event: item")]
        assert blocks[-1] == 'event: done\ndata: {"count":4}'
    else:
        lines = [json.loads(line) for line in response.text.splitlines()]
        results, done = lines[:-1], lines[-1]
        assert done == {"done": True, "count": 4}
    codes = {r["index"]: r["error"]["code"] for r in results}
    assert codes == {0: "invalid_input", 1: "cancelled", 2: "cancelled", 3: "cancelled"}
