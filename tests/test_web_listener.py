"""The accept loop and the connection guard (web/listener.py), and their rate-limited log
(web/rate_limited_log.py): one connection's failure never ends the server, a cancel is never swallowed,
and repeated failures (a crashing connection, EMFILE at accept) cost one log line per interval."""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from hypercorn.events import Event, RawData
from hypercorn.protocol.h11 import H11Protocol

from dspy_trio.engine import EngineConfig, LMConfig
from dspy_trio.web.listener import accept_connections, serve_app, serve_connection
from dspy_trio.web.rate_limited_log import RateLimitedLog
from dspy_trio.web.server import hypercorn_config

from .helpers import CountingLM, wait_until
from .test_web_connection import _server_side_of
from .test_web_keepalive import _port, _read_response
from .test_web_process import start
from .test_web_protocol import (
    GUARD,
    assert_still_serving,
    assert_still_serving_with_key,
    parse_responses,
    read_responses,
    read_until_closed,
)
from .test_web_rate_limited_log import occurrences
from .web_helpers import open_raw_websocket, running, settings

# --- the connection guard -------------------------------------------------------------------------------


class Fatal(BaseException):
    """Not an Exception: must never be caught by the guard."""


def _failing(action: str, after: float) -> Callable[[Any], Awaitable[None]]:
    async def handler(stream: Any) -> None:
        if action == "raise_in_finally":  # a careless handler that turns a cancel into an error
            try:
                await trio.sleep(after)
            finally:
                raise KeyError("in finally")
        await trio.sleep(after)
        if action == "raise":
            raise KeyError(1)
        if action == "raise_group":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                raise ValueError("in a nursery")
        if action == "fatal":
            raise Fatal

    return handler


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(
    action=st.sampled_from(["return", "raise", "raise_group", "raise_in_finally", "fatal"]),
    ends_at=st.integers(min_value=1, max_value=5),
    cancel_at=st.sampled_from([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, math.inf]),
)
def test_the_guard_logs_failures_closes_the_stream_and_never_swallows_a_cancel(
    action: str, ends_at: int, cancel_at: float
) -> None:
    async def main() -> None:
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        log = logging.getLogger("test.guard")
        log.addHandler(handler)
        log.propagate = False
        client, server_side = trio.testing.memory_stream_pair()
        reached = False
        fatal = False
        try:
            with trio.CancelScope(deadline=cancel_at) as outer:
                await serve_connection(_failing(action, ends_at), server_side, RateLimitedLog(log))
                reached = True
        except Fatal:
            fatal = True
        finally:
            log.removeHandler(handler)
        cancelled_first = cancel_at < ends_at
        # a cancel before the handler ended is never swallowed, whatever the handler raised
        assert reached is (not cancelled_first and action != "fatal")
        assert outer.cancelled_caught is cancelled_first
        assert fatal is (action == "fatal" and not cancelled_first)
        failed = action in {"raise", "raise_group"} and not cancelled_first
        failed = failed or action == "raise_in_finally"
        assert len(records) == int(failed)
        if failed:
            assert "failed and was closed" in records[0].getMessage()
        with pytest.raises(trio.ClosedResourceError):  # the stream was closed by the guard
            await server_side.send_all(b"x")
        del client

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_handler_that_fails_is_logged_and_closed_and_the_listener_serves_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if await stream.receive_some(100) == b"boom":
            raise KeyError(1)
        await stream.send_all(b"served")

    problems = RateLimitedLog(logging.getLogger("dspy_trio.web"), interval=10.0)
    async with trio.open_nursery() as nursery:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        nursery.start_soon(accept_connections, listener, handler, nursery, problems)
        with trio.fail_after(GUARD):
            for _ in range(5):
                boom = await trio.open_tcp_stream("127.0.0.1", port)
                async with boom:
                    await boom.send_all(b"boom")
                    assert await read_until_closed(boom) == b""  # closed by the guard
            fine = await trio.open_tcp_stream("127.0.0.1", port)
            async with fine:
                await fine.send_all(b"hello")
                assert await read_until_closed(fine) == b"served"
        nursery.cancel_scope.cancel()
    assert occurrences(caplog.records, "failed and was closed: KeyError: 1") == [1]  # 4 more: counted


