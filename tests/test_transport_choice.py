"""When the HTTP backends use the lean transport and when they fall back to httpx (proxies, HTTP/2)."""

from __future__ import annotations

import json
from typing import Any

import h11
import pytest
import trio

from dspy_trio.engine.lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM
from dspy_trio.engine.lm._transport import ClientShards, LeanClient, choose, proxy_for

from .transport_helpers import RawServer, open_raw_server, read_request

PROXY_VARIABLES = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_lean_without_proxies() -> None:
    assert choose("https://api.openai.com/v1") == "lean"
    assert isinstance(HTTPSettings().clients("https://api.openai.com/v1/", {}), LeanClient)


@pytest.mark.parametrize(
    ("variable", "url", "proxied"),
    [
        ("HTTPS_PROXY", "https://api.openai.com/v1", True),
        ("https_proxy", "https://api.openai.com/v1", True),
        ("HTTPS_PROXY", "http://127.0.0.1:8000/v1", False),
        ("HTTP_PROXY", "http://127.0.0.1:8000/v1", True),
        ("ALL_PROXY", "https://api.anthropic.com", True),
    ],
)
def test_a_proxy_for_the_scheme_selects_httpx(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str, proxied: bool
) -> None:
    monkeypatch.setenv(variable, "http://proxy.internal:3128")
    assert choose(url) == ("httpx" if proxied else "lean")
    clients = HTTPSettings().clients(url.rstrip("/") + "/", {})
    assert isinstance(clients, ClientShards if proxied else LeanClient)


@pytest.mark.parametrize(
    ("no_proxy", "exempt"),
    [
        ("*", True),
        ("api.openai.com", True),
        (".openai.com", True),
        ("openai.com", True),
        ("api.openai.com:443", True),
        ("api.openai.com:8443", False),
        ("other.com, localhost", False),
        ("penai.com", False),
    ],
)
def test_no_proxy_exempts_hosts(monkeypatch: pytest.MonkeyPatch, no_proxy: str, exempt: bool) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert (proxy_for("https://api.openai.com:443/v1") is None) == exempt


def test_http2_and_explicit_choices() -> None:
    assert choose("https://a.example/v1", http2=True) == "httpx"
    assert choose("https://a.example/v1", "httpx") == "httpx"
    assert choose("https://a.example/v1", "lean") == "lean"
    assert isinstance(HTTPSettings(client="httpx").clients("http://a.example/", {}), ClientShards)


@pytest.mark.network
async def test_requests_go_through_the_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``HTTP_PROXY`` set the backend's request reaches the proxy in absolute form (httpx did it)."""
    completion = {
        "choices": [{"message": {"content": "[[ ## answer ## ]]\nvia proxy\n\n[[ ## completed ## ]]"}}]
    }

    async def proxy(stream: trio.abc.Stream, server: RawServer) -> None:
        while await read_request(stream, h11.Connection(h11.SERVER), server):
            payload = json.dumps(completion).encode()
            head = (
                f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
            )
            await stream.send_all(head.encode() + payload)

    async with open_raw_server(proxy) as server:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
        lm = OpenAICompatibleLM("openai/m", api_base="http://upstream.invalid/v1")
        assert isinstance(lm._clients, ClientShards)
        response = await lm._clients.post_json("m", "chat/completions", {"messages": []})
        assert response.json() == completion
        assert server.requests[0].target == b"http://upstream.invalid/v1/chat/completions"
        await lm.aclose()


class Sink:
    def __init__(self) -> None:
        self.deltas: list[str] = []

    async def send(self, text: str) -> None:
        self.deltas.append(text)


@pytest.mark.network
@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_both_transports_give_the_backends_the_same_answers(fake_upstream: Any, transport: str) -> None:
    http = HTTPSettings(client=transport)  # type: ignore[arg-type]
    backends = [
        OpenAICompatibleLM("openai/m", api_base=fake_upstream.url, api_key="k", http=http),
        AnthropicLM("anthropic/m", api_base=fake_upstream.url, api_key="k", http=http),
    ]
    messages = [{"role": "user", "content": "[[ ## question ## ]]\nWhat is Trio?"}]
    for lm in backends:
        assert isinstance(lm._clients, LeanClient if transport == "lean" else ClientShards)
        plain = await lm.complete(messages, {}, None)
        sink = Sink()
        streamed = await lm.complete(messages, {}, sink)
        assert plain.texts == streamed.texts
        assert plain.texts[0].startswith("[[ ## answer ## ]]")
        assert "".join(sink.deltas) == streamed.texts[0]
        assert streamed.usage["completion_tokens"] > 0
        await lm.aclose()
