"""The MCP endpoint over real sockets with the official ``mcp`` SDK's client, in both protocol eras (the
current revision's single exchanges, and the handshake era's sessions): list the tools, call them with
progress, cancel mid-call (the upstream connection closes), keys, limits, and what a careless client
sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dspy
import httpx
import httpx2
import pytest
import trio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from dspy_trio.engine import EngineConfig, ProgramSpec
from dspy_trio.engine.lm import OpenAICompatibleLM
from dspy_trio.engine.testing import Behavior, open_fake_upstream
from dspy_trio.web.server import Server

from .helpers import HANG_GUARD, first_request_closed_by_client, wait_until
from .web_helpers import FAST, running, settings

MODES = ["auto", "legacy"]  # the current revision (discovered), and the handshake era


class Summary(dspy.Signature):
    """Summarize a text in a title and a word count."""

    text: str = dspy.InputField(desc="what to summarize")
    title: str = dspy.OutputField()
    words: int = dspy.OutputField(desc="how many words the text has")


ENGINE = EngineConfig(
    lms={"default": FAST},
    programs={"qa": ProgramSpec("question -> answer"), "summary": ProgramSpec(Summary)},
)


@asynccontextmanager
async def client(server: Server, mode: str, key: str = "k") -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=HANG_GUARD) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http), mode=mode) as mcp,
    ):
        yield mcp


@pytest.mark.parametrize("mode", MODES)
async def test_every_program_is_a_tool_with_its_schemas(mode: str) -> None:
    async with running(settings(api_keys=("k",), engine=ENGINE)) as server, client(server, mode) as mcp:
        tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
    assert set(tools) == {"qa", "summary"}
    summary = tools["summary"]
    assert summary.description == "Summarize a text in a title and a word count."
    assert summary.input_schema["properties"] == {
        "text": {"type": "string", "description": "what to summarize"}
    }
    assert summary.input_schema["required"] == ["text"]
    assert summary.output_schema is not None
    assert summary.output_schema["properties"]["words"] == {
        "type": "integer",
        "description": "how many words the text has",
    }


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_answers_text_and_structured_content_with_progress(mode: str) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, message))

    async with running(settings(api_keys=("k",), engine=ENGINE)) as server, client(server, mode) as mcp:
        answer = await mcp.call_tool("qa", {"question": "What is Trio?"}, progress_callback=on_progress)
        summary = await mcp.call_tool("summary", {"text": "Trio is a library."})
        wrong = await mcp.call_tool("qa", {"nope": "x"})
    assert not answer.is_error
    assert answer.structured_content is not None
    text = answer.structured_content["answer"]
    assert answer.content[0].text == text  # type: ignore[union-attr]
    assert progress[0] == (0, "running")
    assert "".join(message or "" for _, message in progress[1:]) == text  # token by token
    assert [done for done, _ in progress] == list(range(len(progress)))
    assert summary.structured_content is not None
    assert summary.structured_content["words"] == 42
    title = summary.structured_content["title"]
    assert summary.content[0].text == f'{{"title":"{title}","words":42}}'  # type: ignore[union-attr]
    assert wrong.is_error
    assert "unknown input field 'nope'" in wrong.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_tool_is_a_protocol_error(mode: str) -> None:
    from mcp.shared.exceptions import MCPError

    async with running(settings(api_keys=("k",), engine=ENGINE)) as server, client(server, mode) as mcp:
        with pytest.raises(MCPError) as caught:
            await mcp.call_tool("nope", {})
    assert "Unknown tool" in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
async def test_cancelling_a_call_cancels_the_prediction_and_closes_the_upstream(mode: str) -> None:
    """The handshake era sends ``notifications/cancelled``; the current one closes the response stream.
    Either way the engine's request ends and its upstream connection closes."""
    async with open_fake_upstream(Behavior(latency=600.0)) as upstream:
        lm = OpenAICompatibleLM("openai/m", api_base=upstream.url)
        async with (
            running(settings(api_keys=("k",), engine=ENGINE), lms={"default": lm}) as server,
            client(server, mode) as mcp,
        ):
            engine = server.state.engine
            assert engine is not None
            with trio.move_on_after(HANG_GUARD) as guard:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(mcp.call_tool, "qa", {"question": "What is Trio?"})
                    await upstream.wait_for(lambda u: len(u.records) == 1)
                    left = trio.current_time()
                    nursery.cancel_scope.cancel()
            assert not guard.cancelled_caught
            await first_request_closed_by_client(upstream, left)
            await wait_until(lambda: engine.statistics().in_flight == 0, seconds=HANG_GUARD)
            assert engine.statistics().succeeded == 0
            after = await mcp.list_tools()  # the connection (and the session) serve on
    assert after.tools


