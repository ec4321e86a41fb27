"""The JSON prediction routes answered below Quart (web/lean.py) answer exactly as the app does.

Every request here is sent twice over a raw socket to one real server: once answered below Quart, once
by Quart (``FrontDoor.answers_below_quart`` off), and the two answers are compared (status, headers but
the per-request ids and times, JSON body but its per-request fields), then the same connection is
reused for a ``/health`` when the answer kept it open.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from dspy_trio.web.app import ServiceApp
from dspy_trio.web.door import FrontDoor
from dspy_trio.web.server import Server

from .helpers import CountingLM, tasks_living, wait_until
from .test_web_keepalive import _port
from .test_web_protocol import read_responses
from .web_helpers import RAW_HOST, running, settings

MAX_BODY = 4000
GUARD = 30  # seconds: a hang guard only
VARYING_HEADERS = {"date", "server-timing", "x-server-request-id", "x-request-id"}
VARYING_FIELDS = {"request_id", "timings", "duration_ms"}

V1 = "/v1/programs/default/predict"


def _post(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    """A POST of ``body``; its ``Content-Length`` is the body's unless ``length`` says otherwise."""
    fields = [f"POST {path} HTTP/1.1", f"Host: {RAW_HOST}", *headers]
    fields.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(fields) + "\r\n\r\n").encode("latin-1") + body


def _head_then_body(path: str, body: bytes) -> tuple[bytes, bytes]:
    head = _post(path, b"", JSON, length=len(body))
    return head, body


def _chunked(path: str, *chunks: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {RAW_HOST}\r\n{JSON}\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head.encode() + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


JSON = "Content-Type: application/json"
BIG = b'{"inputs": {"question": "' + b"x" * MAX_BODY + b'"}}'

# name -> (the request's segments, sent one after another, and the status both ways must answer)
CASES: dict[str, tuple[tuple[bytes, ...], int]] = {
    "v1": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON),), 200),
    "seed": ((_post("/predict", b'{"question": "q"}', JSON),), 200),
    "charset": (
        (_post(V1, b'{"inputs": {"question": "q"}}', "Content-Type: application/json; charset=utf-8"),),
        200,
    ),
    "no inputs": ((_post(V1, b'{"inputs": {}}', JSON),), 422),
    "head then body": (_head_then_body(V1, b'{"inputs": {"question": "q"}}'), 200),
    "split body": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON)[:-10], b'on": "q"}}'), 200),
    "chunked": ((_chunked(V1, b'{"inputs": ', b'{"question": "q"}}'),), 200),
    "no content type": ((_post(V1, b'{"inputs": {}}'),), 415),
    "text": ((_post(V1, b'{"inputs": {}}', "Content-Type: text/plain"),), 415),
    "gzip": ((_post(V1, b'{"inputs": {}}', JSON, "Content-Encoding: gzip"),), 415),
    "declared too large": ((_post(V1, b"", JSON, length=99_999),), 413),
    # Past the limit and still coming (a body that ends in the same segment may be read whole first).
    "grows too large": ((_chunked(V1, BIG[:3000], BIG[3000:]).removesuffix(b"0\r\n\r\n"),), 413),
    "bad json": ((_post(V1, b'{"inputs": ', JSON),), 400),
    "deep json": ((_post(V1, b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}", JSON),), 400),
    "not utf-8": ((_post(V1, b'{"inputs": {"question": "\xff\xfe"}}', JSON),), 400),
    "empty": ((_post(V1, b"", JSON),), 400),
    "array": ((_post(V1, b"[1]", JSON),), 422),
    "wrong field": ((_post(V1, b'{"inputs": 3}', JSON),), 422),
    "bad timeout field": ((_post("/predict", b'{"question": "q", "timeout_secs": "5"}', JSON),), 422),
    "bad timeout header": ((_post(V1, b'{"inputs": {}}', JSON, "X-Request-Timeout: soon"),), 422),
    "surrogate": ((_post(V1, b'{"inputs": {"question": "\\ud800"}}', JSON),), 422),
    "too many chars": ((_post(V1, b'{"inputs": {"question": "' + b"y" * 300 + b'"}}', JSON),), 413),
    "unknown program": ((_post("/v1/programs/nope/predict", b'{"inputs": {}}', JSON),), 404),
    "unknown input": ((_post(V1, b'{"inputs": {"nope": 1}}', JSON),), 422),
    "query string": ((_post(V1 + "?stream=1&x", b'{"inputs": {"question": "q"}}', JSON),), 200),
    "chunk extensions and trailers": (
        (
            _chunked(V1, b'{"inputs": {"question": "q"}}').replace(b"\r\n{", b";ext=1\r\n{", 1)[:-2]
            + b"X-Trailer: 1\r\n\r\n",
        ),
        200,
    ),
    "http/1.0": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON).replace(b"HTTP/1.1", b"HTTP/1.0"),), 200),
    "http/1.0 keep-alive": (
        (
            _post(V1, b'{"inputs": {"question": "q"}}', JSON, "Connection: keep-alive").replace(
                b"1.1", b"1.0", 1
            ),
        ),
        200,
    ),
    "connection close": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON, "Connection: close"),), 200),
    "label": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON, "X-Request-ID: my-label-1"),), 200),
    "huge header": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON, "X-Big: " + "a" * 12_000),), 200),
    "no cache": ((_post(V1, b'{"inputs": {"question": "q"}}', JSON, "Cache-Control: no-cache"),), 200),
    "415 and declared too large": ((_post(V1, b"", "Content-Type: text/plain", length=99_999),), 415),
    "json suffix type": ((_post(V1, b'{"inputs": {}}', "Content-Type: application/vnd.api+json"),), 415),
    "utf-16": ((_post(V1, '{"inputs": {"question": "q"}}'.encode("utf-16"), JSON),), 400),
}


