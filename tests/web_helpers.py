"""Running the real service (Hypercorn on an ephemeral port) for tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import wsproto
import wsproto.events

from dspy_trio.engine import EngineConfig, LMConfig, SimulatedSettings
from dspy_trio.engine.lm import TrioLM
from dspy_trio.web.routing import Route
from dspy_trio.web.server import Server, open_server
from dspy_trio.web.settings import ServiceSettings

FAST = LMConfig(settings=SimulatedSettings(first_token_delay=0.0, token_delay=0.0))
# The raw-socket tests name the server "x" in Host: a server on loopback answers only the names it is
# told of besides localhost and its address (web/hosts.py, the DNS rebinding defence).
RAW_HOST = "x"


def settings(**changes: Any) -> ServiceSettings:
    engine = changes.pop("engine", None) or EngineConfig(lms={"default": FAST})
    changes.setdefault("allowed_hosts", (RAW_HOST,))
    return attrs.evolve(ServiceSettings(port=0), engine=engine, **changes)


@asynccontextmanager
async def running(
    service: ServiceSettings | None = None,
    *,
    lms: Mapping[str, TrioLM] | None = None,
    routes: Sequence[Route] | None = None,
) -> AsyncIterator[Server]:
    """The service on an ephemeral port for the block (``routes``: a route table other than the service's)."""
    async with open_server(service or settings(), lms=lms, routes=routes) as server:
        yield server


async def open_raw_websocket(
    port: int, path: str = "/v1/ws"
) -> tuple[trio.SocketStream, wsproto.WSConnection]:
    """A WebSocket handshake over a plain Trio socket (no client library between us and the socket)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(client.send(wsproto.events.Request(host="x", target=path)))
    with trio.fail_after(30):  # a hang guard
        while True:
            client.receive_data(await stream.receive_some(65536))
            for event in client.events():
                assert isinstance(event, wsproto.events.AcceptConnection), event
                return stream, client