async def test_a_call_is_cancelled_by_its_id_too() -> None:
    async with open_fake_upstream(Behavior(latency=600.0)) as upstream:
        lm = OpenAICompatibleLM("openai/m", api_base=upstream.url)
        async with (
            running(settings(api_keys=("k",), engine=ENGINE), lms={"default": lm}) as server,
            client(server, "auto") as mcp,
        ):
            results: list[Any] = []

            async def call() -> None:
                results.append(await mcp.call_tool("qa", {"question": "q"}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await upstream.wait_for(lambda u: len(u.records) == 1)
                [request] = server.state.engine._ledger._active.values()  # type: ignore[union-attr]
                async with httpx.AsyncClient(
                    base_url=server.url, headers={"Authorization": "Bearer k"}
                ) as raw:
                    assert (await raw.delete(f"/v1/requests/{request.request_id}")).status_code == 200
    [result] = results
    assert result.is_error
    assert result.content[0].text.startswith("cancelled:")


@pytest.mark.parametrize("mode", MODES)
async def test_a_wrong_key_is_refused(mode: str) -> None:
    async with running(settings(api_keys=("k",), engine=ENGINE)) as server:
        with pytest.raises(Exception) as caught:  # noqa: PT011  # the SDK's own error for a 401
            async with client(server, mode, key="wrong") as mcp:
                await mcp.list_tools()
        async with httpx.AsyncClient(base_url=server.url) as raw:
            refused = await raw.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert "401" in repr(caught.value) or "Unauthorized" in repr(caught.value) or caught.value
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


async def test_a_session_belongs_to_the_key_that_opened_it() -> None:
    service = settings(api_keys=("k", "other"), engine=ENGINE)
    async with running(service) as server, httpx.AsyncClient(base_url=server.url) as raw:
        opened = await raw.post(
            "/mcp",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            },
            headers={"Authorization": "Bearer k", "Accept": "application/json, text/event-stream"},
        )
        session = opened.headers["mcp-session-id"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        common = {"Accept": "application/json, text/event-stream", "Mcp-Session-Id": session}
        common["MCP-Protocol-Version"] = "2025-11-25"
        other = await raw.post("/mcp", json=listing, headers={**common, "Authorization": "Bearer other"})
        same = await raw.post("/mcp", json=listing, headers={**common, "Authorization": "Bearer k"})
    assert opened.status_code == 200
    assert other.status_code == 404  # as if it did not exist
    assert same.status_code == 200


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


async def test_one_key_cannot_take_every_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handshake-era sessions are bounded (MAX_SESSIONS) and live until their idle timeout: one key that
    opened sessions and never ended them took them all, and every other key's ``initialize`` was refused
    (503) for ten minutes. A key holds at most MAX_SESSIONS_PER_KEY; past it its own ``initialize`` is a
    429 naming the limit, and the other keys open theirs."""
    import dspy_trio.web.mcp as endpoint

    monkeypatch.setattr(endpoint, "MAX_SESSIONS", 3)
    monkeypatch.setattr(endpoint, "MAX_SESSIONS_PER_KEY", 2)
    accept = {"Accept": "application/json, text/event-stream"}
    service = settings(api_keys=("k", "other"), engine=ENGINE)
    async with running(service) as server, httpx.AsyncClient(base_url=server.url) as raw:
        mine = [
            await raw.post("/mcp", json=INITIALIZE, headers={**accept, "Authorization": "Bearer k"})
            for _ in range(3)
        ]
        other = await raw.post("/mcp", json=INITIALIZE, headers={**accept, "Authorization": "Bearer other"})
        ended = await raw.delete(
            "/mcp",
            headers={
                "Authorization": "Bearer k",
                "Mcp-Session-Id": mine[0].headers["mcp-session-id"],
                "MCP-Protocol-Version": "2025-11-25",
            },
        )
        again = await raw.post("/mcp", json=INITIALIZE, headers={**accept, "Authorization": "Bearer k"})
    assert [response.status_code for response in mine] == [200, 200, 429]
    assert mine[2].json()["error"]["code"] == "too_many_sessions"
    assert "2 open MCP sessions" in mine[2].json()["error"]["message"]
    assert other.status_code == 200, other.text
    assert ended.status_code == 200
    assert again.status_code == 200  # its ended session gave its place back


MODERN = "2026-07-28"  # a protocol version of the current revision
LIST = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
HOSTILE = [
    ("GET", b"", {}, 405, "method_not_allowed"),
    ("PUT", b"{}", {}, 405, "method_not_allowed"),
    ("POST", b"[" * 100 + b"]" * 100, {}, 400, "too_deeply_nested"),
    ("POST", b'{"x": "' + b"y" * 7000 + b'"}', {}, 413, "body_too_large"),
    ("POST", b"{}", {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
    ("POST", b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", b"{}", {"Content-Type": "application/jsonx"}, 415, "unsupported_media_type"),
    # The answer is JSON or SSE: an Accept without both is refused, in either era, with a JSON body.
    ("POST", LIST, {"Accept": "text/html"}, 406, "not_acceptable"),
    (
        "POST",
        LIST,
        {"Accept": "application/json", "MCP-Protocol-Version": "2026-07-28"},
        406,
        "not_acceptable",
    ),
]


async def test_hostile_requests_get_a_named_refusal_and_the_connection_serves_on() -> None:
    service = settings(api_keys=("k",), engine=ENGINE, max_body_bytes=6000)
    async with running(service) as server, httpx.AsyncClient(base_url=server.url) as raw:
        for method, body, headers, status, code in HOSTILE:
            sent = {"Authorization": "Bearer k", "Content-Type": "application/json", **headers}
            response = await raw.request(method, "/mcp", content=body, headers=sent)
            case = (method, body[:20], response.text[:200])
            assert response.status_code == status, case
            assert response.json()["error"]["code"] == code, case
            after = await raw.get("/health")
            if response.headers.get("connection") != "close":
                port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
                assert after.extensions["network_stream"].get_extra_info("client_addr")[1] == port, case
        # A POST without a body or a Content-Type: the service's 415, as on every other route.
        response = await raw.post("/mcp", headers={"Authorization": "Bearer k"})
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "unsupported_media_type"
        # Not JSON, or not JSON-RPC: the SDK's own JSON-RPC errors, and the connection serves on.
        for body in (b"{nope", b"[]", b'{"jsonrpc": "2.0", "id": 1, "method": 5}', b"\xff\xfe"):
            response = await raw.post(
                "/mcp",
                content=body,
                headers={
                    "Authorization": "Bearer k",
                    "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream",
                    "MCP-Protocol-Version": "2026-07-28",
                },
            )
            assert 400 <= response.status_code < 500, (body, response.text[:200])
            assert "error" in response.json(), body
        assert (await raw.get("/health")).text == "OK"
