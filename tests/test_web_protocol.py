"""The HTTP/1.1 protocol of the service (web/protocol.py), attacked over raw sockets.

- HTTP/2 is refused on the cleartext port: the prior-knowledge preface gets a 505 and the connection
  closes, ``Upgrade: h2c`` is a plain HTTP/1.1 request (no 101). Before, Hypercorn switched to its h2
  protocol, whose ``KeyError`` on a DATA frame for an answered stream ended the whole server.
- RFC 9112's framing rules: a request with both ``Content-Length`` and ``Transfer-Encoding`` (the
  request-smuggling primitive), ``Transfer-Encoding`` in HTTP/1.0, or a version other than 1.x gets a
  4xx/5xx with a JSON body naming the problem, and the connection closes, so bytes the body's framing
  left over never run as a request. What h11 itself refuses (conflicting lengths, two Hosts, an
  unknown coding, a malformed line) is answered with a JSON body too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
import pytest
import trio
import trio.testing
from hypercorn.events import Event, RawData
from hypercorn.protocol.events import Body, EndBody, StreamClosed
from hypercorn.protocol.events import Response as Head

from .test_web_keepalive import _port
from .test_web_process import start
from .web_helpers import running, settings

PREDICT = b'{"question":"q"}'
GUARD = 30  # seconds: a hang guard only; every exchange here takes milliseconds

Response = tuple[int, dict[str, str], bytes]


def parse_responses(raw: bytes) -> list[Response]:
    """Every complete HTTP/1.1 response in ``raw`` (bodies framed by Content-Length; 1xx have none)."""
    responses = []
    while raw:
        head, separator, rest = raw.partition(b"\r\n\r\n")
        if not separator:
            break
        status_line, *lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3})(?: .*)?", status_line)
        assert match, f"not an HTTP/1.1 status line: {status_line!r}"
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        responses.append((int(match.group(1)), headers, rest[:length]))
        raw = rest[length:]
    return responses


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a close)."""
    received = b""
    with trio.fail_after(GUARD):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return received
            if not data:
                return received
            received += data


