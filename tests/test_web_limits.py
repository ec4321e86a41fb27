"""The same input limits on every transport (HTTP, SSE, /ws, /v1/ws): size, nesting, input text, Unicode,
timeouts; a bad WebSocket frame gets an error frame and the socket and its other requests live on."""

from __future__ import annotations

import json
import math
from typing import Any

import h11
import httpx
import hypothesis
import pytest
import trio
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from dspy_trio.web.client import ServiceError, open_client
from dspy_trio.web.errors import HTTPError
from dspy_trio.web.limits import json_depth, parse_json

from .helpers import CountingLM, wait_until
from .web_helpers import running, settings

DEEP = "[" * 5000 + "]" * 5000


async def post(client: httpx.AsyncClient, path: str, content: bytes | str, **headers: str) -> httpx.Response:
    return await client.post(path, content=content, headers={"Content-Type": "application/json", **headers})


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert "Traceback" not in response.text
    return dict(error)


def test_json_depth_scans_without_recursion_and_skips_strings() -> None:
    assert json_depth(b"[" * 100_000) == 100_000
    assert json_depth(b'{"a": "[[[[", "b": [1, {"c": "\\"]["}]}') == 3
    assert json_depth(b"5") == 0
    assert json_depth(b"[" * 1_000_000, limit=32) == 33  # stops past the limit


