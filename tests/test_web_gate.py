"""The front door's overload refusal (web/door.py) over a real Hypercorn socket: a refusal answered below
Quart is the app's 429 (Retry-After, JSON error, request ids, Server-Timing), is counted once, leaves the
keep-alive connection usable, and never jumps ahead of a 401 or drops the CORS headers (``Vary: Origin``
included). It answers a body that never comes no later than the app would, reads a repeated header as
the app does, and leaves what is not a prediction (a CORS preflight, an unknown program, a path that
only looks like a program's route) to the app's own answer."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from dspy_trio import web
from dspy_trio.engine import (
    EngineConfig,
    LMConfig,
)
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


VARYING = {"date", "server-timing", "x-server-request-id", "x-request-id"}


BODY = b'{"question":"q"}'


@asynccontextmanager
async def _overloaded_server(
    gated: bool, *, holder_headers: dict[str, str] | None = None, **changes: Any
) -> AsyncIterator[Server]:
    """A served app whose engine's only slot is held, so every prediction is refused with 429; with
    ``gated`` False the front door hands every refusal to the app (only the keep-alive guard in front)."""
    lm = CountingLM(first_token_delay=300.0)
    with pytest.MonkeyPatch.context() as patch:
        if not gated:
            patch.setattr(web.door.FrontDoor, "answers_refusals", False)
        async with (
            running(_overloaded(**changes), lms={"default": lm}) as server,
            trio.open_nursery() as nursery,
        ):
            holder = await _hold_the_slot(server, nursery, **(holder_headers or {}))
            try:
                yield server
            finally:
                holder.cancel()


def _request_head(path: str, *fields: tuple[str, str]) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "x"), ("Content-Type", "application/json"), *fields]
    return conn, conn.send(h11.Request(method="POST", target=path, headers=headers)) or b""


async def _response(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, dict[str, str], bytes]:
    """One response, its varying headers left out."""
    status, headers, body = await _read_response(stream, conn)
    return status, {k: v for k, v in headers.items() if k not in VARYING}, body


async def _exchange(server: Server, path: str, *fields: tuple[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST ``BODY`` with the head and the body in separate segments; the response, varying headers out."""
    conn, head = _request_head(path, ("Content-Length", str(len(BODY))), *fields)
    stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
    async with stream:
        await stream.send_all(head)
        await trio.sleep(0.05)
        await stream.send_all(
            (conn.send(h11.Data(data=BODY)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        )
        with trio.fail_after(10):
            return await _response(stream, conn)


async def test_with_cors_configured_the_gates_429_to_a_request_without_origin_lacks_vary_origin() -> None:
    """With ``cors_origins`` set, the app (quart-cors) answers every response, a 429 without an
    ``Origin`` included, with ``Vary: Origin`` (the answer depends on the Origin, so a shared cache must
    key on it). The door's own 429 to a request without an Origin must carry it too: the app's answer,
    not one without ``Vary: Origin``."""
    cors: dict[str, Any] = {"cors_origins": ("https://app.example",)}
    async with _overloaded_server(True, **cors) as server:
        gated = await _exchange(server, "/predict")
    async with _overloaded_server(False, **cors) as server:
        bare = await _exchange(server, "/predict")
    assert bare[0] == gated[0] == 429
    assert bare[1].get("vary") == "Origin"
    assert gated == bare


async def _closed_by_server_after_body(stream: trio.SocketStream, conn: h11.Connection) -> bool:
    """Read the rest of the response, then whether the server closes the connection."""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


async def _time_to_answer_without_body(
    gated: bool, length: int = len(BODY)
) -> tuple[float, int, dict[str, str]]:
    """A client sends the head of an overloaded POST (``Content-Length: length``) and never the body:
    the virtual seconds until the answer starts."""
    async with _overloaded_server(gated, keep_alive_timeout=2.0, max_body_bytes=1024) as server:
        conn, head = _request_head("/predict", ("Content-Length", str(length)))
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            sent = trio.current_time()
            await stream.send_all(head)
            with trio.fail_after(60):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    assert isinstance(event, h11.Response)
                    answered = trio.current_time() - sent
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    assert await _closed_by_server_after_body(stream, conn)
                    return answered, event.status_code, headers


async def test_a_body_that_never_comes_holds_the_gates_429_for_twice_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Slowloris on an overloaded route: without the gate the 429 (``Connection: close``) goes out
    after ``keep_alive_timeout`` (the keep-alive guard's bounded wait for the body). The gate's 429 goes
    out at the same instant, not after twice that (the gate waiting ``keep_alive_timeout`` for the body
    itself, then the guard waiting ``drain_timeout`` again): a refused request holds its connection no
    longer than the app's."""
    bare = await _time_to_answer_without_body(gated=False)
    gated = await _time_to_answer_without_body(gated=True)
    assert bare[0] == 2.0
    assert bare[1] == gated[1] == 429
    assert gated[2]["connection"] == bare[2]["connection"] == "close"
    assert gated[0] == pytest.approx(bare[0])  # not 4.0: twice the keep-alive timeout


async def test_a_declared_too_large_body_that_never_comes_delays_the_gates_429(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An overloaded POST declaring a body over ``max_body_bytes`` (here 1 MiB + 1 > 1,024) that does
    not come: the keep-alive guard knows from the head that the body is not worth waiting for, so the
    app's 429 (with ``Connection: close``) goes out at once. The gate's goes out at once too, reading the
    declared length rather than waiting ``keep_alive_timeout`` for more than ``max_body_bytes``."""
    bare = await _time_to_answer_without_body(gated=False, length=1 << 20)
    gated = await _time_to_answer_without_body(gated=True, length=1 << 20)
    assert bare[1] == gated[1] == 429
    assert gated[2]["connection"] == bare[2]["connection"] == "close"
    assert bare[0] == 0.0
    assert gated[0] == bare[0]  # not 2.0 (the keep-alive timeout)


@pytest.mark.parametrize("target", ["/v1/programs/default/predict%0A", "/v1/programs/default/stream%0A"])
async def test_a_path_ending_in_an_encoded_newline_gets_the_apps_404_not_the_gates_429(target: str) -> None:
    """``.../predict%0A`` decodes to ``.../predict\\n``; a route pattern ending in ``$`` would match it
    (``$`` also matches before a trailing newline) and the gate would refuse it with 429, counted as a
    rejected request of the program. The app has no such route and answers 404: so must the gate,
    counting nothing."""
    async with _overloaded_server(True) as server:
        gated = await _exchange(server, target)
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
    async with _overloaded_server(False) as server:
        bare = await _exchange(server, target)
    assert bare[0] == 404
    assert gated == bare
    assert rejected == 0


async def test_with_two_authorization_headers_the_gate_reads_the_last_the_app_the_first() -> None:
    """API keys configured; a request with two ``Authorization`` headers, an invalid key first and the
    valid one second. The app reads the first (werkzeug's ``Headers.get``) and answers 401. The gate
    must read the same one and answer the same 401, counting no refusal (not keep the last value of a
    repeated header, find the request authorized, and answer 429)."""
    keys: dict[str, Any] = {"api_keys": ("k",)}
    holder = {"Authorization": "Bearer k"}
    fields = (("Authorization", "Bearer wrong"), ("Authorization", "Bearer k"))
    async with _overloaded_server(True, holder_headers=holder, **keys) as server:
        gated = await _exchange(server, "/predict", *fields)
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
    async with _overloaded_server(False, holder_headers=holder, **keys) as server:
        bare = await _exchange(server, "/predict", *fields)
    assert bare[0] == 401
    assert gated == bare
    assert rejected == 0


async def test_a_cors_preflight_is_not_refused_or_counted_as_an_overloaded_prediction() -> None:
    """A browser's CORS preflight (the automatic OPTIONS of a prediction's route: no body, no
    credentials, no prediction) to an overloaded server is answered as a preflight, not refused with a
    429 (the browser would report a CORS failure instead of the real 429 of its POST), and the engine
    counts no ``rejected`` request."""

    origin = "http://app.test"
    service = _overloaded(cors_origins=(origin,))
    async with (
        running(service, lms={"default": CountingLM(first_token_delay=30.0)}) as server,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        holder = await _hold_the_slot(server, nursery)
        preflight = await client.options(
            "/v1/programs/default/predict",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
        holder.cancel()
    assert preflight.status_code < 300, preflight.text
    assert preflight.headers.get("access-control-allow-origin") == origin
    assert rejected == 0


async def test_an_unknown_program_is_a_404_even_when_the_engine_is_overloaded() -> None:
    """``Engine._accept`` looks the program up before the admission check, so a prediction of an
    unknown program raises UnknownProgramError (404) whatever the load. Over HTTP it is the same 404,
    not a 429 with Retry-After (a client would retry a typo forever)."""

    async with (
        running(_overloaded(), lms={"default": CountingLM(first_token_delay=30.0)}) as server,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        holder = await _hold_the_slot(server, nursery)
        response = await client.post(
            "/v1/programs/no-such-program/predict", json={"inputs": {"question": "q"}}
        )
        holder.cancel()
    assert response.status_code == 404, response.text