class _Capacity:
    """A listener whose accept always fails with EMFILE, counting the attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        self.attempts += 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> _Capacity:
        return self

    async def __aexit__(self, *args: object) -> None:
        pass


async def test_emfile_at_accept_is_one_line_per_interval_with_a_count_and_no_traceback(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """trio.serve_listeners (Hypercorn's accept loop) logs a traceback every 0.1 s: 350 here."""
    listener = _Capacity()
    problems = RateLimitedLog(logging.getLogger("dspy_trio.web"), interval=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(problems.run)
        nursery.start_soon(accept_connections, listener, None, nursery, problems)  # type: ignore[arg-type]
        await trio.sleep(35)
        nursery.cancel_scope.cancel()
    counts = occurrences(caplog.records, "cannot accept connections: EMFILE")
    assert len(counts) == 5  # at 0 s, 10 s, 20 s, 30 s, and the rest when serving ended
    assert sum(counts) == listener.attempts
    assert not any(record.exc_info for record in caplog.records)


def _set_fd_limit(pid: int, soft: int) -> int:
    """Set the soft descriptor limit of process ``pid``; returns the one it had."""
    before, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    return int(before)


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")
async def test_a_server_at_its_descriptor_limit_logs_a_line_not_a_traceback_every_tenth_of_a_second() -> None:
    process, [url] = await start("--port", "0", env={"LM_PROVIDER": "simulated"})
    assert process.stderr is not None
    stderr = process.stderr
    port = _port(url)
    held: list[trio.SocketStream] = []
    log = bytearray()
    started = time.monotonic()

    async def read_log() -> None:
        while chunk := await stderr.receive_some(65536):
            log.extend(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            original = _set_fd_limit(process.pid, len(os.listdir(f"/proc/{process.pid}/fd")) + 3)
            for _ in range(8):  # 3 get a descriptor, the rest wait in the backlog while accept fails
                held.append(await trio.open_tcp_stream("127.0.0.1", port))
            await wait_until(lambda: b"EMFILE" in log, seconds=GUARD)
            await trio.sleep(1.5)  # about 15 more failed accepts
            for stream in held:
                await stream.aclose()
            held.clear()
            _set_fd_limit(process.pid, original)
            await assert_still_serving(port)  # served again once descriptors are free
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(GUARD):
                await process.wait()
    finally:
        for stream in held:
            await stream.aclose()
        if process.returncode is None:
            process.kill()
    text = log.decode()
    accept_lines = [line for line in text.splitlines() if "EMFILE" in line]
    # the first at once, one per 10 s interval (a loaded machine may stretch the test), then the count
    # when serving ended; trio's accept loop wrote a traceback every 0.1 s
    assert 1 <= len(accept_lines) <= 2 + (time.monotonic() - started) // 10, text
    assert "Traceback" not in text


# --- the served app -------------------------------------------------------------------------------------


async def test_a_protocol_that_raises_closes_its_connection_only_and_is_logged_once_per_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Any bug in the connection code (here injected: the protocol raises on a marker) ends that
    connection, not the server: requests in flight on other connections finish."""
    original = H11Protocol.handle

    async def handle(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and b"BOOM" in event.data:
            raise KeyError("injected")
        await original(self, event)

    monkeypatch.setattr(H11Protocol, "handle", handle)
    lm = CountingLM(first_token_delay=0.5)
    async with running(settings(), lms={"default": lm}) as server, trio.open_nursery() as nursery:
        port = _port(server.url)
        answers: list[int] = []

        async def in_flight() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                body = b'{"question":"q"}'
                head = [("Host", "x"), ("Content-Type", "application/json"), ("Content-Length", "16")]
                await stream.send_all(
                    (conn.send(h11.Request(method="POST", target="/predict", headers=head)) or b"")
                    + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
                answers.append((await _read_response(stream, conn))[0])

        nursery.start_soon(in_flight)
        await wait_until(lambda: lm.started == 1, seconds=GUARD)
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /BOOM HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await read_until_closed(stream) == b""
        await assert_still_serving(port)
        await wait_until(lambda: answers == [200], seconds=GUARD)
    counts = occurrences(caplog.records, "KeyError: 'injected'")
    assert sum(counts) == 20
    assert len(counts) <= 2  # one at once; the rest in one line when serving ended


async def test_graceful_shutdown_with_connections_open_lets_the_request_in_flight_finish() -> None:
    """Shutdown while a prediction is in flight, a keep-alive connection idles and a WebSocket is open:
    the prediction is answered, the idle connection and the WebSocket are closed, serving ends."""
    lm = CountingLM(first_token_delay=0.5)
    engine = EngineConfig(lms={"default": LMConfig()}, drain_timeout=GUARD)
    results: list[int] = []
    async with running(settings(engine=engine), lms={"default": lm}) as server:
        port = _port(server.url)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await idle.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        websocket, _ = await open_raw_websocket(port)
        async with idle, websocket, trio.open_nursery() as nursery:

            async def predict() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(
                        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b'Content-Length: 16\r\n\r\n{"question":"q"}'
                    )
                    results.extend(status for status, _, _ in await read_responses(stream, 1))

            nursery.start_soon(predict)
            await wait_until(lambda: lm.started == 1, seconds=GUARD)
            server.shutdown()
            await wait_until(lambda: results == [200], seconds=GUARD)
            # the idle connection had its answer, and is closed by the shutdown
            assert [status for status, _, _ in parse_responses(await read_until_closed(idle))] == [200]
            await read_until_closed(websocket)  # closed by the shutdown (after the graceful timeout)
    assert lm.finished == 1


async def test_tls_is_refused_before_anything_starts() -> None:
    config = hypercorn_config(settings())
    config.certfile, config.keyfile = "cert.pem", "key.pem"
    with pytest.raises(ValueError, match="TLS-terminating proxy"):
        await serve_app(object(), config)


async def test_a_client_that_stops_reading_cannot_hold_up_the_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_leaves = 1000.0  # virtual seconds after the shutdown began
    pipelined = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 500  # many MB of answers
    async with trio.open_nursery() as nursery:
        async with running(settings(dead_peer_timeout=None)) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await stream.send_all(pipelined)  # and never read
            await trio.sleep(1)  # the server writes until the socket buffers are full
            began = trio.current_time()

            async def leave_later() -> None:
                try:
                    await trio.sleep(client_leaves)
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:  # also when the test ends first: the client's socket is never left to the GC
                    stream.socket.close()

            nursery.start_soon(leave_later)
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    # graceful_timeout (1 s) bounds the flushing of the last answers; the client had not left yet
    assert took < client_leaves, took
    assert took <= 2.0, took


async def test_a_websocket_client_that_pings_and_never_reads_cannot_hold_up_the_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The pongs are written by the connection's reader task itself: once they fill the socket, no task
    of the connection is left unshielded, so only a deadline on the write itself ends it."""
    client_leaves = 1000.0  # virtual seconds after the shutdown began
    async with trio.open_nursery() as nursery:
        async with running(settings(dead_peer_timeout=None)) as server:
            stream, client = await open_raw_websocket(_port(server.url))
            with _server_side_of(stream) as accepted:  # small buffers: a few hundred pongs fill them
                accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            pings = client.send(wsproto.events.Ping(b"p" * 125)) * 1000

            async def ping_and_leave_later() -> None:
                try:
                    with trio.move_on_after(client_leaves):
                        while True:  # blocks once the server stops reading, until the server closes
                            await stream.send_all(pings)
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except trio.BrokenResourceError:
                    pass  # closed by the server's shutdown
                finally:
                    stream.socket.close()

            nursery.start_soon(ping_and_leave_later)
            await trio.sleep(1)  # the server answers pongs until the socket buffers are full
            began = trio.current_time()
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert took <= 2.0, took  # graceful_timeout (1 s), not the client's leaving


async def test_hostile_connections_cannot_flood_the_log_with_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    handshake = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    hostile = [
        f"GET /v1/ws HTTP/1.1\r\nHost: x\r\n{handshake}\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n{handshake}\r\n",
        f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n{handshake}Content-Length: 5\r\n\r\n"
        "hello",
    ]
    async with running(settings(api_keys=("k",))) as server:
        port = _port(server.url)
        for _ in range(10):
            for attack in hostile:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(attack.encode())
                    await read_until_closed(stream)
        await assert_still_serving_with_key(port)
    traced = [r for r in caplog.records if r.exc_info is not None]
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(traced) <= len(hostile), [f"{r.name}: {r.getMessage()}" for r in traced]
    assert len(lines) <= 2 * len(hostile), [f"{r.name}: {r.getMessage()}" for r in lines]
