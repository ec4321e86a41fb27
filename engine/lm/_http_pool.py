"""A set of ``httpx.AsyncClient`` shards that share one connection budget.

httpcore 1.0's connection pool re-examines every connection for every queued request on each request
start and end, and counts idle connections with a list built per connection: its bookkeeping costs
O(connections²) per event. At 500 concurrent requests on one client that bookkeeping alone took ~10 s
of CPU (measured: 500 predictions against a 200 ms upstream took 10 s instead of 0.3 s). Splitting the
budget over shards of at most ``SHARD_SIZE`` connections keeps every pool small, so the cost stays
linear in the number of requests. Each call leases the least busy shard for its whole duration.

httpcore notices that the server closed a kept-alive connection only when the pool is next used; until
then the socket sits in CLOSE-WAIT (after one load test, 102 of them did). :meth:`ClientShards.reap`
closes such connections, and the backends' ``maintain`` task calls it every few seconds. It uses only
httpcore's public connection interface (``connections``, ``is_idle``, ``has_expired``, ``aclose``); the
one private step is reaching the pool inside ``httpx.AsyncHTTPTransport`` (``_pool``), which a test over
real sockets checks.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
import trio

from ._http_errors import status_error, transport_errors
from ._sse import SSEParser
from ._transport._protocol import encode_body

# Connections per shard: small enough that httpcore's quadratic bookkeeping is cheap (at 32 the pool
# still took a fifth of the CPU), large enough that keep-alive reuse stays high.
SHARD_SIZE = 16

_JSON = {"content-type": "application/json"}


class ClientShards:
    """``httpx.AsyncClient`` shards with ``max_connections`` connections in total.

    Args:
        max_connections: The connection budget, split evenly across shards.
        make_client: Builds one shard given its connection limit.
    """

    def __init__(
        self,
        max_connections: int,
        make_client: Callable[[int], tuple[httpx.AsyncClient, httpx.AsyncBaseTransport]],
    ) -> None:
        count = max(1, math.ceil(max_connections / SHARD_SIZE))
        per_shard = max(1, math.ceil(max_connections / count))
        made = [make_client(per_shard) for _ in range(count)]
        self._clients = [client for client, _ in made]
        self._pools = [pool for _, transport in made if (pool := _pool_of(transport)) is not None]
        self._busy = [0] * count

    def __len__(self) -> int:
        return len(self._clients)

    @contextmanager
    def lease(self) -> Iterator[httpx.AsyncClient]:
        """The least busy shard, counted as busy until the block ends."""
        index = min(range(len(self._busy)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            yield self._clients[index]
        finally:
            self._busy[index] -= 1

    async def post_json(self, model: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST ``body`` as JSON and return the response. Blocks for the whole response.

        Raises:
            UpstreamError: a transport failure, or an error status (mapped by :func:`status_error`).
        """
        content = encode_body(model, body)
        with transport_errors(model), self.lease() as client:
            response = await client.post(path, content=content, headers=_JSON)
        if response.status_code >= 400:
            raise status_error(model, response.status_code, response.headers, response.text)
        return response

    async def post_sse(
        self, model: str, path: str, body: dict[str, Any], on_event: Callable[[str, str], Awaitable[None]]
    ) -> None:
        """POST ``body`` and hand each Server-Sent Event of the response, ``(event, data)``, to ``on_event``
        as it arrives, reading the next line only after ``on_event`` returns (so a slow consumer pauses
        the socket). Blocks until the body ends.

        Raises:
            UpstreamError: a transport failure, or an error status.
        """
        content = encode_body(model, body)
        with transport_errors(model), self.lease() as client:
            async with client.stream("POST", path, content=content, headers=_JSON) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise status_error(model, response.status_code, response.headers, response.text)
                parser = SSEParser()
                async for line in response.aiter_lines():
                    if (event := parser.feed(line)) is not None:
                        await on_event(*event)

    async def reap(self) -> int:
        """Close the idle connections whose server closed them (or whose keep-alive expired); returns
        how many. Blocks only for the closes."""
        reaped = 0
        for pool in self._pools:
            for connection in list(pool.connections):
                if connection.is_idle() and connection.has_expired():
                    await connection.aclose()  # marks it closed at once; the pool drops it on next use
                    reaped += 1
        return reaped

    async def reap_forever(
        self, interval: float | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call :meth:`reap` every ``interval`` seconds until cancelled (returns at once when there is
        nothing to reap: no interval, or no pool of real connections)."""
        task_status.started()
        if interval is None or not self._pools:
            return
        while True:
            await trio.sleep(interval)
            await self.reap()

    async def aclose(self) -> None:
        """Close every shard's connections."""
        for client in self._clients:
            await client.aclose()


def _pool_of(transport: httpx.AsyncBaseTransport) -> httpcore.AsyncConnectionPool | None:
    pool = getattr(transport, "_pool", None)
    return pool if isinstance(pool, httpcore.AsyncConnectionPool) else None
