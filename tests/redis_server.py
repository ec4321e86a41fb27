"""A real ``redis-server`` (Debian's package) on an ephemeral port, for the cluster tests.

``redis_server`` is one server for the whole test session; tests isolate themselves with their own key
prefix. ``own_redis_server`` is a server of one test's own, for tests that stop, freeze or restart it.
Without ``redis-server`` on the machine these tests skip loudly (``make test`` installs it when it can).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

REDIS = shutil.which("redis-server")

needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (apt-get install redis-server; make test does it)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process without persistence; can be stopped, frozen and started again.

    Args:
        extra: More ``redis-server`` options (e.g. TLS ones); the plain port answers PING for the start.
    """

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        command = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += self.extra
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        limit = time.monotonic() + 10
        while time.monotonic() < limit:  # real time: waiting for another process to listen
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def freeze(self) -> None:
        """Stop answering without closing connections (SIGSTOP): a hung Redis."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; make test does it)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; make test does it)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.thaw()
        server.stop()


def prefix() -> str:
    """A key prefix of one test's own."""
    return f"test-{uuid.uuid4().hex[:10]}"


async def eventually(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Give real I/O (Redis replies, pub/sub messages) turns until ``condition`` holds; virtual time
    stands still meanwhile. Bounded by 10 s of real time."""
    limit = time.monotonic() + 10
    while time.monotonic() < limit:
        held = condition()
        if not isinstance(held, bool):
            held = await held
        if held:
            return
        await trio.lowlevel.checkpoint()
    raise AssertionError("the condition never held")


@asynccontextmanager
async def delaying_proxy(port: int, delay: float) -> AsyncIterator[int]:
    """A TCP proxy to 127.0.0.1:``port`` whose answers arrive ``delay`` seconds late (a slow Redis, or
    a far one); yields its own port. Runs on Trio's clock: use it with the real clock."""

    async def relay(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", port) as server:
            send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

            async def to_server() -> None:
                async for data in client:
                    await server.send_all(data)

            async def from_server() -> None:
                async with send:
                    async for data in server:
                        await send.send((trio.current_time() + delay, data))

            async def late_to_client() -> None:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await client.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_server)
                nursery.start_soon(from_server)
                nursery.start_soon(late_to_client)

    async def guarded(client: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await relay(client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, guarded, 0)
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


class Cut:
    """A TCP proxy to one Redis that can be cut (every connection closed, new ones refused) and mended:
    one process losing Redis while the others keep it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open = True
        self._relays: set[trio.CancelScope] = set()

    def cut(self) -> None:
        self.open = False
        for relay in self._relays:
            relay.cancel()

    def mend(self) -> None:
        self.open = True


@asynccontextmanager
async def cuttable_proxy(port: int) -> AsyncIterator[Cut]:
    """A :class:`Cut` proxy to 127.0.0.1:``port``; its ``port`` is the one to connect to."""
    cut = Cut(0)

    async def relay(client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            if not cut.open:
                await client.aclose()
                return
            cut._relays.add(scope)
            try:
                async with client, await trio.open_tcp_stream("127.0.0.1", port) as server:

                    async def pump(source: trio.SocketStream, target: trio.SocketStream) -> None:
                        async for data in source:
                            await target.send_all(data)
                        scope.cancel()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(pump, client, server)
                        nursery.start_soon(pump, server, client)
            finally:
                cut._relays.discard(scope)

    async def guarded(client: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await relay(client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, guarded, 0, host="127.0.0.1"))
        cut.port = int(listeners[0].socket.getsockname()[1])
        yield cut
        nursery.cancel_scope.cancel()