def _depth_byte_by_byte(raw: bytes) -> int:
    """The reference: one pass over every byte, tracking strings and escapes."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


_JSON_STRINGS = st.lists(
    st.sampled_from([b"a", b"[", b"]", b"{", b"}", b"\\\\", b'\\"', b"\\n", b"\\u005b"]), max_size=6
).map(lambda parts: b'"' + b"".join(parts) + b'"')


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b"1", b":", b","]) | _JSON_STRINGS, max_size=40),
    st.sampled_from([b"", b'"', b'"\\', b'"ab[']),
)
def test_json_depth_agrees_with_a_byte_by_byte_scan(pieces: list[bytes], cut: bytes) -> None:
    """Brackets and strings with escapes, balanced or not, ending in the middle of a string or not (any
    JSON text, valid or cut short, has its backslashes inside strings): the prefilter changes nothing."""
    raw = b"".join(pieces) + cut
    assert json_depth(raw) == _depth_byte_by_byte(raw)


@pytest.mark.parametrize(
    "path", ["/predict", "/stream", "/v1/programs/default/predict", "/v1/programs/default/batch"]
)
async def test_deeply_nested_json_is_a_400_not_a_500(path: str, caplog: pytest.LogCaptureFixture) -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        assert_error(await post(client, path, DEEP), 400, "too_deeply_nested")
        nested_input = '{"inputs": {"question": ' + DEEP + "}}"
        assert_error(await post(client, path, nested_input), 400, "too_deeply_nested")
        assert (await client.get("/health")).text == "OK"
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"


async def test_small_input_problems_are_4xx_with_clear_messages() -> None:
    lm = CountingLM(first_token_delay=0.0)
    async with running(lms={"default": lm}) as server, httpx.AsyncClient(base_url=server.url) as client:
        surrogate = '{"question": "\\ud800"}'
        assert_error(await post(client, "/predict", surrogate), 422, "invalid_unicode")
        assert_error(await post(client, "/stream", surrogate), 422, "invalid_unicode")
        program = '{"inputs": {"question": "a\\udfffb"}}'
        assert_error(await post(client, "/v1/programs/default/predict", program), 422, "invalid_unicode")
        for timeout in ("true", '"5"', "1e999", "0"):
            body = '{"question": "q", "timeout_secs": ' + timeout + "}"
            error = assert_error(await post(client, "/predict", body), 422, "invalid_body")
            assert error["param"] == "timeout_secs"
        no_type = await client.post("/predict", content=b'{"question": "q"}')
        error = assert_error(no_type, 415, "unsupported_media_type")
        assert "Request" not in error["message"]  # no internal class names
        assert "application/json" in error["message"]
        not_object = assert_error(await post(client, "/predict", "[1]"), 422, "invalid_body")
        assert "Request" not in not_object["message"]
        wrong_method = await client.get("/predict")
        assert_error(wrong_method, 405, "method_not_allowed")
        assert wrong_method.headers["allow"] == "OPTIONS, POST"
        assert lm.started == 0


async def test_multiplexed_websocket_validates_frames_like_http_bodies() -> None:
    lm = CountingLM(first_token_delay=0.5)
    service = settings(max_body_bytes=20_000, max_input_chars=1000)
    async with (
        running(service, lms={"default": lm}) as server,
        open_client(server.url) as client,
        client.open_multiplexed() as ws,
    ):
        results: list[dict[str, Any]] = []

        async def in_flight() -> None:
            results.append(await ws.predict("default", {"question": "survives"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            await wait_until(lambda: lm.started == 1, seconds=math.inf)
            await ws.send_raw(DEEP)  # used to kill the socket with a RecursionError
            await ws.send_raw(
                json.dumps(
                    {"id": "n", "type": "predict", "inputs": {"question": json.loads("[" * 40 + "]" * 40)}}
                )
            )
            await ws.send_raw(
                json.dumps({"id": "big", "type": "predict", "inputs": {"question": "x" * 5000}})
            )
            await ws.send_raw(
                json.dumps({"id": "huge", "type": "predict", "inputs": {"question": "x" * 50_000}})
            )
            await ws.send_raw('{"id": "u", "type": "stream", "inputs": {"question": "\\ud800"}}')
            await ws.send_raw(
                json.dumps({"id": "t", "type": "predict", "inputs": {"question": "q"}, "timeout_secs": True})
            )
            await ws.send_raw(
                json.dumps({"id": "s", "type": "predict", "inputs": {"question": "q"}, "timeout_secs": "5"})
            )
            await ws.send_raw("")  # arrives as None in Quart-Trio (found by the fuzz test)
            await wait_until(lambda: len(ws.unrouted) == 8, seconds=math.inf)
        codes = [(frame["id"], frame["error"]["code"]) for frame in ws.unrouted]
        assert codes == [
            (None, "too_deeply_nested"),
            ("n", "too_deeply_nested"),  # refused before parsing: the id found by a bounded scan
            ("big", "input_too_large"),
            ("huge", "body_too_large"),
            ("u", "invalid_unicode"),
            ("t", "invalid_body"),
            ("s", "invalid_body"),
            (None, "bad_request"),
        ]
        assert results[0]["type"] == "result"  # the request in flight lived on
        assert lm.started == 1  # nothing bad went upstream
        assert (await ws.predict("default", {"question": "after"}))["type"] == "result"


async def test_frames_refused_before_parsing_keep_their_top_level_id() -> None:
    """A frame too large, too deep or not JSON is never parsed, yet its error frame carries its id, found
    by a bounded scan of its head: not fooled by nesting, escaped quotes or an "id" inside a string or a
    nested object; an id past the scanned head is not looked for (null). The socket lives on."""
    service = settings(max_body_bytes=20_000, max_json_depth=32)
    nested = "[" * 40 + "]" * 40
    text = "x" * 30_000
    frames: list[tuple[str | bytes, str | None, str]] = [
        ('{"a": ' + nested + ', "id": "deep-before", "type": "predict"}', "deep-before", "too_deeply_nested"),
        ('{"a": ' + "[" * 5000 + "]" * 5000 + ', "id": "far"}', None, "too_deeply_nested"),
        ('{"inputs": {"id": "inner", "q": ' + nested + '}, "type": "stream"}', None, "too_deeply_nested"),
        (
            json.dumps({"id": "big-first", "type": "predict", "inputs": {"question": text}}),
            "big-first",
            "body_too_large",
        ),
        (
            json.dumps({"type": "predict", "inputs": {"question": '"id": "fake" ' + text}}),
            None,
            "body_too_large",
        ),
        (
            json.dumps({"pad": '\\"' * 500, "id": "after-escapes", "q": text}),
            "after-escapes",
            "body_too_large",
        ),
        (json.dumps({"id": "binary", "q": text}).encode(), "binary", "body_too_large"),
        ('{"id": "broken", "type": "predict", ', "broken", "bad_request"),
        (
            b'{"id": "not-utf8", "q": "\xff\xfe"}',  # a binary frame that is not UTF-8
            "not-utf8",
            "bad_request",
        ),
    ]
    async with (
        running(service) as server,
        open_websocket_url(server.url.replace("http", "ws") + "/v1/ws") as ws,
    ):
        for frame, label, code in frames:
            await ws.send_message(frame)
            error = json.loads(await ws.get_message())
            assert (error["id"], error["type"], error["error"]["code"]) == (label, "error", code), frame[:80]
            ok = {"id": "ok", "type": "predict", "inputs": {"question": "still there?"}}
            await ws.send_message(json.dumps(ok))
            answer = json.loads(await ws.get_message())
            assert (answer["id"], answer["type"]) == ("ok", "result")


async def test_seed_websocket_applies_the_input_limits() -> None:
    lm = CountingLM(first_token_delay=0.0)
    async with running(settings(max_input_chars=1000), lms={"default": lm}) as server:
        async with open_websocket_url(server.url.replace("http", "ws") + "/ws") as ws:
            await ws.send_message("x" * 150_000)
            error = json.loads(await ws.get_message())
            assert error["error"]["code"] in ("input_too_large", "frame_too_large")
            assert await ws.get_message() == "[DONE]"
            await ws.send_message("a real question")
            frames = []
            while (frame := await ws.get_message()) != "[DONE]":
                frames.append(frame)
            assert frames
        assert lm.started == 1


async def test_client_raises_the_error_frame() -> None:
    async with (
        running(settings(max_input_chars=10)) as server,
        open_client(server.url) as client,
        client.open_multiplexed() as ws,
    ):
        with pytest.raises(ServiceError, match="input_too_large"):
            await ws.predict("default", {"question": "far too long a question"})


BAD_BODIES: list[tuple[bytes, int, str, str]] = [
    (b"{bad", 400, "bad_request", "not valid JSON: Expecting property name enclosed in double quotes"),
    (b"", 400, "bad_request", "the body is empty"),
    (b'{"question": "\xc3"}', 400, "bad_request", "not UTF-8: byte 0xc3 at position 14"),
    (b'{"question": "q"} {}', 400, "bad_request", "not valid JSON: Extra data at line 1, column 19"),
    (b"[" * 40 + b"]" * 40, 400, "too_deeply_nested", "nested deeper than 32 levels"),
    (b'"\\"id\\": [[[[' + b"[" * 40 + b'"', 422, "invalid_body", "a JSON object, got a string"),
    (b"null", 422, "invalid_body", "a JSON object, got null"),
    (b'{"question": ["q"]}', 422, "invalid_body", "question: Input should be a valid string"),
    (
        b'{"question": "q", "timeout_secs": -0.0}',
        422,
        "invalid_body",
        "timeout_secs: Input should be greater",
    ),
    (b'{"question": "\\ud800"}', 422, "invalid_unicode", "a lone surrogate at position 0"),
]


def _request(body: bytes, framing: str) -> list[bytes]:
    """``POST /predict`` with ``body``, as the pieces to send: framed by Content-Length (one piece, or a
    piece a byte) or chunked (a chunk a byte, with a chunk extension)."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if framing == "chunked":
        chunks = b"".join(b"1;ext=x\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
        return [head + b"Transfer-Encoding: chunked\r\n\r\n", chunks + b"0\r\n\r\n"]
    whole = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "bytewise":
        return [whole[i : i + 1] for i in range(len(whole))]
    return [whole]


@pytest.mark.parametrize("framing", ["whole", "bytewise", "chunked"])
async def test_bad_bodies_in_any_framing_get_their_4xx_and_the_connection_serves_on(framing: str) -> None:
    """Each bad body gets its status and a message naming the problem, and the same connection then
    answers a pipelined pair (a bad body and a good request sent in one write) in order."""
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            for body, status, code, says in BAD_BODIES:
                for piece in _request(body, framing):
                    await stream.send_all(piece)
                got, answer = await _response(stream, conn)
                error = json.loads(answer)["error"]
                assert (got, error["code"]) == (status, code), (body[:40], answer[:200])
                assert says in error["message"], (body[:40], error["message"])
            good = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            await stream.send_all(b"".join(_request(b"{bad", framing)) + good)
            assert (await _response(stream, conn))[0] == 400
            assert await _response(stream, conn) == (200, b"OK")


async def _response(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, bytes]:
    """The next response on the connection. The requests went out as raw bytes; h11 (client side) only
    parses, so it is told of a request it did not send."""
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status, body


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_body_in_another_unicode_encoding_is_refused_not_parsed_past_the_nesting_limit(
    encoding: str,
) -> None:
    deep = "[" * 100 + "]" * 100
    text = '{"inputs": {"question": ["\\"", ' + deep + "]}}"
    with pytest.raises(HTTPError) as refused:
        parse_json(text.encode("utf-8"), max_bytes=1 << 20, max_depth=32)
    assert refused.value.code == "too_deeply_nested"  # as UTF-8: refused
    with pytest.raises(HTTPError) as refused:
        parse_json(text.encode(encoding), max_bytes=1 << 20, max_depth=32)
    assert refused.value.status == 400


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-be"])
def test_a_body_in_another_unicode_encoding_is_told_to_be_utf_8(encoding: str) -> None:
    with pytest.raises(HTTPError) as refused:
        parse_json('{"question": "q"}'.encode(encoding), max_bytes=1 << 20, max_depth=32)
    assert (refused.value.status, refused.value.code) == (400, "bad_request")
    assert "UTF-8" in refused.value.message


def test_a_utf_8_body_may_start_with_a_byte_order_mark() -> None:
    """RFC 8259 section 8.1: a parser MAY ignore it; json.loads did, and so does parse_json."""
    body = b"\xef\xbb\xbf" + b'{"question": "q"}'
    assert parse_json(body, max_bytes=1 << 20, max_depth=32) == {"question": "q"}


@pytest.mark.parametrize("path", ["/predict", "/v1/programs/default/predict", "/v1/chat/completions", "/mcp"])
async def test_a_compressed_body_is_a_415_naming_the_encoding(path: str) -> None:
    """The service reads bodies as sent: a gzip body was read as its compressed bytes (a misleading
    "not UTF-8" 400), and one declared gzip but sent plain was accepted. Both are a 415 that names the
    encoding, and the connection serves on."""
    import gzip

    body = json.dumps({"question": "q", "model": "default", "messages": [{"role": "user", "content": "q"}]})
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "content-encoding": "gzip",
    }
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        for content in (gzip.compress(body.encode()), body.encode()):
            response = await client.post(path, content=content, headers=headers)
            error = assert_error(response, 415, "unsupported_content_encoding")
            assert "gzip" in error["message"]
        identity = {**headers, "content-encoding": "identity"}
        plain = b'{"question": "q"}'
        assert (await client.post("/predict", content=plain, headers=identity)).status_code == 200
