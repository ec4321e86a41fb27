"""What clients and the log learn of an upstream's failure (engine/lm/_http_errors.py): clients get the
status, its meaning and a stable code; the upstream's words go to the log, redacted. An upstream that
quotes the API key it received — in a JSON error, an HTML page, an error event mid-stream — never sends
it to a client, on either transport, either provider, or any of the service's transports."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from dspy_trio.engine import (
    EngineConfig,
    LMConfig,
    OpenAISettings,
    RetryPolicy,
    UpstreamError,
    UpstreamServerError,
)
from dspy_trio.engine.lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM, TrioLM
from dspy_trio.engine.lm._http_errors import parse_retry_after, status_error
from dspy_trio.engine.lm._redact import Redactor
from dspy_trio.engine.testing import FakeUpstream, Fault

from .transport_helpers import keep_alive_handler, open_raw_server
from .web_helpers import running, settings

pytestmark = pytest.mark.network

KEY = "sk-live-7Hq2Vn9RtK4mXw8ZbC3pLd6FsJ1gYe5A"
MESSAGES = [{"role": "user", "content": "[[ ## question ## ]]\nWhat is Trio?"}]

LEAKS = [
    pytest.param(Fault("echo_key"), "401", id="json-401"),
    pytest.param(Fault("echo_key", status=400), "400", id="json-400"),
    pytest.param(Fault("echo_key", status=500), "500", id="json-500"),
    pytest.param(Fault("html", status=502), "502", id="html-502"),
    pytest.param(Fault("echo_key", status=401, after_tokens=2), "mid-stream", id="mid-stream-401"),
    pytest.param(Fault("echo_key", status=500, after_tokens=2), "mid-stream", id="mid-stream-500"),
]


def leaked(text: str) -> bool:
    """Whether ``text`` holds the key, or any eight characters of it in a row."""
    return any(KEY[i : i + 8] in text for i in range(len(KEY) - 7))


def backend(provider: str, transport: str, url: str) -> TrioLM:
    http = HTTPSettings(client=transport)  # type: ignore[arg-type]
    if provider == "openai":
        return OpenAICompatibleLM("fake", api_base=url, api_key=KEY, http=http)
    return AnthropicLM("claude-fake", api_base=url, api_key=KEY, http=http)


class Sink:
    async def send(self, text: str) -> None:
        pass


@pytest.mark.parametrize(("fault", "shown"), LEAKS)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_an_upstream_quoting_the_key_never_puts_it_in_an_error(
    fake_upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    shown: str,
    provider: str,
    transport: str,
) -> None:
    lm = backend(provider, transport, fake_upstream.url)
    fake_upstream.add_faults(fault)
    with pytest.raises(UpstreamError) as info:
        await lm.complete(MESSAGES, {}, Sink())
    await lm.aclose()
    assert fake_upstream.records[-1].headers.get("authorization", KEY) != "(none)"
    assert not leaked(info.value.message), info.value.message
    assert not leaked(str(info.value))
    if shown != "mid-stream":
        assert f"HTTP {shown}" in info.value.message
    assert "<" not in info.value.message  # no HTML either
    assert not leaked(caplog.text), caplog.text
    assert "[redacted]" in caplog.text  # the upstream's words are in the log, without the key


async def test_over_http_sse_and_websocket_the_key_never_reaches_a_client(
    fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's own error bodies: a JSON 502, an SSE error event, a /v1/ws error frame, for an
    upstream 401 that quotes the key, an HTML 502 page that dumps the request headers, and an error
    event mid-stream."""
    lm = LMConfig(
        model="fake",
        retry=RetryPolicy(max_attempts=1),
        settings=OpenAISettings(api_base=fake_upstream.url, api_key=KEY),
    )
    faults = [Fault("echo_key"), Fault("html", status=502), Fault("echo_key", status=401, after_tokens=2)]
    bodies: list[str] = []
    async with running(settings(engine=EngineConfig(lms={"default": lm}))) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            for fault in faults:
                fake_upstream.add_faults(fault)
                predict = await client.post(
                    "/v1/programs/default/predict", json={"inputs": {"question": "q"}}
                )
                assert predict.status_code >= 400
                bodies.append(predict.text)
                fake_upstream.add_faults(fault)
                stream = await client.post("/v1/programs/default/stream", json={"inputs": {"question": "q"}})
                assert "event: error" in stream.text
                bodies.append(stream.text)
        async with open_websocket_url(server.url.replace("http", "ws") + "/v1/ws") as ws:
            for index, fault in enumerate(faults * 2):
                fake_upstream.add_faults(fault)
                kind = "predict" if index < len(faults) else "stream"
                await ws.send_message(
                    json.dumps({"id": str(index), "type": kind, "inputs": {"question": "q"}})
                )
                frames = await _frames_until_the_end(ws)
                assert frames[-1]["type"] == "error", frames
                bodies.extend(json.dumps(frame) for frame in frames)
    assert len(fake_upstream.records) == 12
    for body in bodies:
        assert not leaked(body), body
        assert "<html" not in body.lower()
    codes = {json.loads(b)["error"]["code"] for b in bodies if b.startswith("{") and '"error"' in b}
    assert codes <= {"upstream_bad_response", "upstream_server_error"}, codes
    assert not leaked(caplog.text)
    assert caplog.text.count("[redacted]") >= 12


