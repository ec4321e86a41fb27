"""Who may do what: CORS preflight without credentials, the WebSocket Origin policy, and WebSocket
request ids that are the server's (client labels collide harmlessly across sockets)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from dspy_trio.web.client import open_client

from .helpers import CountingLM, wait_until
from .web_helpers import running, settings

APP = "https://app.example"


async def test_cors_preflight_is_never_authenticated_and_allows_delete() -> None:
    service = settings(api_keys=("k",), cors_origins=(APP,))
    async with running(service) as server, httpx.AsyncClient(base_url=server.url) as client:
        for path, method in (("/v1/programs/default/predict", "POST"), ("/v1/requests/abc", "DELETE")):
            preflight = await client.options(
                path,
                headers={
                    "Origin": APP,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            assert preflight.status_code == 200, preflight.text
            assert preflight.headers["access-control-allow-origin"] == APP
            assert method in preflight.headers["access-control-allow-methods"]
            assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        actual = await client.post(
            "/v1/programs/default/predict",
            json={"inputs": {"question": "q"}},
            headers={"Origin": APP, "Authorization": "Bearer k"},
        )
        assert actual.status_code == 200
        assert actual.headers["access-control-allow-origin"] == APP
        assert "x-server-request-id" in actual.headers["access-control-expose-headers"].lower()
        foreign = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers
        assert (
            await client.post("/predict", json={"question": "q"}, headers={"Origin": APP})
        ).status_code == 401


HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def _refused(url: str, path: str, **headers: str) -> httpx.Response:
    """A WebSocket handshake expected to be refused, over httpx (which shows the HTTP answer)."""
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.get(path, headers={**HANDSHAKE, **headers})


async def _handshake(url: str, origin: str | None) -> int:
    """The status of a WebSocket handshake to ``/v1/ws`` (101 when accepted)."""
    if origin and "evil" in origin:
        return (await _refused(url, "/v1/ws", Origin=origin)).status_code
    headers = [("Origin", origin)] if origin else []
    async with open_websocket_url(url.replace("http", "ws") + "/v1/ws", extra_headers=headers):
        return 101


async def test_websocket_handshakes_from_foreign_origins_are_refused() -> None:
    async with running(settings(cors_origins=(APP,))) as server:
        own = server.url  # http://127.0.0.1:PORT: the playground's own origin
        assert await _handshake(server.url, "https://evil.example") == 403
        assert await _handshake(server.url, "http://localhost.evil.example") == 403
        assert await _handshake(server.url, own) == 101
        assert await _handshake(server.url, APP) == 101
        assert await _handshake(server.url, None) == 101  # non-browser clients send no Origin


async def test_websocket_labels_collide_harmlessly_across_sockets() -> None:
    """Two sockets both label a request ``r0`` (the client starts there): each gets its own answer and a
    server id of its own, and a cancel on one socket leaves the other alone."""
    lm = CountingLM(first_token_delay=0.5)
    async with (
        running(lms={"default": lm}) as server,
        open_client(server.url) as client,
        client.open_multiplexed() as first,
        client.open_multiplexed() as second,
    ):
        answers: dict[str, dict[str, Any]] = {}

        async def ask(name: str, ws: Any) -> None:
            async with ws.frames({"id": "r0", "type": "predict", "inputs": {"question": name}}) as frames:
                async for frame in frames:
                    answers[name] = frame

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "first", first)
            nursery.start_soon(ask, "second", second)
            await wait_until(lambda: lm.started == 2)
            await first.cancel("r0")
        assert answers["first"]["type"] == "cancelled"
        assert answers["second"]["type"] == "result"
        assert answers["second"]["request_id"] != "ws-r0"
        assert len(answers["second"]["request_id"]) == 32


@pytest.mark.parametrize("path", ["/ws", "/v1/ws"])
async def test_a_websocket_without_a_key_gets_401_with_a_json_body(path: str) -> None:
    async with running(settings(api_keys=("k",))) as server:
        refused = await _refused(server.url, path)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("refusal", [401, 403, 503])
async def test_a_refused_websocket_handshake_carries_the_ids_and_timing_of_every_other_answer(
    refusal: int,
) -> None:
    async with running(settings(api_keys=("k",))) as server:
        headers = {"X-Request-ID": "mine", "Authorization": "Bearer k"}
        if refusal == 401:
            del headers["Authorization"]
        elif refusal == 403:
            headers["Origin"] = "https://evil.example"
        else:
            server.state.draining = True  # the engine refuses new work: 503 not_ready
        refused = await _refused(server.url, "/v1/ws", **headers)
        async with httpx.AsyncClient(base_url=server.url) as client:
            plain = await client.get("/nowhere", headers=headers)  # an HTTP refusal, for comparison
    assert refused.status_code == refusal
    assert plain.headers["x-request-id"] == "mine"
    assert refused.headers.get("x-request-id") == "mine"
    assert len(refused.headers.get("x-server-request-id", "")) == 32
    assert refused.headers.get("server-timing", "").startswith("total;dur=")


async def test_refused_websocket_handshakes_are_logged_like_refused_http_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_trio.web.requests")
    async with running(settings(api_keys=("k",))) as server:
        assert (await _refused(server.url, "/v1/ws", **{"X-Request-ID": "mine"})).status_code == 401
        foreign = {"Authorization": "Bearer k", "Origin": "https://evil.example"}
        assert (await _refused(server.url, "/ws", **foreign)).status_code == 403
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dspy_trio.web.requests"]
    assert [(line["status"], line["error"], line["outcome"], line["path"]) for line in lines] == [
        (401, "invalid_api_key", "rejected", "/v1/ws"),
        (403, "origin_not_allowed", "rejected", "/ws"),
    ]
    assert lines[0]["label"] == "mine"


@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_a_page_that_rebinds_its_name_to_the_local_server_cannot_drive_it(transport: str) -> None:
    async with running() as server:
        port = server.url.rsplit(":", 1)[1]
        attacker = f"rebind.attacker.example:{port}"  # the page's own origin, now resolving to us
        headers = {"Host": attacker, "Origin": f"http://{attacker}"}
        if transport == "websocket":
            answer = await _refused(server.url, "/v1/ws", **headers)
        else:
            async with httpx.AsyncClient(base_url=server.url) as client:
                answer = await client.post("/predict", json={"question": "q"}, headers=headers)
    assert answer.status_code in (400, 403, 421), answer.status_code
