"""SSE and WebSocket over a real Hypercorn server, with the project's own client."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings, UpstreamServerError
from dspy_trio.engine.testing import Behavior, FakeUpstream
from dspy_trio.web.client import ServiceError, open_client

from .helpers import CountingLM, FailingLM, first_request_closed_by_client, wait_until
from .web_helpers import running, settings


async def raw_sse(url: str, path: str, body: Any) -> tuple[httpx.Response, str]:
    async with httpx.AsyncClient(base_url=url) as client, client.stream("POST", path, json=body) as response:
        text = (await response.aread()).decode()
    return response, text


async def test_seed_sse_endpoints_send_tokens_then_done() -> None:
    async with running() as server:
        for path in ("/stream", "/predict/stream"):
            response, text = await raw_sse(server.url, path, {"question": "What is Trio?"})
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            events = [block for block in text.split("\n\n") if block]
            assert events[-1] == "data: [DONE]"
            tokens = [e.removeprefix("data: ") for e in events[:-1]]
            assert len(tokens) > 3
            assert all(e.startswith("data: ") for e in events)


async def test_program_sse_has_status_deltas_and_one_final() -> None:
    async with (
        running() as server,
        open_client(server.url) as client,
        client.stream("default", {"question": "q"}) as stream,
    ):
        events = [event async for event in stream]
    names = [name for name, _ in events]
    assert names[0] == "status"
    assert names[-1] == "final"
    assert names.count("final") == 1
    final = events[-1][1]
    text = "".join(p["text"] for name, p in events if name == "delta")
    assert text == final["outputs"]["answer"]
    assert final["usage"]["completion_tokens"] > 0


async def test_a_failure_mid_stream_is_an_error_event() -> None:
    async with running(
        lms={"default": FailingLM(UpstreamServerError("down", status=500), delay=0.1)}
    ) as server:
        async with open_client(server.url) as client, client.stream("default", {"question": "q"}) as stream:
            events = [event async for event in stream]
        _response, text = await raw_sse(server.url, "/stream", {"question": "q"})
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] == "upstream_server_error"
    assert text.endswith("data: [DONE]\n\n")
    assert "event: error" in text


async def test_a_stream_past_its_timeout_ends_with_an_error_event_and_keepalives_flow() -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with running(settings(sse_keepalive=0.1), lms={"default": lm}) as server:
        started = trio.current_time()
        _response, text = await raw_sse(
            server.url, "/v1/programs/default/stream", {"inputs": {"question": "q"}, "timeout_secs": 0.5}
        )
        assert trio.current_time() - started < 5
    assert ": keep-alive" in text
    last = [block for block in text.split("\n\n") if block][-1]
    assert last.startswith("event: error")
    assert json.loads(last.split("data: ", 1)[1])["error"]["code"] == "deadline_exceeded"


async def test_bad_stream_requests_get_a_status_not_an_event() -> None:
    async with running() as server:
        response, text = await raw_sse(server.url, "/v1/programs/default/stream", {"inputs": {"nope": "x"}})
        assert response.status_code == 422
        assert json.loads(text)["error"]["param"] == "nope"
        response, _ = await raw_sse(server.url, "/v1/programs/missing/stream", {"inputs": {}})
        assert response.status_code == 404


async def test_leaving_an_sse_stream_closes_the_upstream_connection(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(first_token_delay=0.0, token_delay=0.5)
    lm = LMConfig(model="fake", settings=OpenAISettings(api_base=fake_upstream.url))
    async with running(settings(engine=EngineConfig(lms={"default": lm}))) as server:
        async with open_client(server.url) as client, client.stream("default", {"question": "q"}) as stream:
            async for name, _payload in stream:
                if name == "delta":
                    break
        left_at = trio.current_time()
        await first_request_closed_by_client(fake_upstream, left_at)


async def test_seed_websocket_answers_token_frames_then_done() -> None:
    async with running() as server, open_client(server.url) as client:
        async with client.ws_ask("What is Trio?") as tokens:
            received = [token async for token in tokens]
        assert len(received) > 3
        async with open_websocket_url(server.url.replace("http", "ws") + "/ws") as ws:
            await ws.send_message(b"binary is not a question")
            assert json.loads(await ws.get_message())["error"]["code"] == "invalid_frame"
            assert await ws.get_message() == "[DONE]"
            await ws.send_message("still works?")
            frames = []
            while (frame := await ws.get_message()) != "[DONE]":
                frames.append(frame)
            assert frames


async def test_multiplexed_websocket_runs_requests_concurrently_and_cancels_by_id(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.behavior = Behavior(latency=0.2, first_token_delay=0.0, token_delay=0.05)
    lm = LMConfig(model="fake", settings=OpenAISettings(api_base=fake_upstream.url))
    async with (
        running(settings(engine=EngineConfig(lms={"default": lm}))) as server,
        open_client(server.url) as client,
        client.open_multiplexed() as ws,
    ):
        results: dict[str, Any] = {}

        async def predict(request_id: str) -> None:
            results[request_id] = await ws.predict("default", {"question": request_id}, id=request_id)

        async def stream_and_cancel() -> None:
            frames = []
            async with ws.stream("default", {"question": "long"}, id="to-cancel") as answers:
                async for frame in answers:
                    frames.append(frame)
                    if frame["type"] == "delta":
                        await ws.cancel("to-cancel")
            results["to-cancel"] = frames

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(predict, f"p{i}")
            nursery.start_soon(stream_and_cancel)
        assert trio.current_time() - started < 1.5, "the five 0.2 s predictions ran concurrently"
        for i in range(5):
            assert results[f"p{i}"]["type"] == "result"
            assert results[f"p{i}"]["outputs"]["answer"]
        assert results["to-cancel"][-1] == {"id": "to-cancel", "type": "cancelled"}
        with trio.fail_after(5):
            await fake_upstream.wait_for(lambda u: all(r.ended for r in u.records))
        cancelled = [r for r in fake_upstream.records if r.stream]
        assert cancelled[0].client_closed_at is not None


async def test_bad_frames_get_error_frames_and_the_socket_carries_on() -> None:
    async with (
        running(settings(ws_max_requests=1), lms={"default": CountingLM(first_token_delay=0.3)}) as server,
        open_client(server.url) as client,
        client.open_multiplexed() as ws,
    ):
        await ws.send_raw("not json")
        await ws.send_raw(json.dumps({"type": "predict"}))
        await ws.send_raw(json.dumps({"id": "x", "type": "dance"}))
        await ws.send_raw(json.dumps({"id": "y", "type": "predict", "inputs": "nope"}))
        await ws.send_raw(json.dumps({"id": "z", "type": "predict", "inputs": {}, "timeout_secs": -1}))
        await ws.send_raw(json.dumps({"id": "c", "type": "cancel"}))
        await wait_until(lambda: len(ws.unrouted) == 6)
        codes = [(frame["id"], frame["error"]["code"]) for frame in ws.unrouted]
        # The same models and codes as HTTP bodies; the client's label comes back when the frame had one.
        assert codes == [
            (None, "bad_request"),
            (None, "invalid_body"),
            ("x", "invalid_body"),
            ("y", "invalid_body"),
            ("z", "invalid_body"),
            ("c", "unknown_id"),
        ]
        assert ws.unrouted[4]["error"]["param"] == "timeout_secs"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.predict, "default", {"question": "first"})
            await trio.sleep(0.1)
            with pytest.raises(ServiceError, match="too_many_requests"):
                await ws.predict("default", {"question": "second"})
        with pytest.raises(ServiceError, match="invalid_input"):
            await ws.predict("default", {"wrong": "field"})
        assert (await ws.predict("default", {"question": "after all that"}))["type"] == "result"


async def test_batch_in_order_as_json_and_as_completed_over_sse_and_ndjson() -> None:
    items = [{"question": "a"}, {"wrong": "b"}, {"question": "c"}]
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/v1/programs/default/batch", json={"items": items, "concurrency": 2})
        results = response.json()["results"]
        assert [(r["index"], r["ok"]) for r in results] == [(0, True), (1, False), (2, True)]
        assert results[1]["error"]["code"] == "invalid_input"
        assert results[0]["outputs"]["answer"]

        sse_headers = {"Accept": "text/event-stream"}
        body = {"items": items}
        async with client.stream(
            "POST", "/v1/programs/default/batch", json=body, headers=sse_headers
        ) as stream:
            text = (await stream.aread()).decode()
        blocks = [b for b in text.split("\n\n") if b]
        assert [b.split("\n")[0] for b in blocks] == ["event: item"] * 3 + ["event: done"]
        assert sorted(json.loads(b.split("data: ", 1)[1])["index"] for b in blocks[:3]) == [0, 1, 2]

        ndjson = await client.post(
            "/v1/programs/default/batch", json=body, headers={"Accept": "application/x-ndjson"}
        )
        lines = [json.loads(line) for line in ndjson.text.splitlines()]
        assert sorted(line["index"] for line in lines[:3]) == [0, 1, 2]
        assert lines[-1] == {"done": True, "count": 3}

        async with open_client(server.url) as typed:
            outcomes = await typed.batch("default", items, concurrency=3)
        assert [o["ok"] for o in outcomes] == [True, False, True]

        missing = await client.post("/v1/programs/nope/batch", json=body)
        assert missing.status_code == 404
        empty = await client.post("/v1/programs/default/batch", json={"items": []})
        assert empty.status_code == 422


async def test_a_batch_past_its_timeout_reports_the_late_items() -> None:
    async with (
        running(lms={"default": CountingLM(first_token_delay=30.0)}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        body = {"items": [{"question": "q"}] * 2, "timeout_secs": 0.3}
        response = await client.post("/v1/programs/default/batch", json=body)
    assert [r["error"]["code"] for r in response.json()["results"]] == ["deadline_exceeded"] * 2


async def test_websockets_need_the_api_key_when_keys_are_set() -> None:
    async with running(settings(api_keys=("secret",))) as server:
        ws_url = server.url.replace("http", "ws") + "/ws"
        handshake = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        async with httpx.AsyncClient(base_url=server.url) as client:
            refused = await client.get("/ws", headers=handshake)
        assert refused.status_code == 401  # as the README says, with a JSON body naming the problem
        assert refused.json()["error"]["code"] == "invalid_api_key"
        async with open_websocket_url(ws_url + "?api_key=secret") as ws:
            await ws.send_message("q")
            assert await ws.get_message() != "[DONE]"
        async with open_client(server.url, api_key="secret") as client, client.ws_ask("q") as tokens:
            assert [token async for token in tokens]


async def test_requested_timeouts_are_capped_by_the_server_maximum() -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with running(settings(max_timeout=0.3), lms={"default": lm}) as server:
        started = trio.current_time()
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post("/predict", json={"question": "q", "timeout_secs": 3600})
        assert response.status_code == 504
        assert trio.current_time() - started < 5


class _NonStreamingLM(CountingLM):
    """Answers in one piece: no deltas reach the stream, only the final prediction."""

    async def complete(self, messages: Any, params: Any, sink: Any) -> Any:
        return await super().complete(messages, params, None)


async def test_seed_streams_deliver_the_answer_even_without_deltas() -> None:
    lm = _NonStreamingLM(first_token_delay=0.0)
    async with running(lms={"default": lm}) as server:
        _response, text = await raw_sse(server.url, "/stream", {"question": "q"})
        events = [block for block in text.split("\n\n") if block]
        assert events[-1] == "data: [DONE]"
        assert len(events) == 2
        assert events[0].startswith("data: ")
        assert len(events[0]) > len("data: ")
        async with open_websocket_url(server.url.replace("http", "ws") + "/ws") as ws:
            await ws.send_message("q")
            answer = await ws.get_message()
            assert answer not in ("[DONE]", "")
            assert not answer.startswith('{"error"')
            assert await ws.get_message() == "[DONE]"
