"""Tenants over real sockets: keys of different tenants over HTTP, SSE, both WebSockets and batches, each
counted against its own tenant (by name in metrics and logs, never by key), refused by its own limits
with the codes and statuses that name the cause, and a doomed wait refused with 503."""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from typing import Any

import httpx
import httpx2
import pytest
import trio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from trio_websocket import open_websocket_url

from dspy_trio.engine import EngineConfig, RateLimit, TenantConfig
from dspy_trio.web.client import ServiceError, open_client
from dspy_trio.web.keys import api_key_tenant
from dspy_trio.web.server import Server

from .helpers import CountingLM
from .web_helpers import FAST, running, settings

BIG, SMALL, PLAIN = "k-big-0123456789", "k-small-0123456789", "k-plain-0123456789"
PLAIN_TENANT = api_key_tenant(hashlib.sha256(PLAIN.encode()).hexdigest())


def config(**tenants: TenantConfig) -> EngineConfig:
    defaults = {
        "big": TenantConfig(key_digests=(hashlib.sha256(BIG.encode()).hexdigest(),), weight=3),
        "small": TenantConfig(key_digests=(hashlib.sha256(SMALL.encode()).hexdigest(),)),
    }
    return EngineConfig(lms={"default": FAST}, tenants={**defaults, **tenants})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def metrics(server: Server) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, headers=auth(BIG)) as client:
        payload: dict[str, Any] = (
            await client.get("/metrics", headers={"accept": "application/json"})
        ).json()
        return payload


async def every_transport(server: Server, key: str) -> list[Any]:
    """One request over each transport with ``key``; returns what each answered (a status, a frame)."""
    seen: list[Any] = []
    ws_url = server.url.replace("http", "ws")
    async with httpx.AsyncClient(base_url=server.url, headers=auth(key)) as client:
        response = await client.post("/v1/programs/default/predict", json={"inputs": {"question": "http"}})
        seen.append(("http", response.status_code, response.json().get("error", {}).get("code")))
        async with client.stream(
            "POST", "/v1/programs/default/stream", json={"inputs": {"question": "sse"}}
        ) as response:
            text = (await response.aread()).decode()
        code = json.loads(text).get("error", {}).get("code") if response.status_code != 200 else None
        seen.append(("sse", response.status_code, code or ("event: final" in text and "final")))
        batch = await client.post("/v1/programs/default/batch", json={"items": [{"question": "b"}] * 2})
        codes = [
            r.get("error", {}).get("code", "ok") if "error" in r else "ok" for r in batch.json()["results"]
        ]
        seen.append(("batch", batch.status_code, codes))
        chat = {"model": "default", "messages": [{"role": "user", "content": "chat"}]}
        response = await client.post("/v1/chat/completions", json=chat)
        seen.append(("chat", response.status_code, response.json().get("error", {}).get("code")))
        async with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
            text = (await response.aread()).decode()
        code = json.loads(text).get("error", {}).get("code") if response.status_code != 200 else None
        seen.append(("chat_stream", response.status_code, code or ("[DONE]" in text and "done")))
    async with open_websocket_url(f"{ws_url}/ws?api_key={key}") as ws:
        await ws.send_message("ws question")
        first = await ws.get_message()
        frames = [first]
        while frames[-1] != "[DONE]":
            frames.append(await ws.get_message())
        seen.append(("ws", json.loads(first)["error"]["code"] if first.startswith("{") else "tokens"))
    async with open_client(server.url, api_key=key) as service, service.open_multiplexed() as ws:
        try:
            answer = await ws.predict("default", {"question": "v1 ws"})
            seen.append(("v1_ws", answer["type"]))
        except ServiceError as error:
            seen.append(("v1_ws", error.code))
    async with (
        httpx2.AsyncClient(headers=auth(key), timeout=60) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http), mode="auto") as mcp,
    ):
        tool = await mcp.call_tool("default", {"question": "mcp"})
        text = tool.content[0].text  # type: ignore[union-attr]
        seen.append(("mcp", text.split(":", 1)[0] if tool.is_error else "ok"))
    return seen