async def _frames_until_the_end(ws: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with trio.fail_after(30):  # a hang guard only
        while not frames or frames[-1]["type"] not in ("result", "final", "error", "cancelled"):
            frames.append(json.loads(await ws.get_message()))
    return frames


@pytest.mark.parametrize(
    "body",
    ["[" * 20_000 + "]" * 20_000, "[]," * 1_000_000, "<html>" + "x" * 100_000],
    ids=["deep", "huge", "html"],
)
def test_any_error_body_gives_a_typed_error_with_our_words(
    body: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A deeply nested, huge or HTML error body: the status's meaning for the client, 500 characters of
    the body for the log."""
    error = status_error("m", 503, {"retry-after": "2"}, body, Redactor())
    assert isinstance(error, UpstreamServerError)
    assert error.message == "m: the upstream answered HTTP 503: it failed"
    assert error.retry_after == 2
    assert len(caplog.records[-1].getMessage()) < 700


@pytest.mark.parametrize(
    "lines",
    [
        [b"retry-after: 5", b"retry-after: 7"],
        [b"retry-after-ms: 5000", b"retry-after-ms: 7000"],
        [b"retry-after: \xd9\xa3"],
    ],
    ids=["two-retry-after", "two-retry-after-ms", "non-ascii-digit"],
)
async def test_the_same_429_bytes_give_the_same_retry_after_on_both_transports(lines: list[bytes]) -> None:
    """A 429 with two ``Retry-After`` headers (a provider's and a proxy's), or a value that is not an
    RFC 9110 delay: whichever transport reads the bytes, the engine must wait the same time before it
    calls again (and only for a value made of ASCII digits)."""
    body = b'{"error": {"message": "slow down"}}'
    raw = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )
    seen: dict[str, float | None] = {}
    async with open_raw_server(keep_alive_handler(lambda request, content: raw)) as server:
        for transport in ("lean", "httpx"):
            lm = backend("openai", transport, server.url)
            with pytest.raises(UpstreamError) as info:
                await lm.complete(MESSAGES, {}, None)
            seen[transport] = info.value.retry_after
            await lm.aclose()
    assert seen["lean"] == seen["httpx"], seen


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "Infinity"}, None),
        ({"Retry-After": "1e400"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "nan", "Retry-After": "5"}, 5.0),  # garbage ms should fall through, as "abc" does
        ({"retry-after-ms": "abc", "Retry-After": "5"}, 5.0),  # (the control)
    ],
    ids=["inf", "Infinity", "1e400", "ms-inf", "ms-nan", "ms-garbage"],
)
def test_non_finite_retry_after_values_are_ignored(headers: dict[str, str], expected: float | None) -> None:
    """lm/_http_errors.py parse_retry_after ignores "inf", "Infinity", "nan" and "1e400" (which float()
    accepts, or overflows to inf), as it ignores any other garbage; a garbage ``retry-after-ms`` falls
    through to ``Retry-After``."""
    assert parse_retry_after(httpx.Headers(headers), now=0.0) == expected
