"""The lean HTTP/1.1 transport (engine/lm/_transport) over real sockets: framing, keep-alive, the pool,
timeouts, cancellation at every stage, error mapping."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing

from dspy_trio.engine import (
    InvalidInputError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from dspy_trio.engine.lm._transport import (
    ConnectError,
    ConnectTimeout,
    LeanClient,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    Timeouts,
    WriteTimeout,
)
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault, open_fake_upstream

from .helpers import HANG_GUARD, first_request_closed_by_client, wait_until
from .transport_helpers import (
    RawServer,
    json_response,
    keep_alive_handler,
    open_raw_server,
    read_request,
    wait_closed,
)

pytestmark = pytest.mark.network

BODY = {"model": "m", "messages": [{"role": "user", "content": "[[ ## question ## ]]\nWhat is Trio?"}]}


def idle_and_active(client: LeanClient) -> tuple[int, int]:
    stats = client.pool.statistics()
    return stats.active, stats.idle


async def test_keep_alive_reuses_one_connection(fake_upstream: FakeUpstream) -> None:
    client = LeanClient(fake_upstream.url + "/")
    for _ in range(3):
        response = await client.post_json("m", "chat/completions", BODY)
        assert response.json()["choices"][0]["message"]["content"].startswith("[[ ## answer ## ]]")
    assert client.pool.statistics().opened == 1
    assert idle_and_active(client) == (0, 1)
    assert [r.path for r in fake_upstream.records] == ["/v1/chat/completions"] * 3
    await client.aclose()
    assert idle_and_active(client) == (0, 0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()], ids=["nan", "inf", "object"])
async def test_a_body_json_cannot_carry_is_invalid_input_and_sends_nothing(
    fake_upstream: FakeUpstream, value: object
) -> None:
    """The same encoding, and the same typed error, as the httpx path (``encode_body``): no connection
    is taken and nothing reaches the upstream."""
    client = LeanClient(fake_upstream.url + "/")
    for call in (
        lambda: client.post_json("m", "chat/completions", {"temperature": value}),
        lambda: client.post_sse("m", "chat/completions", {"temperature": value}, _ignore_event),
    ):
        with pytest.raises(InvalidInputError, match="cannot be sent as JSON"):
            await call()
    assert client.pool.statistics().opened == 0
    assert fake_upstream.records == []
    await client.aclose()


async def _ignore_event(event: str, data: str) -> None:
    pass


async def test_request_is_one_send_with_the_expected_head() -> None:
    """The request goes out in one segment-sized write: head and JSON body together."""
    received: list[bytes] = []

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        received.append(bytes(await stream.receive_some(65536)))
        await stream.send_all(json_response())
        await wait_closed(stream)

    async with open_raw_server(handle) as server:
        client = LeanClient(server.url, {"Authorization": "Bearer k"})
        await client.post_json("m", "chat/completions", {"a": "é"})
        head, _, body = received[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        lines = head.lower().split(b"\r\n")
        assert b"authorization: bearer k" in lines
        assert b"content-type: application/json" in lines
        assert b"accept-encoding: gzip" not in lines
        assert json.loads(body) == {"a": "é"}
        client.close()


async def test_response_split_into_one_byte_segments_is_read_whole() -> None:
    payload = json.dumps({"choices": [{"message": {"content": "x" * 300}}]}).encode()

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        while await read_request(stream, h11.Connection(h11.SERVER), server):
            for byte in json_response(payload):
                await stream.send_all(bytes([byte]))
                await trio.lowlevel.checkpoint()

    async with open_raw_server(handle) as server:
        client = LeanClient(server.url)
        for _ in range(2):
            response = await client.post_json("m", "x", {})
            assert response.content == payload
        assert server.connections == 1
        client.close()


async def test_chunked_body_then_reuse() -> None:
    def answer(request: h11.Request, body: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
            b'5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
        )

    async with open_raw_server(keep_alive_handler(answer)) as server:
        client = LeanClient(server.url)
        assert (await client.post_json("m", "x", {})).json() == {"a": 1}
        assert (await client.post_json("m", "x", {})).json() == {"a": 1}
        assert server.connections == 1
        client.close()


@pytest.mark.parametrize(
    ("extra", "version"),
    [(b"connection: close\r\n", b"HTTP/1.1"), (b"", b"HTTP/1.0")],
    ids=["connection-close", "http-1.0"],
)
async def test_connection_close_and_http10_are_not_reused(extra: bytes, version: bytes) -> None:
    def answer(request: h11.Request, body: bytes) -> bytes:
        return json_response(extra=extra).replace(b"HTTP/1.1", version, 1)

    async with open_raw_server(keep_alive_handler(answer)) as server:
        client = LeanClient(server.url)
        await client.post_json("m", "x", {})
        await client.post_json("m", "x", {})
        assert server.connections == 2
        assert idle_and_active(client) == (0, 0)
        client.close()


async def test_connection_closed_by_the_peer_while_idle_is_discarded() -> None:
    """The server answers and then closes the keep-alive connection (no ``Connection: close``): the next
    request sees the EOF before using the connection, opens a new one, and succeeds."""

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(json_response())

    async with open_raw_server(handle) as server:
        client = LeanClient(server.url)
        await client.post_json("m", "x", {})
        await server.wait_for(lambda s: s.closed == 1)
        await wait_until(client.pool._idle[0].peer_gone)  # the FIN reached our socket
        await client.post_json("m", "x", {})
        assert server.connections == 2
        assert client.pool.statistics().opened == 2
        client.close()


async def test_idle_connections_expire_after_idle_timeout(mock_clock: trio.testing.MockClock) -> None:
    clock = mock_clock  # never moves unless jumped: real socket waits see no timeouts
    async with open_raw_server(keep_alive_handler(lambda r, b: json_response())) as server:
        client = LeanClient(server.url, idle_timeout=5.0)
        await client.post_json("m", "x", {})
        assert idle_and_active(client) == (0, 1)
        clock.jump(4.9)
        await client.post_json("m", "x", {})
        assert server.connections == 1
        clock.jump(5.0)
        await client.post_json("m", "x", {})
        assert server.connections == 2
        await server.wait_for(lambda s: s.closed == 1)  # the expired one was closed, not just dropped
        client.close()


async def test_early_close_mid_body_is_an_error_and_nothing_leaks() -> None:
    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(json_response(b'{"cut": "here and more"}')[:-10])

    async with open_raw_server(handle) as server:
        client = LeanClient(server.url)
        with pytest.raises(UpstreamConnectionError, match=r"broke HTTP/1\.1") as info:
            await client.post_json("m", "x", {})
        assert isinstance(info.value.__cause__, RemoteProtocolError)
        assert idle_and_active(client) == (0, 0)
        with pytest.raises(RemoteProtocolError, match=r"without a complete response|peer closed"):
            await client.request_json("x", b"{}")
        client.close()


async def test_close_before_any_response_is_a_protocol_error() -> None:
    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)

    async with open_raw_server(handle) as server:
        client = LeanClient(server.url)
        with pytest.raises(RemoteProtocolError):
            await client.request_json("x", b"{}")
        assert idle_and_active(client) == (0, 0)


async def test_error_statuses_map_and_keep_the_connection(
    fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The status and its meaning for the client; the provider's own words only in the log."""
    client = LeanClient(fake_upstream.url + "/")
    fake_upstream.add_faults(Fault("rate_limit", retry_after=2), Fault("server_error"))
    with pytest.raises(UpstreamRateLimitedError) as limited:
        await client.post_json("m", "chat/completions", BODY)
    assert limited.value.retry_after == 2
    with pytest.raises(UpstreamServerError, match=r"answered HTTP 500: it failed$") as failed:
        await client.post_json("m", "chat/completions", BODY)
    assert "fake" not in failed.value.message
    assert "fake server_error" in caplog.text
    await client.post_json("m", "chat/completions", BODY)
    assert client.pool.statistics().opened == 1
    client.close()