async def test_each_key_counts_against_its_own_tenant_on_every_transport(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_trio.engine.requests")
    async with running(settings(engine=config(), api_keys=(PLAIN,))) as server:
        big = await every_transport(server, BIG)
        plain = await every_transport(server, PLAIN)
        assert (
            big
            == plain
            == [
                ("http", 200, None),
                ("sse", 200, "final"),
                ("batch", 200, ["ok", "ok"]),
                ("chat", 200, None),
                ("chat_stream", 200, "done"),
                ("ws", "tokens"),
                ("v1_ws", "result"),
                ("mcp", "ok"),
            ]
        )
        tenants = (await metrics(server))["tenants"]
        async with httpx.AsyncClient(base_url=server.url, headers=auth(BIG)) as client:
            text = (await client.get("/metrics")).text
            whoami = (await client.get("/v1/tenant")).json()
            anonymous = await client.get("/v1/tenant", headers={"Authorization": "Bearer wrong"})
    # http, sse, 2 batch items, 2 chat completions, /ws, /v1/ws, an MCP tool call: 9 requests each, in
    # its own tenant.
    assert tenants["big"]["requests"] == {"succeeded": 9}
    assert tenants[PLAIN_TENANT]["requests"] == {"succeeded": 9}
    assert tenants["big"]["weight"] == 3
    assert tenants["big"]["prompt_tokens"] > 0
    assert "small" not in tenants
    assert 'dspy_trio_tenant_requests_total{outcome="succeeded",tenant="big"} 9.0' in text
    assert (whoami["tenant"], whoami["weight"], whoami["usage"]["requests"]) == ("big", 3, {"succeeded": 9})
    assert anonymous.status_code == 401
    lines = [json.loads(r.message) for r in caplog.records if r.name == "dspy_trio.engine.requests"]
    assert {line["tenant"] for line in lines} == {"big", PLAIN_TENANT}
    for key in (BIG, PLAIN):
        assert key not in text
        assert key not in json.dumps(tenants)
        assert key not in caplog.text


async def test_a_tenant_over_its_rate_limit_is_refused_on_every_transport_and_others_are_not() -> None:
    engine = config(
        small=TenantConfig(
            key_digests=(hashlib.sha256(SMALL.encode()).hexdigest(),), rate_limit=RateLimit(rpm=1)
        )
    )
    async with running(settings(engine=engine)) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=auth(SMALL)) as client:
            first = await client.post("/v1/programs/default/predict", json={"inputs": {"question": "q"}})
            assert first.status_code == 200
        refused = await every_transport(server, SMALL)
        assert refused == [
            ("http", 429, "tenant_rate_limited"),
            ("sse", 429, "tenant_rate_limited"),  # a status before the stream, not an event in it
            ("batch", 200, ["tenant_rate_limited", "tenant_rate_limited"]),
            ("chat", 429, "tenant_rate_limited"),
            ("chat_stream", 429, "tenant_rate_limited"),
            ("ws", "tenant_rate_limited"),
            ("v1_ws", "tenant_rate_limited"),
            ("mcp", "tenant_rate_limited"),  # a tool error naming the code
        ]
        async with httpx.AsyncClient(base_url=server.url, headers=auth(SMALL)) as client:
            response = await client.post("/predict", json={"question": "q"})
        assert response.status_code == 429
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert (await every_transport(server, BIG))[0] == ("http", 200, None)  # other tenants run on


async def test_a_doomed_wait_is_a_503_with_retry_after_at_once() -> None:
    lm = CountingLM(first_token_delay=0.5)
    engine = EngineConfig(lms={"default": FAST}, max_in_flight=1)
    async with running(settings(engine=engine), lms={"default": lm}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            await client.post("/predict", json={"question": "measure"})
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(partial(client.post, "/predict", json={"question": "q"}))
                await trio.sleep(0.2)
                response = await client.post(
                    "/v1/programs/default/predict",
                    json={"inputs": {"question": "doomed"}, "timeout_secs": 1},
                )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "deadline_unmeetable"
        assert int(response.headers["retry-after"]) >= 1