async def send_raw(port: int, *segments: bytes, pause: float = 0.0) -> bytes:
    """Send ``segments`` as separate writes (``pause`` seconds apart), then read until the server
    closes; writes the server no longer reads are ignored."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for segment in segments:
            try:
                await stream.send_all(segment)
            except trio.BrokenResourceError:
                break
            if pause:
                await trio.sleep(pause)
        return await read_until_closed(stream)


async def read_responses(stream: trio.SocketStream, count: int) -> list[Response]:
    """The next ``count`` complete responses from a connection that stays open (nothing else is sent)."""
    received = b""
    with trio.fail_after(GUARD):
        while len(responses := parse_responses(received)) < count or _incomplete(received, count):
            data = await stream.receive_some(65536)
            assert data, f"the server closed the connection after {parse_responses(received)}"
            received += data
    return responses


def _incomplete(raw: bytes, count: int) -> bool:
    """Whether the last of ``count`` responses in ``raw`` is still missing some of its body."""
    responses = parse_responses(raw)
    if len(responses) < count:
        return True
    _, headers, body = responses[count - 1]
    return len(body) < int(headers.get("content-length", "0"))


def request(method: str, path: str, *headers: str, body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_refused(raw: bytes, status: int, code: str) -> dict[str, object]:
    """``raw`` is exactly one response: ``status``, ``Connection: close``, a JSON error naming ``code``."""
    responses = parse_responses(raw)
    assert len(responses) == 1, responses
    [(got, headers, body)] = responses
    assert got == status, (got, body)
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    error: dict[str, object] = json.loads(body)["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def assert_still_serving(port: int) -> None:
    """A plain HTTP/1.1 prediction on a fresh connection gets its answer."""
    raw = await send_raw(
        port,
        request(
            "POST",
            "/predict",
            "Host: x",
            "Content-Type: application/json",
            f"Content-Length: {len(PREDICT)}",
            "Connection: close",
            body=PREDICT,
        ),
    )
    [(status, _, body)] = parse_responses(raw)
    assert status == 200, body
    assert json.loads(body)["answer"]


# --- HTTP/2 cleartext ----------------------------------------------------------------------------------


def _h2_client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return client


def _h2_post_head(length: int) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":path", "/predict"),
        (":scheme", "http"),
        (":authority", "x"),
        ("content-type", "application/json"),
        ("content-length", str(length)),
    ]


async def _h2_attack(port: int, body_length: int, data: bytes) -> bytes:
    """The attack that ended the process: an h2c prior-knowledge connection, a POST head whose body is
    too large (the app answers 413 at once), then a DATA frame for the answered stream. Returns every
    byte the server sent; the steps after a refusal are sent anyway (the server may ignore them)."""
    client = _h2_client()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    async with stream:
        try:
            await stream.send_all(client.data_to_send())
            client.send_headers(1, _h2_post_head(body_length))
            await stream.send_all(client.data_to_send())
            with trio.move_on_after(0.5):  # the early answer, when the server speaks h2
                while data_in := await stream.receive_some(65536):
                    received += data_in
                    try:
                        events = client.receive_data(data_in)
                    except h2.exceptions.ProtocolError:
                        break  # not HTTP/2: the refusal
                    if any(isinstance(event, h2.events.StreamEnded) for event in events):
                        break
            sent = 0
            while sent < len(data):  # within the flow-control window, in frames of 16 KiB
                window = min(client.local_flow_control_window(1), client.max_outbound_frame_size)
                if window <= 0:
                    break
                client.send_data(1, data[sent : sent + window])
                sent += window
                await stream.send_all(client.data_to_send())
        except (trio.BrokenResourceError, h2.exceptions.ProtocolError):
            pass
        return received + await read_until_closed(stream)


async def test_h2c_prior_knowledge_is_refused_and_an_early_answer_then_data_no_longer_ends_the_server() -> (
    None
):
    async with running(settings(api_keys=("k",))) as server:
        port = _port(server.url)
        received = await _h2_attack(port, body_length=2_000_000, data=b"x" * 1000)
        await assert_still_serving_with_key(port)
        error = assert_refused(received, 505, "http2_not_supported")
        assert "HTTP/1.1" in str(error["message"])


async def assert_still_serving_with_key(port: int) -> None:
    raw = await send_raw(port, request("GET", "/health", "Host: x", "Connection: close"))
    assert parse_responses(raw)[0][:1] == (200,)


async def test_a_2_mib_h2c_post_leaves_the_server_serving() -> None:
    async with running() as server:
        port = _port(server.url)
        received = await _h2_attack(port, body_length=2 << 20, data=b"x" * (2 << 20))
        await assert_still_serving(port)
        assert_refused(received, 505, "http2_not_supported")


async def test_the_preface_in_single_bytes_is_refused_the_same_way() -> None:
    async with running() as server:
        port = _port(server.url)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        received = await send_raw(port, *(preface[i : i + 1] for i in range(len(preface))), pause=0.001)
        assert_refused(received, 505, "http2_not_supported")
        await assert_still_serving(port)


async def test_upgrade_h2c_is_answered_as_plain_http11_and_the_connection_is_reused() -> None:
    upgrade = (
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    )
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            await stream.send_all(request("GET", "/health", "Host: x", *upgrade))
            [(status, headers, body)] = await read_responses(stream, 1)
            assert (status, body) == (200, b"OK")
            assert "upgrade" not in headers
            # the same connection again: an Upgrade: h2c POST with a body, then a plain request
            await stream.send_all(
                request(
                    "POST",
                    "/predict",
                    "Host: x",
                    *upgrade,
                    "Content-Type: application/json",
                    f"Content-Length: {len(PREDICT)}",
                    body=PREDICT,
                )
            )
            [(status, _, body)] = await read_responses(stream, 1)
            assert status == 200
            assert json.loads(body)["answer"]
            await stream.send_all(request("GET", "/health", "Host: x"))
            assert (await read_responses(stream, 1))[0][0] == 200


async def test_other_http_versions_are_refused_with_505() -> None:
    async with running() as server:
        port = _port(server.url)
        for version in ("2.0", "3.0", "0.9"):
            received = await send_raw(port, request("GET", "/health", "Host: x", version=version))
            assert_refused(received, 505, "http_version_not_supported")
        await assert_still_serving(port)


# --- framing (RFC 9112 section 6) ----------------------------------------------------------------------

# The second request hides in the body as Content-Length counts it; chunked framing ends the body at once.
SMUGGLED = request("GET", "/health", "Host: x")
_BODY = b"0\r\n\r\n" + SMUGGLED
CL_TE = request(
    "POST",
    "/predict",
    "Host: x",
    "Content-Type: application/json",
    f"Content-Length: {len(_BODY)}",
    "Transfer-Encoding: chunked",
    body=_BODY,
)


async def test_content_length_with_chunked_is_refused_and_the_hidden_request_never_runs() -> None:
    async with running() as server:
        port = _port(server.url)
        received = await send_raw(port, CL_TE)  # exactly one answer: no second response for SMUGGLED
        error = assert_refused(received, 400, "ambiguous_message_framing")
        assert "Content-Length" in str(error["message"])
        assert "Transfer-Encoding" in str(error["message"])
        await assert_still_serving(port)


@pytest.mark.parametrize("split", ["bytes", "head_then_body", "in_a_header_name"])
async def test_content_length_with_chunked_in_split_segments_is_refused_the_same_way(split: str) -> None:
    if split == "bytes":
        segments = [CL_TE[i : i + 1] for i in range(len(CL_TE))]
    elif split == "head_then_body":
        head_end = CL_TE.index(b"\r\n\r\n") + 4
        segments = [CL_TE[:head_end], CL_TE[head_end:]]
    else:
        cut = CL_TE.index(b"Transfer-Enc") + len(b"Transfer-Enc")
        segments = [CL_TE[:cut], CL_TE[cut:]]
    async with running() as server:
        received = await send_raw(_port(server.url), *segments, pause=0.001)
        assert_refused(received, 400, "ambiguous_message_framing")


async def test_a_pipelined_good_request_is_answered_before_the_ambiguous_one_is_refused() -> None:
    good = request("GET", "/health", "Host: x")
    async with running() as server:
        received = await send_raw(_port(server.url), good + CL_TE + good)
    first, second, *rest = parse_responses(received)
    assert first[0] == 200
    assert not rest  # nothing after the refusal: the third request was never read
    assert_refused(received[received.index(b"HTTP/1.1 400") :], 400, "ambiguous_message_framing")
    assert second[0] == 400


async def test_expect_100_continue_with_ambiguous_framing_gets_the_refusal_not_a_continue() -> None:
    head = request(
        "POST",
        "/predict",
        "Host: x",
        "Expect: 100-continue",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
    )
    async with running() as server:
        received = await send_raw(_port(server.url), head)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert_refused(received, 400, "ambiguous_message_framing")


async def test_a_websocket_handshake_with_ambiguous_framing_is_refused() -> None:
    head = request(
        "GET",
        "/v1/ws",
        "Host: x",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
    )
    async with running() as server:
        received = await send_raw(_port(server.url), head + b"0\r\n\r\n")
    assert_refused(received, 400, "ambiguous_message_framing")


async def test_transfer_encoding_in_http_10_is_refused() -> None:
    head = request(
        "POST", "/predict", "Host: x", "Transfer-Encoding: chunked", version="1.0", body=b"0\r\n\r\n"
    )
    async with running() as server:
        received = await send_raw(_port(server.url), head + SMUGGLED)
    assert_refused(received, 400, "ambiguous_message_framing")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (("Content-Length: 5", "Content-Length: 6"), 400),
        (("Content-Length: 5, 6",), 400),
        (("Content-Length: -5",), 400),
        (("Transfer-Encoding: gzip",), 501),
        (("Transfer-Encoding: gzip, chunked",), 501),
        (("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 501),
        (("Host: y",), 400),  # a second Host
        (("Content-Length : 5",), 400),  # whitespace before the colon
        (("X-A: a\rb",), 400),  # a bare CR
    ],
)
async def test_what_h11_refuses_gets_a_json_error_and_a_close(headers: tuple[str, ...], status: int) -> None:
    async with running() as server:
        port = _port(server.url)
        received = await send_raw(port, request("POST", "/predict", "Host: x", *headers, body=b"hello"))
        error = assert_refused(received, status, "malformed_request")
        assert "HTTP/1.1" in str(error["message"])
        await assert_still_serving(port)


async def test_a_repeated_identical_content_length_is_one_length_and_the_connection_stays_usable() -> None:
    """RFC 9112 section 6.3 lets a recipient take repeated identical values as one (h11 does)."""
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            length = f"Content-Length: {len(PREDICT)}"
            head = ("Host: x", "Content-Type: application/json", length, length)
            await stream.send_all(request("POST", "/predict", *head, body=PREDICT))
            await stream.send_all(request("GET", "/health", "Host: x"))
            first, second = await read_responses(stream, 2)
            assert first[0] == second[0] == 200


async def test_the_served_process_survives_the_h2c_attack_and_exits_0_on_sigterm() -> None:
    """As reported: `dspy-trio serve` exited 1 after one such connection, with everything in flight."""
    process, [url] = await start("--port", "0", env={"LM_PROVIDER": "simulated"})
    try:
        port = _port(url)
        for _ in range(3):
            await _h2_attack(port, body_length=2_000_000, data=b"x" * 1000)
        await assert_still_serving(port)
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(GUARD):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()


# --- WebSocket handshakes on the HTTP/1.1 connection ---------------------------------------------------

_WS_UPGRADE = ("Upgrade: websocket", "Connection: Upgrade")
_WS_KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
_WS_VERSION = "Sec-WebSocket-Version: 13"
WS_HANDSHAKE = (*_WS_UPGRADE, _WS_KEY, _WS_VERSION)


def assert_one_json_refusal(raw: bytes, statuses: tuple[int, ...]) -> dict[str, object]:
    """``raw`` is one response and nothing after it: a status in ``statuses``, ``Connection: close``, a
    JSON error naming its problem."""
    responses = parse_responses(raw)
    assert len(responses) == 1, raw
    [(status, headers, body)] = responses
    assert status in statuses, (status, raw)
    assert headers.get("connection", "").lower() == "close", raw
    assert raw.index(b"\r\n\r\n") + 4 + len(body) == len(raw), f"bytes after the answer: {raw!r}"
    error: dict[str, object] = json.loads(body)["error"]
    assert isinstance(error["code"], str)
    assert error["message"]
    return error


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ((_WS_KEY,), "1.1"),
        ((_WS_KEY, "Sec-WebSocket-Version: 8"), "1.1"),
        ((_WS_VERSION,), "1.1"),
        ((_WS_KEY, _WS_VERSION), "1.0"),
    ],
    ids=["no_version", "version_8", "no_key", "http_1_0"],
)
async def test_an_invalid_websocket_handshake_gets_a_json_refusal_and_the_connection_closes(
    autojump_clock: trio.testing.MockClock, headers: tuple[str, ...], version: str
) -> None:
    async with running(settings(keep_alive_timeout=5.0)) as server:
        head = request("GET", "/v1/ws", "Host: x", *_WS_UPGRADE, *headers, version=version)
        received = await send_raw(_port(server.url), head)  # the hang guard is virtual time here
    assert_one_json_refusal(received, (400, 426))


@pytest.mark.parametrize(
    "framing",
    [("Content-Length: 5",), ("Transfer-Encoding: chunked",)],
    ids=["content_length", "chunked"],
)
async def test_a_websocket_handshake_with_a_body_gets_one_json_refusal_and_nothing_after_it(
    caplog: pytest.LogCaptureFixture, framing: tuple[str, ...]
) -> None:
    caplog.set_level(logging.WARNING)
    body = b"hello" if "Content-Length: 5" in framing else b"5\r\nhello\r\n0\r\n\r\n"
    async with running() as server:
        head = request("GET", "/v1/ws", "Host: x", *WS_HANDSHAKE, *framing, body=body)
        received = await send_raw(_port(server.url), head)
        await trio.sleep(0.1)  # the server's side of the exchange ends
    assert_one_json_refusal(received, (400,))
    assert server_errors(caplog) == []


async def _refused_handshake_then_health(port: int, how: str) -> tuple[bytes, bytes]:
    """A WebSocket handshake the app refuses (401), and a plain request on the same connection: after
    the refusal was read (``after_the_answer``), in the same write (``pipelined``), or after an earlier
    request on the connection (``after_a_request``). Returns (everything up to the refusal, the rest)."""
    refused = request("GET", "/v1/ws", "Host: x", *WS_HANDSHAKE)
    health = request("GET", "/health", "Host: x")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if how == "pipelined":
            await stream.send_all(refused + health)
        elif how == "after_a_request":
            await stream.send_all(health + refused + health)
        else:
            await stream.send_all(refused)
        received = b""
        with trio.fail_after(GUARD):
            while b"}}" not in received:  # the end of the refusal's JSON body
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
        if how == "after_the_answer":
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(health)
        return received, await read_until_closed(stream)


@pytest.mark.parametrize("how", ["after_the_answer", "pipelined", "after_a_request"])
async def test_a_refused_websocket_handshake_on_a_kept_alive_connection_is_answered_and_closes_cleanly(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(settings(api_keys=("k",))) as server:
        first, rest = await _refused_handshake_then_health(_port(server.url), how)
        await trio.sleep(0.1)  # the server's side of the exchange ends
    responses = parse_responses(first)
    if how == "after_a_request":
        assert responses[0][0] == 200
        responses = responses[1:]
    status, headers, body = responses[0]
    assert status == 401, first
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    if headers.get("connection", "").lower() == "close":
        assert rest == b""  # the server said it closes, and closed
    else:
        # or the connection serves the next request
        assert [got for got, _, _ in parse_responses(rest)] == [200], (headers, rest)
    assert server_errors(caplog) == []


def _client_text_frame(text: str) -> bytes:
    """One masked WebSocket text frame, as a client sends it (payloads under 126 bytes)."""
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_a_frame_sent_with_the_handshake_is_the_websockets_first_frame() -> None:
    """The handshake's connection stays h11's until the app accepts it; what the client wrote after its
    handshake waits in h11's buffer and, after the 101, is the socket's first frame, not lost."""
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            await stream.send_all(request("GET", "/ws", "Host: x", *WS_HANDSHAKE) + _client_text_frame("q"))
            received = b""
            with trio.fail_after(GUARD):
                while b"[DONE]" not in received:
                    data = await stream.receive_some(65536)
                    assert data, received
                    received += data
    assert received.startswith(b"HTTP/1.1 101 "), received
    assert b"x-server-request-id: " in received.partition(b"\r\n\r\n")[0]


# --- bytes the client should not have sent --------------------------------------------------------------

_CLOSE_POST = request(
    "POST",
    "/predict",
    "Host: x",
    "Content-Type: application/json",
    f"Content-Length: {len(PREDICT)}",
    "Connection: close",
    body=PREDICT,
)
_HTTP_10_POST = request(
    "POST",
    "/predict",
    "Host: x",
    "Content-Type: application/json",
    f"Content-Length: {len(PREDICT)}",
    body=PREDICT,
    version="1.0",
)


@pytest.mark.parametrize(
    "segments",
    [
        (_CLOSE_POST + b"\r\n",),
        (_HTTP_10_POST + b"\r\n",),
        (_CLOSE_POST + request("GET", "/health", "Host: x"),),
    ],
    ids=["close_then_crlf", "http_1_0_then_crlf", "close_then_a_request"],
)
async def test_bytes_after_a_request_that_closes_the_connection_never_replace_its_answer(
    segments: tuple[bytes, ...],
) -> None:
    async with running() as server:
        received = await send_raw(_port(server.url), *segments)
    [(status, _, body)] = parse_responses(received)  # one answer, then the close; the rest is ignored
    assert status == 200, body
    assert json.loads(body)["answer"]


async def test_an_empty_line_before_a_request_line_is_ignored() -> None:
    health = request("GET", "/health", "Host: x")
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            await stream.send_all(b"\r\n" + health)
            await stream.send_all(_CLOSE_POST[: -len(PREDICT)].replace(b"Connection: close\r\n", b""))
            await stream.send_all(PREDICT + b"\r\n" + health)  # a stray CRLF after a body (old clients)
            statuses = [status for status, _, _ in await read_responses(stream, 3)]
    assert statuses == [200, 200, 200]


@pytest.mark.parametrize(
    "segments",
    [
        (b"\r", b"\n"),  # an empty line split between two reads
        (b"\n\r\n\n",),  # several, bare LFs among them (RFC 9112 section 2.2 lets a recipient take LF alone)
    ],
    ids=["split_crlf", "several_and_bare_lf"],
)
async def test_empty_lines_before_a_request_line_are_skipped_however_they_arrive(
    segments: tuple[bytes, ...],
) -> None:
    health = request("GET", "/health", "Host: x", "Connection: close")
    async with running() as server:
        received = await send_raw(_port(server.url), *segments, health, pause=0.05)
    [(status, _, _)] = parse_responses(received)
    assert status == 200


async def test_a_bare_cr_before_a_request_line_is_still_refused() -> None:
    async with running() as server:
        raw = await send_raw(_port(server.url), b"\r" + request("GET", "/health", "Host: x"))
    assert_refused(raw, 400, "malformed_request")


# -- one write per answer of known length --------------------------------------------------------------


def _protocol_after(request: bytes) -> tuple[Any, list[Event]]:
    """Our protocol with ``request`` received and parsed (h11 ready to answer it), and the events it
    sends to its connection."""
    from hypercorn.config import Config

    from dspy_trio.web.protocol import HTTP11Protocol

    sent: list[Event] = []

    async def send(event: Event) -> None:
        sent.append(event)

    from hypercorn.trio.worker_context import WorkerContext

    protocol = HTTP11Protocol(None, Config(), WorkerContext(None), None, None, False, None, None, send)
    protocol.connection.receive_data(request)
    while protocol.connection.next_event() is not h11.NEED_DATA:
        pass
    return protocol, sent


async def test_an_answer_of_known_length_is_one_write_head_and_body_together() -> None:
    protocol, sent = _protocol_after(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await protocol.stream_send(Head(stream_id=1, headers=[(b"content-length", b"5")], status_code=200))
    assert sent == []  # the head waits for its body
    await protocol.stream_send(Body(stream_id=1, data=b"hello"))
    await protocol.stream_send(EndBody(stream_id=1))  # frames nothing: no write at all
    [write] = sent
    assert isinstance(write, RawData)
    head, _, body = write.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 5" in head.lower()
    assert body == b"hello"
    assert protocol.connection.our_state is h11.DONE


async def test_an_empty_answer_of_known_length_goes_with_its_end() -> None:
    protocol, sent = _protocol_after(b"HEAD /p HTTP/1.1\r\nHost: x\r\n\r\n")
    await protocol.stream_send(Head(stream_id=1, headers=[(b"content-length", b"0")], status_code=204))
    await protocol.stream_send(EndBody(stream_id=1))
    [write] = sent
    assert isinstance(write, RawData)
    assert write.data.startswith(b"HTTP/1.1 204 ")


async def test_a_streamed_answer_sends_its_head_at_once_and_each_chunk_as_it_comes() -> None:
    protocol, sent = _protocol_after(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    headers = [(b"content-type", b"text/event-stream")]
    await protocol.stream_send(Head(stream_id=1, headers=headers, status_code=200))
    [head] = sent
    assert isinstance(head, RawData)
    assert b"transfer-encoding: chunked" in head.data.lower()
    await protocol.stream_send(Body(stream_id=1, data=b"data: 1\n\n"))
    await protocol.stream_send(EndBody(stream_id=1))
    assert [event.data for event in sent[1:]] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]  # type: ignore[attr-defined]


async def test_a_head_whose_body_never_comes_still_goes_out_before_the_stream_closes() -> None:
    protocol, sent = _protocol_after(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")

    class _Recycled(Exception):
        pass

    async def recycle() -> None:  # Hypercorn's reaction to StreamClosed: not this test's subject
        raise _Recycled

    protocol._maybe_recycle = recycle  # type: ignore[method-assign]
    await protocol.stream_send(Head(stream_id=1, headers=[(b"content-length", b"5")], status_code=200))
    with pytest.raises(_Recycled):
        await protocol.stream_send(StreamClosed(stream_id=1))
    [write] = sent
    assert isinstance(write, RawData)
    assert write.data.startswith(b"HTTP/1.1 200 ")