async def test_refused_connection_maps_to_connection_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        client = LeanClient(f"http://127.0.0.1:{port}/v1")
        with pytest.raises(ConnectError):
            await client.request_json("x", b"{}")
        with pytest.raises(UpstreamConnectionError, match=r"could not connect to the upstream$"):
            await client.post_json("m", "x", {})
        assert idle_and_active(client) == (0, 0)


async def test_gzip_only_when_asked_and_decoded() -> None:
    payload = gzip.compress(b'{"zipped": true}')

    def answer(request: h11.Request, body: bytes) -> bytes:
        asked = (b"accept-encoding", b"gzip") in list(request.headers)
        if not asked:
            return json_response(b'{"zipped": false}')
        return json_response(payload, extra=b"content-encoding: gzip\r\n")

    async with open_raw_server(keep_alive_handler(answer)) as server:
        plain = LeanClient(server.url)
        assert (await plain.post_json("m", "x", {})).json() == {"zipped": False}
        zipped = LeanClient(server.url, accept_gzip=True)
        assert (await zipped.post_json("m", "x", {})).json() == {"zipped": True}
        plain.close()
        zipped.close()


# --- timeouts on the virtual clock ------------------------------------------------------------------


async def hang(stream: trio.abc.Stream, server: RawServer) -> None:
    await read_request(stream, h11.Connection(h11.SERVER), server)
    await wait_closed(stream)


