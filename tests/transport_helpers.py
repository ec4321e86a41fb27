"""Raw Trio servers for the lean transport's tests: they answer with exactly the bytes a test writes."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import h11
import trio

Handler = Callable[[trio.abc.Stream, "RawServer"], Awaitable[None]]


@attrs.define
class RawServer:
    """What a raw server saw: connections accepted, requests read (h11 events), connections closed."""

    port: int = 0
    scheme: str = "http"
    connections: int = 0
    closed: int = 0
    requests: list[h11.Request] = attrs.field(factory=list)
    bodies: list[bytes] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/v1/"

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[RawServer], bool]) -> None:
        with trio.fail_after(60):  # a hang guard, not a bound
            while not predicate(self):
                await self.changed.wait()


async def read_request(stream: trio.abc.Stream, connection: h11.Connection, server: RawServer) -> bool:
    """Read one request (head and body) into ``server``; False when the client closed instead."""
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            server.requests.append(event)
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            server.bodies.append(body)
            server.notify()
            return True
        else:
            return False


async def wait_closed(stream: trio.abc.Stream) -> None:
    """Block until the client closes the connection (reading and dropping anything it sends)."""
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@asynccontextmanager
async def open_raw_server(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    """Serve ``handler(stream, server)`` for each connection on 127.0.0.1 (TLS with ``ssl_context``)."""
    server = RawServer(scheme="https" if ssl_context else "http")

    async def on_connection(stream: Any) -> None:
        server.connections += 1
        server.notify()
        try:
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
                await stream.do_handshake()
            await handler(stream, server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            server.closed += 1
            server.notify()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def keep_alive_handler(
    answer: Callable[[h11.Request, bytes], bytes],
) -> Handler:
    """A handler that answers each request on the connection with the raw bytes ``answer`` returns."""

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        while True:
            connection = h11.Connection(h11.SERVER)
            if not await read_request(stream, connection, server):
                return
            await stream.send_all(answer(server.requests[-1], server.bodies[-1]))

    return handle


def json_response(
    payload: bytes = b'{"ok": true}', *, extra: bytes = b"", status: bytes = b"200 OK"
) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(payload)).encode() + b"\r\n" + extra + b"\r\n" + payload
    )
