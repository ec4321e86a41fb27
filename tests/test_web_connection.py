"""One served connection (web/connection.py): a peer that is gone gives its file descriptor back at
once, not at the next WebSocket ping, and accepted sockets ask the kernel to find silent dead peers."""

from __future__ import annotations

import gc
import os
import socket
import struct

import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from hypercorn.config import Config
from hypercorn.events import Updated
from hypercorn.trio.worker_context import WorkerContext
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from dspy_trio.engine import ConfigError
from dspy_trio.web.connection import Connection
from dspy_trio.web.settings import ServiceSettings

from .helpers import CountingLM, tasks_living, wait_until
from .test_web_keepalive import _port
from .test_web_protocol import GUARD, _incomplete, parse_responses
from .web_helpers import open_raw_websocket, running, settings

PREDICT_FRAME = '{"id":"a","type":"predict","inputs":{"question":"q"}}'


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def reset(stream: trio.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that vanished with data unread does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def wait_for_descriptors(at_most: int) -> None:
    # a hang guard: the old code held them for the ping interval (600 s)
    await wait_until(lambda: open_descriptors() <= at_most, seconds=GUARD)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
async def test_websockets_reset_with_answers_unread_give_descriptors_back_before_the_next_ping() -> None:
    async with running(settings(ws_ping_interval=600.0)) as server:
        gc.collect()  # descriptors of earlier tests' garbage are not counted in ``before``
        before = open_descriptors()
        sockets: list[tuple[trio.SocketStream, wsproto.WSConnection]] = []
        try:
            for _ in range(50):
                sockets.append(await open_raw_websocket(_port(server.url)))
            for stream, client in sockets:
                await stream.send_all(client.send(wsproto.events.TextMessage(PREDICT_FRAME)))
            await trio.sleep(0.2)  # the answers arrive and stay unread
            assert open_descriptors() >= before + 100  # ours and the server's
        finally:  # a failure above must not leave 50 sockets to the next test's garbage collection
            for stream, _ in sockets:
                reset(stream)
        await wait_for_descriptors(before)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("close_frame", [True, False], ids=["close_frame_then_fin", "fin_only"])
async def test_websockets_closed_by_the_client_give_descriptors_back_before_the_next_ping(
    close_frame: bool,
) -> None:
    """A client that ends with a close frame was always let go at once; one that only closes its TCP
    side (FIN, no close frame) was held until the next ping."""
    async with running(settings(ws_ping_interval=600.0)) as server:
        before = open_descriptors()
        for _ in range(20):
            stream, client = await open_raw_websocket(_port(server.url))
            if close_frame:
                await stream.send_all(client.send(wsproto.events.CloseConnection(code=1000)))
            await stream.aclose()
        await wait_for_descriptors(before)


def _server_side_of(client: trio.SocketStream) -> socket.socket:
    """The server's socket of ``client``'s connection (the server runs in this process)."""
    local, remote = client.socket.getsockname(), client.socket.getpeername()
    for name in os.listdir("/proc/self/fd"):
        try:
            candidate = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if candidate.getsockname() == remote and candidate.getpeername() == local:
                return candidate
        except OSError:
            pass
        candidate.close()
    raise AssertionError("no server socket for this connection")


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux TCP options")
async def test_accepted_sockets_carry_tcp_keepalive_and_a_user_timeout_from_the_settings() -> None:
    async with running(settings(dead_peer_timeout=12.0)) as server:
        client = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with client:
            await client.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200")
            with _server_side_of(client) as accepted:
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 6
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_000


def test_the_dead_peer_settings_come_from_the_environment_and_zero_turns_them_off() -> None:
    defaults = ServiceSettings.from_env({})
    assert (defaults.ws_ping_interval, defaults.dead_peer_timeout) == (20.0, 30.0)
    ping, dead = "DSPY_TRIO_WS_PING_INTERVAL", "DSPY_TRIO_DEAD_PEER_TIMEOUT"
    chosen = ServiceSettings.from_env({ping: "5", dead: "12"})
    assert (chosen.ws_ping_interval, chosen.dead_peer_timeout) == (5.0, 12.0)
    off = ServiceSettings.from_env({ping: "0", dead: "0"})
    assert (off.ws_ping_interval, off.dead_peer_timeout) == (None, None)


async def test_a_dead_peer_timeout_too_large_for_the_kernel_never_breaks_the_connections() -> None:
    try:
        service = settings(dead_peer_timeout=1e12)
    except ConfigError:
        return  # refused where it is set: fine too
    async with running(service) as server:
        client = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with client:
            await client.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(GUARD):
                assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200")


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux TCP options")
async def test_a_long_dead_peer_timeout_still_sets_the_user_timeout() -> None:
    async with running(settings(dead_peer_timeout=70_000.0)) as server:
        client = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with client:
            await client.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200")
            with _server_side_of(client) as accepted:
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 70_000_000
                assert 0 < accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) <= 32767


# -- the keep-alive timer: one per connection, its deadline moved by each request ------------------------

_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
_SLOW = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
    b'{"question": "q"}'
)