async def test_connect_timeout_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    """A listener whose accept queue is full drops new SYNs: the connect hangs until its timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        client = LeanClient(f"http://127.0.0.1:{port}/v1", timeouts=Timeouts(connect=4.0))
        started = trio.current_time()
        with pytest.raises(ConnectTimeout):
            await client.request_json("x", b"{}")
        assert trio.current_time() - started == 4.0
        with pytest.raises(UpstreamTimeoutError, match="no connection to the upstream in time"):
            await client.post_json("m", "x", {})
        assert idle_and_active(client) == (0, 0)
        for filler in fillers:
            filler.close()


async def test_read_timeout_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    async with open_raw_server(hang) as server:
        client = LeanClient(server.url, timeouts=Timeouts(read=7.0))
        started = trio.current_time()
        with pytest.raises(ReadTimeout):
            await client.request_json("x", b"{}")
        assert trio.current_time() - started == 7.0
        assert idle_and_active(client) == (0, 0)
        with pytest.raises(UpstreamTimeoutError, match="silent past the read timeout"):
            await client.post_json("m", "x", {})
        await server.wait_for(lambda s: s.closed == 2)


async def test_read_timeout_bounds_silence_not_the_whole_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Events 4 s apart under a 5 s read timeout: the 20 s stream completes."""

    async def slow_events(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for i in range(5):
            await trio.sleep(4)
            await stream.send_all(f"data: {i}\n\n".encode())
        await wait_closed(stream)

    async with open_raw_server(slow_events) as server:
        client = LeanClient(server.url, timeouts=Timeouts(read=5.0))
        seen: list[str] = []

        async def on_event(name: str, data: str) -> None:
            seen.append(data)

        started = trio.current_time()
        with pytest.raises(UpstreamTimeoutError):
            await client.post_sse("m", "x", {}, on_event)
        assert seen == ["0", "1", "2", "3", "4"]
        assert trio.current_time() - started == 25.0


async def test_write_timeout_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    async def never_read(stream: trio.abc.Stream, server: RawServer) -> None:
        server.notify()
        await trio.sleep_forever()

    async with open_raw_server(never_read) as server:
        client = LeanClient(server.url, timeouts=Timeouts(write=3.0))
        started = trio.current_time()
        with pytest.raises(WriteTimeout):
            await client.request_json("x", json.dumps({"big": "x" * 64_000_000}).encode())
        assert trio.current_time() - started == 3.0
        assert idle_and_active(client) == (0, 0)


async def test_pool_timeout_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    async with open_raw_server(hang) as server:
        client = LeanClient(server.url, max_connections=1, timeouts=Timeouts(pool=2.0, read=100.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.request_json, "first", b"{}")
            await server.wait_for(lambda s: len(s.requests) == 1)
            started = trio.current_time()
            with pytest.raises(PoolTimeout):
                await client.request_json("second", b"{}")
            assert trio.current_time() - started == 2.0
            nursery.cancel_scope.cancel()
        assert idle_and_active(client) == (0, 0)


# --- the pool ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 3])
async def test_pool_cap_and_fifo_waiters(cap: int) -> None:
    """At most ``max_connections`` connections; waiting requests get a connection in arrival order
    (with one connection, the server sees them in that order)."""
    release = trio.Event()
    in_flight = peak = 0

    async def held(stream: trio.abc.Stream, server: RawServer) -> None:
        nonlocal in_flight, peak
        while await read_request(stream, h11.Connection(h11.SERVER), server):
            in_flight += 1
            peak = max(peak, in_flight)
            await release.wait()
            in_flight -= 1
            await stream.send_all(json_response())

    async with open_raw_server(held) as server:
        client = LeanClient(server.url, max_connections=cap)
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(client.request_json, f"r{i}", b"{}")
                await trio.testing.wait_all_tasks_blocked()
            await server.wait_for(lambda s: len(s.requests) == cap)
            assert client.pool.statistics().waiting == 8 - cap
            assert repr(client.pool).endswith(f"[{cap} active, 0 idle, {8 - cap} waiting | {cap} opened]>")
            release.set()
        targets = [r.target for r in server.requests]
        assert sorted(targets) == [f"/v1/r{i}".encode() for i in range(8)]
        if cap == 1:
            assert targets == [f"/v1/r{i}".encode() for i in range(8)]
        assert server.connections == cap
        assert peak == cap
        assert idle_and_active(client) == (0, cap)
        client.close()


# --- cancellation at every stage (after httpcore's tests/test_cancellations.py) ------------------------


async def test_cancel_while_waiting_for_the_pool_leaves_it_consistent() -> None:
    async with open_raw_server(hang) as server:
        client = LeanClient(server.url, max_connections=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.request_json, "first", b"{}")
            await server.wait_for(lambda s: len(s.requests) == 1)
            with trio.move_on_after(0.01):
                await client.request_json("second", b"{}")
            assert client.pool.statistics() == client.pool.statistics().__class__(1, 0, 0, 1)
            nursery.cancel_scope.cancel()
        assert idle_and_active(client) == (0, 0)


async def test_cancel_while_sending_closes_the_connection() -> None:
    read_now = trio.Event()

    async def read_later(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_now.wait()
        await wait_closed(stream)

    async with open_raw_server(read_later) as server:
        client = LeanClient(server.url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.request_json, "x", json.dumps({"big": "x" * 64_000_000}).encode())
            await server.wait_for(lambda s: s.connections == 1)
            await trio.testing.wait_all_tasks_blocked()  # the client is blocked in send_all
            assert idle_and_active(client) == (1, 0)
            nursery.cancel_scope.cancel()
        assert idle_and_active(client) == (0, 0)
        read_now.set()
        await server.wait_for(lambda s: s.closed == 1)


async def test_cancel_while_waiting_for_the_answer_closes_upstream_at_once() -> None:
    async with open_fake_upstream(Behavior(latency=10)) as upstream:
        client = LeanClient(upstream.url + "/")
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                with trio.CancelScope() as scope:
                    calls.append(scope)
                    await client.post_json("m", "chat/completions", BODY)

            calls: list[trio.CancelScope] = []
            nursery.start_soon(call)
            await upstream.wait_for(lambda u: len(u.records) == 1)
            cancelled_at = trio.current_time()
            calls[0].cancel()
        await first_request_closed_by_client(upstream, cancelled_at)
        assert idle_and_active(client) == (0, 0)
        upstream.behavior.latency = 0
        await client.post_json("m", "chat/completions", BODY)  # the pool still works
        client.close()


async def test_cancel_mid_body_closes_the_connection() -> None:
    async def partial(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(json_response(b'{"a": "' + b"x" * 100 + b'"}')[:-20])
        await wait_closed(stream)

    async with open_raw_server(partial) as server:
        client = LeanClient(server.url)
        with trio.move_on_after(0.05):
            await client.request_json("x", b"{}")
        assert idle_and_active(client) == (0, 0)
        await server.wait_for(lambda s: s.closed == 1)


async def test_consumer_leaving_a_stream_closes_upstream_at_once() -> None:
    async with open_fake_upstream(Behavior(token_delay=0.01, words_per_field=2000)) as upstream:
        client = LeanClient(upstream.url + "/")
        events = 0
        left_at = 0.0

        async def on_event(name: str, data: str) -> None:
            nonlocal events, left_at
            events += 1
            if events == 3:
                left_at = trio.current_time()
                raise KeyError("consumer left")

        with pytest.raises(KeyError):
            await client.post_sse("m", "chat/completions", BODY | {"stream": True}, on_event)
        await first_request_closed_by_client(upstream, left_at)
        assert idle_and_active(client) == (0, 0)


async def test_sse_stream_reads_only_when_the_consumer_asks() -> None:
    """Backpressure: while ``on_event`` is blocked the socket is not read, so the server cannot write
    the whole body; once the consumer goes on, everything arrives in order."""
    total_events = 10_000  # 40 MB: far more than loopback socket buffers can hold (~10 MB)
    sent = 0

    async def firehose(stream: trio.abc.Stream, server: RawServer) -> None:
        nonlocal sent
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for i in range(total_events):
            await stream.send_all(f"data: {i:08d} {'y' * 4000}\r\n\r\n".encode())
            sent += 1
        await stream.send_all(b"data: [DONE]\n\n")  # and close: the body ends with the connection

    async with open_raw_server(firehose) as server:
        client = LeanClient(server.url, max_response_bytes=64 << 20)
        gate, first = trio.Event(), trio.Event()
        received: list[str] = []

        async def on_event(name: str, data: str) -> None:
            received.append(data)
            if len(received) == 1:
                first.set()
                await gate.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.post_sse, "m", "x", {}, on_event)
            with trio.fail_after(HANG_GUARD):
                await first.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the server is stuck in send_all
            assert len(received) == 1
            assert sent < total_events / 2  # the server is blocked on a full socket
            gate.set()
        assert len(received) == total_events + 1
        assert [int(d.split()[0]) for d in received[:-1]] == list(range(total_events))
        assert idle_and_active(client) == (0, 0)
        client.close()


async def test_reaper_closes_idle_connections_the_server_closed(mock_clock: trio.testing.MockClock) -> None:
    """A pool nobody uses: ``reap_forever`` closes, every interval, the idle connections whose server
    closed them (and those past ``idle_timeout``), so none lingers in CLOSE-WAIT."""
    close_now = trio.Event()

    async def answer_then_close_on_cue(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(json_response())
        await close_now.wait()

    async with open_raw_server(answer_then_close_on_cue) as server:
        client = LeanClient(server.url, idle_timeout=100.0)
        async with trio.open_nursery() as nursery:
            await client.post_json("m", "x", {})
            assert idle_and_active(client) == (0, 1)
            await nursery.start(client.reap_forever, 2.0)
            mock_clock.jump(2.0)
            await trio.testing.wait_all_tasks_blocked()
            assert idle_and_active(client) == (0, 1)  # alive: kept
            close_now.set()
            await server.wait_for(lambda s: s.closed == 1)
            await wait_until(client.pool._idle[0].peer_gone)
            mock_clock.jump(2.0)
            await trio.testing.wait_all_tasks_blocked()
            assert idle_and_active(client) == (0, 0)
            nursery.cancel_scope.cancel()
        assert await client.reap() == 0
        client.close()


async def test_slow_consumer_of_the_last_unterminated_sse_event_is_not_a_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The body ends (content-length) right after ``data: b`` with no blank line, which arrives in a
    read of its own: the transport dispatches that event at EndOfMessage. The consumer takes 10 s
    on every event under a 5 s read timeout; the read timeout bounds socket silence only, so both
    events must be consumed and the call must succeed (the final dispatch must not run under the
    deadline of the last read)."""
    body = b"data: a\n\ndata: b\n"

    async def answer(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body[:9]
        )
        await trio.sleep(1)
        await stream.send_all(body[9:])  # a read of its own, completing no event
        await wait_closed(stream)

    async with open_raw_server(answer) as server:
        client = LeanClient(server.url, timeouts=Timeouts(read=5.0))
        seen: list[tuple[str, float]] = []
        started = trio.current_time()

        async def slow_consumer(name: str, data: str) -> None:
            seen.append((data, trio.current_time() - started))
            await trio.sleep(10)

        failure: UpstreamTimeoutError | None = None
        try:
            await client.post_sse("m", "x", {}, slow_consumer)
        except UpstreamTimeoutError as exc:
            failure = exc
        finally:
            client.close()
        ended = trio.current_time() - started
    assert failure is None, f"the slow consumer was timed out as the upstream: {failure} (seen: {seen})"
    assert [data for data, _ in seen] == ["a", "b"]
    assert ended == 20.0


async def test_the_lean_transport_bounds_an_sse_line_as_it_bounds_a_body() -> None:
    """A broken upstream streams one SSE line that never ends. ``post_json`` refuses a body over its
    cap; ``post_sse`` bounds the line the same way (an unbounded line would grow memory without limit,
    at a quadratic CPU cost if re-split on every read). With the event cap at 1 MB, a 3 MB line is
    refused as a bad answer."""
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    async def endless_line(stream: trio.abc.Stream, server: RawServer) -> None:
        if not await read_request(stream, h11.Connection(h11.SERVER), server):
            return
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"5\r\ndata:\r\n")
        for _ in range(48):  # 3 MB, no newline
            await stream.send_all(chunk)
        await stream.send_all(b"0\r\n\r\n")
        await wait_closed(stream)

    received: list[int] = []

    async def on_event(event: str, data: str) -> None:
        received.append(len(data))

    async with open_raw_server(endless_line) as server:
        client = LeanClient(server.url, max_event_bytes=1 << 20)
        try:
            with trio.fail_after(30), pytest.raises(UpstreamResponseError):
                await client.post_sse("m", "chat/completions", {"stream": True}, on_event)
        finally:
            await client.aclose()
    assert received == []


async def test_a_response_head_that_never_ends_times_out(autojump_clock: trio.testing.MockClock) -> None:
    """The upstream sends its status line, then one header byte every 4 s, never the blank line. The
    read timeout (5 s) bounds the silence between reads, and h11 refuses a head only past 16 KiB: were
    that all, the call would wait about 16384 x 4 s = 18 hours of a never-finished head (with no
    request deadline, ``timeouts.attempt`` being off by default, forever). A head that has not ended
    within the read timeout fails the call."""

    async def trickling_head(stream: trio.abc.Stream, server: RawServer) -> None:
        if not await read_request(stream, h11.Connection(h11.SERVER), server):
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nx-slow: ")
        while True:
            await trio.sleep(4)
            await stream.send_all(b"a")

    async with open_raw_server(trickling_head) as server:
        client = LeanClient(server.url, timeouts=Timeouts(read=5.0))
        try:
            with trio.move_on_after(60) as waited, pytest.raises(UpstreamError):
                await client.post_json("m", "chat/completions", {})
            assert not waited.cancelled_caught, "still reading the head after 60 s (read timeout 5 s)"
        finally:
            await client.aclose()
