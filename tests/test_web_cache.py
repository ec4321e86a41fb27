"""Single-flight and the response cache over HTTP, on a real server: identical requests share one
upstream call; ``Cache-Control: no-cache`` / ``no-store``; ``Cache-Status`` and the result's markers; API
keys never share; the metrics (Prometheus and JSON) and the OpenAPI document say it all."""

from __future__ import annotations

import json
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import open_websocket_url

from dspy_trio.engine import CacheConfig, EngineConfig
from dspy_trio.web.server import Server

from .helpers import HANG_GUARD, CountingLM, most_waiting_on_one_flight, wait_until
from .web_helpers import FAST, running, settings


def cached_settings(cache: CacheConfig | None = None, **changes: Any) -> Any:
    engine = EngineConfig(
        lms={"default": FAST}, cache=cache or CacheConfig(backend="memory"), max_in_flight=512
    )
    return settings(engine=engine, **changes)


async def post(client: httpx.AsyncClient, question: str = "What is Trio?", **headers: str) -> httpx.Response:
    return await client.post(
        "/v1/programs/default/predict", json={"inputs": {"question": question}}, headers=headers
    )


async def all_join_one_flight(server: Server, lm: CountingLM, count: int) -> None:
    """Once ``count`` requests wait on one shared flight, let ``lm`` answer (when it answered after a
    fixed delay, a request that a busy machine delivered later found the answer stored: a hit)."""
    engine = server.state.engine
    assert engine is not None
    assert lm.release is not None
    await wait_until(lambda: most_waiting_on_one_flight(engine) == count, seconds=HANG_GUARD)
    lm.release.set()