async def _exchange(port: int, segments: tuple[bytes, ...]) -> tuple[int, dict[str, str], Any, bool]:
    """Send the segments (a short pause between them), read one answer, then, unless it closes the
    connection, a ``/health`` on the same connection. Returns the answer without its varying parts,
    and whether the connection served the ``/health``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for index, segment in enumerate(segments):
            if index:
                await trio.sleep(0.05)
            await stream.send_all(segment)
        [(status, headers, body)] = await read_responses(stream, 1)
        reused = False
        if headers.get("connection") != "close":
            await stream.send_all(f"GET /health HTTP/1.1\r\nHost: {RAW_HOST}\r\n\r\n".encode())
            [(health, _, _)] = await read_responses(stream, 1)
            assert health == 200
            reused = True
    assert int(headers.pop("content-length")) == len(body)  # varies with the ids and times
    kept = {name: value for name, value in headers.items() if name not in VARYING_HEADERS}
    answer = json.loads(body)
    if isinstance(answer, dict):
        answer = {key: value for key, value in answer.items() if key not in VARYING_FIELDS}
    return status, kept, answer, reused


@asynccontextmanager
async def _server(lm: CountingLM | None = None) -> AsyncIterator[Server]:
    service = settings(max_body_bytes=MAX_BODY, max_input_chars=200)
    async with running(service, lms={"default": lm or CountingLM(first_token_delay=0.0)}) as server:
        yield server


@asynccontextmanager
async def _quart_counted(patch: pytest.MonkeyPatch) -> AsyncIterator[list[str]]:
    """The paths Quart dispatched while the block ran."""
    dispatched: list[str] = []
    original: Callable[..., Any] = ServiceApp.dispatch_request

    async def counted(self: ServiceApp, *args: Any) -> Any:
        from quart import request

        if request.path != "/health":  # the follow-up on a reused connection
            dispatched.append(request.path)
        return await original(self, *args)

    patch.setattr(ServiceApp, "dispatch_request", counted)
    yield dispatched


async def test_every_request_is_answered_below_quart_exactly_as_quart_answers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _server() as server, _quart_counted(monkeypatch) as dispatched:
        port = _port(server.url)
        for name, (segments, status) in CASES.items():
            lean = await _exchange(port, segments)
            assert dispatched == [], (name, dispatched)  # answered below Quart
            monkeypatch.setattr(FrontDoor, "answers_below_quart", False)
            app = await _exchange(port, segments)
            monkeypatch.setattr(FrontDoor, "answers_below_quart", True)
            assert dispatched, name  # ... and by Quart
            dispatched.clear()
            assert lean[0] == status, (name, lean)
            assert lean == app, (name, lean, app)


async def test_a_body_that_never_comes_is_a_408_by_the_heads_deadline_both_ways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    head = _post(V1, b'{"inputs"', JSON, "X-Request-Timeout: 0.5", length=40)  # 31 bytes never come
    async with _server() as server:
        lean = await _exchange(_port(server.url), (head,))
        monkeypatch.setattr(FrontDoor, "answers_below_quart", False)
        app = await _exchange(_port(server.url), (head,))
    assert lean[0] == 408
    assert lean[2]["error"]["code"] == "body_timeout"
    assert lean == app


async def test_a_prediction_past_its_deadline_is_a_504_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    request = _post(V1, b'{"inputs": {"question": "q"}}', JSON, "X-Request-Timeout: 0.3")
    async with _server(CountingLM(first_token_delay=60.0)) as server:
        lean = await _exchange(_port(server.url), (request,))
        monkeypatch.setattr(FrontDoor, "answers_below_quart", False)
        app = await _exchange(_port(server.url), (request,))
    assert lean[0] == 504
    assert lean == app


async def test_a_client_that_leaves_mid_prediction_cancels_it_below_quart() -> None:
    lm = CountingLM(first_token_delay=60.0)
    async with _server(lm) as server:
        engine = server.state.engine
        assert engine is not None
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        await stream.send_all(_post(V1, b'{"inputs": {"question": "q"}}', JSON))
        await wait_until(lambda: lm.started == 1, seconds=GUARD)
        await stream.aclose()
        await wait_until(lambda: engine.statistics().abandoned == 1, seconds=GUARD)
        assert lm.finished == 0
        assert engine.statistics().in_flight == 0


async def test_under_another_server_a_client_that_leaves_still_cancels_the_prediction() -> None:
    """Without the service's connections (no ``LEAVING`` extension in the scope), a task waits for the
    ``http.disconnect`` and cancels the prediction, as Quart-Trio's did."""
    from dspy_trio.web.app import create_app

    lm = CountingLM(first_token_delay=60.0)
    app = create_app(settings(), lms={"default": lm})
    body = b'{"inputs": {"question": "q"}}'
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": V1,
        "raw_path": V1.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", b"29")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "extensions": {},
    }
    left = trio.Event()
    sent: list[Any] = []

    async def receive() -> Any:
        if not sent and not left.is_set() and lm.started == 0:
            sent.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    async with app.test_app():
        engine = app.service.engine
        assert engine is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.asgi_app, scope, receive, send)
            await wait_until(lambda: lm.started == 1, seconds=GUARD)
            left.set()
        assert sent == ["body"]  # nothing answered: nobody is there
        assert engine.statistics().abandoned == 1
        assert lm.finished == 0


@pytest.mark.parametrize("below_quart", [True, False], ids=["lean", "quart"])
async def test_clients_that_send_a_prediction_and_leave_at_once_cancel_it_both_ways(
    below_quart: bool, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """The client is gone before the handler starts its prediction (the whole request and the close
    in one go): the connection told its stream before the handler watched for it, and the prediction
    must still be cancelled, as Quart's message task cancels it from the ``http.disconnect``."""
    monkeypatch.setattr(FrontDoor, "answers_below_quart", below_quart)
    lm = CountingLM(first_token_delay=30.0)
    clients = 10
    async with _server(lm) as server:
        engine = server.state.engine
        assert engine is not None
        before = tasks_living()
        for index in range(clients):
            stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
            await stream.send_all(_post(V1, b'{"inputs": {"question": "q%d"}}' % index, JSON))
            await stream.aclose()
        await wait_until(lambda: tasks_living() == before, seconds=600)  # virtual seconds: a hang guard
        statistics = engine.statistics()
        assert (statistics.succeeded, statistics.timed_out, lm.finished) == (0, 0, 0)
        assert trio.current_time() < 30.0  # none waited for its answer