async def _answered(stream: trio.SocketStream, request: bytes) -> bytes:
    await stream.send_all(request)
    received = b""
    while _incomplete(received, 1):  # no hang guard of real time: virtual time jumps here
        data = await stream.receive_some(65536)
        assert data, "closed instead of answering"
        received += data
    return received


async def _closed(stream: trio.SocketStream) -> None:
    with trio.fail_after(3600):  # virtual seconds: a hang guard
        while await stream.receive_some(65536):
            pass


async def test_an_idle_connection_closes_keep_alive_timeout_after_its_last_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(settings(keep_alive_timeout=5.0)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            for _ in range(3):  # each request moves the deadline: 4 s apart, none of them is cut
                await _answered(stream, _HEALTH)
                await trio.sleep(4.0)
            await _answered(stream, _HEALTH)
            last = trio.current_time()
            await _closed(stream)
            assert trio.current_time() - last == pytest.approx(5.0)


async def test_a_request_longer_than_the_keep_alive_timeout_is_not_cut_by_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with running(settings(keep_alive_timeout=5.0), lms={"default": lm}) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            sent = trio.current_time()
            [(status, _, _)] = parse_responses(await _answered(stream, _SLOW))
            assert status == 200
            assert trio.current_time() - sent == pytest.approx(30.0, abs=0.1)
            answered = trio.current_time()
            await _closed(stream)  # and the timer starts again once it is answered
            assert trio.current_time() - answered == pytest.approx(5.0)


async def test_a_connection_the_client_closed_leaves_no_timer_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(settings(keep_alive_timeout=600.0)) as server:
        before = tasks_living()
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        await _answered(stream, _HEALTH)
        await stream.aclose()
        closed = trio.current_time()
        await wait_until(lambda: tasks_living() == before, seconds=60)
        assert trio.current_time() - closed < 1  # not the 600 s keep-alive timeout


async def test_stopping_the_server_closes_its_idle_connections_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(settings(keep_alive_timeout=600.0)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            await _answered(stream, _HEALTH)
            server.shutdown()
            stopping = trio.current_time()
            await _closed(stream)
            assert trio.current_time() - stopping < 1


# -- the keep-alive timer's semantics, as a property -----------------------------------------------------

_KEEP_ALIVE = 5.0
# Idle gaps and request durations; a gap of exactly the keep-alive timeout makes the request arrive in the
# very instant the timer runs out (both orders of that race are explored).
_GAPS = st.sampled_from([0.0, 1.0, 2.5, _KEEP_ALIVE, 7.0])
_BUSY = st.sampled_from([0.0, 1.0, 12.0])


@given(
    st.lists(st.tuples(_GAPS, _BUSY), max_size=6),
    st.sampled_from(["waits", "leaves", "server stops"]),
    st.random_module(),  # seeds Trio's scheduler: each order of the tasks woken together
)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_keep_alive_timer_closes_a_connection_exactly_when_it_has_been_idle_for_the_timeout(
    requests: list[tuple[float, float]], end: str, scheduler: object
) -> None:
    """Requests come after idle gaps and last a while (the connection tells its timer, as the protocol
    does, with ``Updated``); then the client waits, leaves, or the server stops. The timer closes the
    connection once, at the first instant it has been idle for ``keep_alive_timeout`` (or at once when
    the server stops while it is idle), never during a request, never after the client left. A request
    that comes in the very instant the timer runs out may be refused (closed) or served, but the timer
    must go on with the connection's next idle time."""
    closes: list[float] = []
    ties: list[float] = []  # instants where the close races a request

    async def main() -> float | None:
        left, right = trio.socket.socketpair()
        context = WorkerContext(None)
        connection = Connection(
            None,  # type: ignore[arg-type]  # the timer never calls the app
            Config.from_mapping(keep_alive_timeout=_KEEP_ALIVE),
            context,
            {},
            trio.SocketStream(left),
        )

        async def close() -> None:
            closes.append(trio.current_time())

        connection._initiate_server_close = close  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._close_when_idle)
            idle_since = 0.0
            expected: float | None = None
            for gap, busy in requests:
                if gap > _KEEP_ALIVE:
                    expected = idle_since + _KEEP_ALIVE
                    break
                await trio.sleep(gap)
                if gap == _KEEP_ALIVE:
                    ties.append(trio.current_time())
                if closes:
                    break
                await connection.protocol_send(Updated(idle=False))
                await trio.sleep(busy)
                await connection.protocol_send(Updated(idle=True))
                idle_since = trio.current_time()
            else:
                if end == "leaves":
                    connection._end_idle_timer()  # what the read loop does at the client's EOF
                elif end == "server stops":
                    await context.terminated.set()
                    expected = trio.current_time()
                else:
                    expected = idle_since + _KEEP_ALIVE
            await trio.sleep(10 * _KEEP_ALIVE)
            assert not nursery.child_tasks  # the timer ended: it closed the connection, or the client left
        left.close()
        right.close()
        return expected

    expected = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if closes and closes[0] in ties:
        return  # the race was lost by the request: closing then is allowed
    assert closes == ([] if expected is None else [expected])