async def test_identical_requests_share_one_upstream_call_and_say_so() -> None:
    lm = CountingLM(first_token_delay=0, release=trio.Event())
    async with (
        running(cached_settings(), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        responses: list[httpx.Response] = []

        async def one() -> None:
            responses.append(await post(client))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
            await all_join_one_flight(server, lm, 50)
        assert lm.started == 1
        assert {r.status_code for r in responses} == {200}
        statuses = sorted(r.headers["Cache-Status"] for r in responses)
        assert statuses == ["dspy-trio; fwd=miss"] + ["dspy-trio; fwd=miss; collapsed"] * 49
        bodies = [r.json() for r in responses]
        assert len({str(b["outputs"]) for b in bodies}) == 1
        shared = [b for b in bodies if b["timings"].get("shared_calls") == 1]
        assert len(shared) == 49
        assert all(b["usage"]["total_tokens"] == 0 and b["usage"]["saved_tokens"] > 0 for b in shared)

        hit = await post(client)
        assert hit.headers["Cache-Status"] == "dspy-trio; hit"
        assert hit.json()["timings"]["cached"] is True
        assert lm.started == 1

        fresh = await post(client, **{"Cache-Control": "no-cache"})
        assert fresh.headers["Cache-Status"] == "dspy-trio; fwd=request"
        assert "cached" not in fresh.json()["timings"]
        assert lm.started == 2

        await post(client, "never stored", **{"Cache-Control": "No-Store, max-age=0"})
        again = await post(client, "never stored")
        assert again.headers["Cache-Status"] == "dspy-trio; fwd=miss"
        assert lm.started == 4

        metrics = (await client.get("/metrics")).text
        assert 'dspy_trio_cache_requests_total{result="hit"} 1.0' in metrics
        assert 'dspy_trio_cache_requests_total{result="bypass"} 1.0' in metrics
        assert "dspy_trio_coalesced_waiters_total 49.0" in metrics
        assert "dspy_trio_upstream_calls_saved_total 50.0" in metrics
        as_json = (await client.get("/metrics", headers={"Accept": "application/json"})).json()
        assert as_json["cache"]["hits"] == 1
        assert as_json["cache"]["coalesced_waiters"] == 49
        assert as_json["cache"]["tokens_saved"] > 0


async def test_with_the_cache_off_a_shared_call_is_still_marked() -> None:
    lm = CountingLM(first_token_delay=0, release=trio.Event())
    async with (
        running(cached_settings(CacheConfig()), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        responses: list[httpx.Response] = []

        async def one() -> None:
            responses.append(await post(client))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            await all_join_one_flight(server, lm, 3)
        assert lm.started == 1
        assert sorted(r.headers["Cache-Status"] for r in responses) == [
            "dspy-trio; fwd=bypass",
            "dspy-trio; fwd=bypass; collapsed",
            "dspy-trio; fwd=bypass; collapsed",
        ]
        assert (await post(client)).headers["Cache-Status"] == "dspy-trio; fwd=bypass"
        assert lm.started == 2


async def test_two_api_keys_never_share_over_http() -> None:
    lm = CountingLM(first_token_delay=0.3)
    keys = cached_settings(api_keys=("alice-key-0123456789", "bob-key-0123456789ab"))
    async with (
        running(keys, lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        alice = {"Authorization": "Bearer alice-key-0123456789"}
        bob = {"Authorization": "Bearer bob-key-0123456789ab"}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: post(client, **alice))
            nursery.start_soon(lambda: post(client, **bob))
        assert lm.started == 2
        assert (await post(client, **bob)).headers["Cache-Status"] == "dspy-trio; hit"
        assert lm.started == 2


async def test_a_cached_answer_of_a_stream_ends_with_a_final_event_marked_cached() -> None:
    lm = CountingLM(first_token_delay=0.05, token_delay=0.001)
    async with (
        running(cached_settings(), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        for _ in range(2):
            async with client.stream(
                "POST", "/v1/programs/default/stream", json={"inputs": {"question": "q"}}
            ) as response:
                text = "".join([chunk async for chunk in response.aiter_text()])
        assert lm.started == 1
        assert "event: delta" in text
        assert '"cached":true' in text.split("event: final", 1)[1]
        seed = await client.post("/stream", json={"question": "q"})
        assert seed.text.endswith("data: [DONE]\n\n")
        assert seed.text.count("data: ") >= 2  # the answer as tokens, then [DONE]
        assert lm.started == 1


async def test_the_openapi_document_has_the_cache_header_and_the_cache_status() -> None:
    async with running(cached_settings()) as server, httpx.AsyncClient(base_url=server.url) as client:
        document = (await client.get("/openapi.json")).json()
    predict = document["paths"]["/v1/programs/{name}/predict"]["post"]
    assert any(p["name"] == "Cache-Control" and p["in"] == "header" for p in predict["parameters"])
    assert "Cache-Status" in predict["responses"]["200"]["headers"]
    stream = document["paths"]["/v1/programs/{name}/stream"]["post"]
    assert any(p["name"] == "Cache-Control" for p in stream["parameters"])


async def test_cors_lets_a_browser_send_cache_control_and_read_cache_status() -> None:
    origin = "http://app.example"
    async with (
        running(attrs.evolve(cached_settings(), cors_origins=(origin,))) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        preflight = await client.options(
            "/v1/programs/default/predict",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "cache-control, content-type",
            },
        )
        assert "cache-control" in preflight.headers["Access-Control-Allow-Headers"].lower()
        answer = await post(client, **{"Origin": origin})
        assert "cache-status" in answer.headers["Access-Control-Expose-Headers"].lower()


# --- WebSockets ----------------------------------------------------------------------------------------


async def _ws_predict(ws: Any, label: str, **extra: Any) -> dict[str, Any]:
    frame = {"id": label, "type": "predict", "inputs": {"question": "What is Trio?"}, **extra}
    await ws.send_message(json.dumps(frame))
    answer: dict[str, Any] = json.loads(await ws.get_message())
    assert answer["id"] == label, answer
    return answer


async def test_a_websocket_opts_out_by_its_handshake_or_by_a_frame() -> None:
    """``Cache-Control`` on the handshake applies to every request of the socket (``/v1/ws`` and
    ``/ws``); a ``/v1/ws`` frame's ``cache_control`` (the same directives) to that request."""
    lm = CountingLM(first_token_delay=0.1)
    async with running(cached_settings(), lms={"default": lm}) as server:
        ws_url = server.url.replace("http", "ws")
        async with open_websocket_url(ws_url + "/v1/ws") as ws:
            first = await _ws_predict(ws, "a")
            assert first["type"] == "result"
            assert (await _ws_predict(ws, "b"))["timings"]["cached"] is True
            assert lm.started == 1
            fresh = await _ws_predict(ws, "c", cache_control="no-cache")
            assert "cached" not in fresh["timings"]
            assert lm.started == 2
            bad = await _ws_predict(ws, "d", cache_control=["no-cache"])
            assert bad["type"] == "error"
            assert bad["error"]["code"] == "invalid_body"  # as an HTTP body that does not fit
        headers = [(b"Cache-Control", b"no-cache, no-store")]
        async with open_websocket_url(ws_url + "/v1/ws", extra_headers=headers) as ws:
            for label in ("e", "f"):
                assert "cached" not in (await _ws_predict(ws, label))["timings"]
            assert lm.started == 4
        async with open_websocket_url(ws_url + "/ws", extra_headers=headers) as ws:
            await ws.send_message("What is Trio?")
            while await ws.get_message() != "[DONE]":
                pass
            assert lm.started == 5  # a fresh upstream call, though the answer is stored
        async with open_websocket_url(ws_url + "/v1/ws") as ws:
            stored = await _ws_predict(ws, "g", inputs={"question": "never stored"}, cache_control="no-store")
            assert stored["type"] == "result"
            again = await _ws_predict(ws, "h", inputs={"question": "never stored"})
            assert "cached" not in again["timings"]
            assert lm.started == 7


async def test_junk_cache_control_on_a_frame_or_a_handshake_never_breaks_the_socket() -> None:
    """A frame's ``cache_control`` of the wrong type or size is an error frame naming it; junk
    directives are ignored (as on HTTP); a junk handshake header too. The socket keeps serving."""
    lm = CountingLM(first_token_delay=0.01)
    async with running(cached_settings(), lms={"default": lm}) as server:
        ws_url = server.url.replace("http", "ws")
        async with open_websocket_url(ws_url + "/v1/ws") as ws:
            for index, junk in enumerate([123, True, {"no-cache": 1}, "x" * 300, ["no-store"]]):
                bad = await _ws_predict(ws, f"bad{index}", cache_control=junk)
                assert bad["type"] == "error", (junk, bad)
                assert bad["error"]["code"] == "invalid_body", (junk, bad)
                assert "cache_control" in json.dumps(bad["error"]), (junk, bad)
            for index, ignored in enumerate(["", ",,,", "no-cache=", "=", "nO-StOrE ; x", "\u00e9", None]):
                fine = await _ws_predict(ws, f"fine{index}", cache_control=ignored)
                assert fine["type"] == "result", (ignored, fine)
        for header in (b",,,", b'no-cache="a,b"', b"\xff\xfe", b"max-age=-1, no-cache"):
            headers = [(b"Cache-Control", header)]
            async with open_websocket_url(ws_url + "/v1/ws", extra_headers=headers) as ws:
                answer = await _ws_predict(ws, "h")
                assert answer["type"] == "result", (header, answer)
