"""One served connection (web/connection.py): a peer that is gone gives its file descriptor back at
once, not at the next WebSocket ping, and accepted sockets ask the kernel to find silent dead peers."""

from __future__ import annotations

import gc
import os
import socket
import struct

import pytest
import trio
import wsproto
import wsproto.events

from dspy_trio.engine import ConfigError
from dspy_trio.web.settings import ServiceSettings

from .helpers import wait_until
from .test_web_keepalive import _port
from .test_web_protocol import GUARD
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
