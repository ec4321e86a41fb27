"""The front door's overload refusal (web/door.py) over a real Hypercorn socket: a refusal answered below
Quart is the app's 429 (Retry-After, JSON error, request ids, Server-Timing), is counted once, leaves the
keep-alive connection usable, and never jumps ahead of a 401 or drops the CORS headers."""

from __future__ import annotations

import json
import re
from typing import Any

import h11
import pytest
import trio

from dspy_trio.engine import EngineConfig, LMConfig
from dspy_trio.web.server import Server

from .helpers import CountingLM, wait_until
from .test_web_keepalive import _port, _read_response, _split_request
from .web_helpers import running, settings

BODIES = {
    "/predict": {"question": "q"},
    "/predict/stream": {"question": "q"},
    "/stream": {"question": "q"},
    "/v1/programs/default/predict": {"inputs": {"question": "q"}},
    "/v1/programs/default/stream": {"inputs": {"question": "q"}},
}


def _overloaded(**changes: Any) -> Any:
    engine = EngineConfig(lms={"default": LMConfig()}, max_in_flight=1, max_queued=0)
    return settings(engine=engine, **changes)


async def _hold_the_slot(server: Server, nursery: trio.Nursery, **headers: str) -> trio.CancelScope:
    """Occupy the engine's only slot with a request that waits 30 s upstream."""
    holder = trio.CancelScope()

    async def hold() -> None:
        with holder:
            stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
            async with stream:
                await _split_request(
                    stream, h11.Connection(h11.CLIENT), "/predict", b'{"question":"h"}', **headers
                )

    nursery.start_soon(hold)
    await wait_until(lambda: server.state.engine.statistics().in_flight == 1)  # type: ignore[union-attr]
    return holder


def _rejected(server: Server) -> int:
    return server.state.engine.statistics().rejected  # type: ignore[union-attr]


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_a_refusal_is_the_apps_429_and_the_connection_serves_the_next_request(path: str) -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with running(_overloaded(), lms={"default": lm}) as server, trio.open_nursery() as nursery:
        holder = await _hold_the_slot(server, nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            with trio.fail_after(10):
                body = json.dumps(BODIES[path]).encode()
                status, headers, raw = await _split_request(
                    stream, conn, path, body, X_Request_ID="my-label.1"
                )
                assert status == 429
                assert int(headers["retry-after"]) >= 1
                assert headers["content-type"] == "application/json"
                assert json.loads(raw) == {
                    "error": {
                        "message": json.loads(raw)["error"]["message"],
                        "type": "rate_limit_error",
                        "code": "overloaded",
                        "param": None,
                    }
                }
                assert "overloaded" in json.loads(raw)["error"]["message"]
                assert re.fullmatch(r"[0-9a-f]{32}", headers["x-server-request-id"])
                assert headers["x-request-id"] == "my-label.1"
                assert re.fullmatch(r"total;dur=[0-9.]+", headers["server-timing"])
                assert _rejected(server) == 1  # counted once
                # The same connection answers the next request.
                await stream.send_all(
                    conn.send(h11.Request(method="GET", target="/health", headers=[("Host", "x")])) or b""
                )
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                assert (await _read_response(stream, conn))[0] == 200
        holder.cancel()


async def test_a_refusal_with_an_invalid_label_carries_the_server_id_in_both_headers() -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with running(_overloaded(), lms={"default": lm}) as server, trio.open_nursery() as nursery:
        holder = await _hold_the_slot(server, nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            status, headers, _ = await _split_request(
                stream, h11.Connection(h11.CLIENT), "/predict", b'{"question":"q"}', X_Request_ID="no spaces"
            )
        holder.cancel()
    assert status == 429
    assert headers["x-request-id"] == headers["x-server-request-id"]


async def test_with_api_keys_a_401_comes_before_the_429_and_is_not_counted_as_rejected() -> None:
    lm = CountingLM(first_token_delay=30.0)
    service = _overloaded(api_keys=("k",))
    async with running(service, lms={"default": lm}) as server, trio.open_nursery() as nursery:
        holder = await _hold_the_slot(server, nursery, Authorization="Bearer k")
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            with trio.fail_after(10):
                body = b'{"question":"q"}'
                assert (await _split_request(stream, conn, "/predict", body))[0] == 401
                assert _rejected(server) == 0
                wrong = await _split_request(stream, conn, "/predict", body, Authorization="Bearer nope")
                assert wrong[0] == 401
                refused = await _split_request(stream, conn, "/predict", body, Authorization="Bearer k")
                assert refused[0] == 429
                assert _rejected(server) == 1
        holder.cancel()


async def test_with_cors_a_refusal_from_a_browser_carries_the_cors_headers_and_matches_the_plain_one() -> (
    None
):
    origin = "https://app.example"
    lm = CountingLM(first_token_delay=30.0)
    async with (
        running(_overloaded(cors_origins=(origin,)), lms={"default": lm}) as server,
        trio.open_nursery() as nursery,
    ):
        holder = await _hold_the_slot(server, nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            with trio.fail_after(10):
                body = b'{"question":"q"}'
                browser = await _split_request(stream, conn, "/predict", body, Origin=origin)
                plain = await _split_request(stream, conn, "/predict", body)
        holder.cancel()
    assert browser[0] == plain[0] == 429
    assert browser[1]["access-control-allow-origin"] == origin
    assert json.loads(browser[2]) == json.loads(plain[2])  # the app's answer and the gate's are one
    varying = {"date", "server-timing", "x-server-request-id", "x-request-id", "content-length"}
    cors = {name for name in browser[1] if name.startswith("access-control-") or name == "vary"}
    assert {k: v for k, v in browser[1].items() if k not in varying | cors} == {
        k: v for k, v in plain[1].items() if k not in varying | cors
    }
    assert plain[1].get("vary") == "Origin"  # with CORS configured the app answers: quart-cors's Vary too
    assert _rejected(server) == 2
