"""The httpx transport: ``httpx.AsyncClient`` shards that share one connection budget.

Used where the lean transport does not reach (``_choice``): an HTTP proxy, HTTP/2.

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

httpx's read timeout bounds each read, so a server that trickles its response head a byte at a time, or
sends ``100 Continue`` forever, would hold a call until its deadline. As on the lean transport, the whole
head must arrive within the read timeout of the request being sent: :class:`_HeadDeadline` learns
when the wait for the head begins and ends from httpcore's ``trace`` extension.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
import trio

from .._body import (
    MAX_EVENT_BYTES,
    MAX_RESPONSE_BYTES,
    BadResponse,
    BodyDecoder,
    check_content_type,
    content_coding,
)
from .._http_errors import status_error, transport_errors
from .._redact import Redactor
from .._sse import EventReader
from ._client import Response
from ._protocol import STREAM_END_GRACE, EventHandler, encode_body

# Connections per shard: small enough that httpcore's quadratic bookkeeping is cheap (at 32 the pool
# still took a fifth of the CPU), large enough that keep-alive reuse stays high.
SHARD_SIZE = 16

_JSON = {"content-type": "application/json"}
# The request headers every shard sends: httpx would ask for gzip and deflate (and br, zstd when their
# packages are installed) and inflate them without a bound; both transports ask for identity, and bound
# whatever comes (``_transport._body``).
REQUEST_HEADERS = {"accept-encoding": "identity"}


class ClientShards:
    """``httpx.AsyncClient`` shards with ``max_connections`` connections in total.

    Bodies are read raw and decoded by the same :class:`~dspy_trio.engine.lm._transport._body.BodyDecoder` and
    :class:`~dspy_trio.engine.lm._sse.EventReader` as the lean transport's, so the caps and the rules are one.

    Args:
        max_connections: The connection budget, split evenly across shards.
        make_client: Builds one shard given its connection limit.
        redact: Removes the credentials the shards send from text bound for the log.
        max_response_bytes: The most bytes an answer may have once decoded (a JSON body, a stream).
        max_event_bytes: The most one event of a stream may hold.
    """

    def __init__(
        self,
        max_connections: int,
        make_client: Callable[[int], tuple[httpx.AsyncClient, httpx.AsyncBaseTransport]],
        *,
        redact: Redactor | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.redact = redact or Redactor()
        self.max_response_bytes = max_response_bytes
        self.max_event_bytes = max_event_bytes
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

    async def post_json(self, model: str, path: str, body: dict[str, Any]) -> Response:
        """POST ``body`` as JSON and return the response. Blocks for the whole response.

        Raises:
            UpstreamError: a transport failure, an answer that cannot be taken, or an error status
                (mapped by :func:`status_error`).
        """
        content = encode_body(model, body)
        with transport_errors(model, self.redact), self.lease() as client:
            head = _HeadDeadline(client.timeout.read)
            with head.scope:
                async with client.stream(
                    "POST", path, content=content, headers=_JSON, extensions=head.extensions
                ) as response:
                    if response.status_code < 300:
                        check_content_type(response.headers.get("content-type"), stream=False)
                    data = await self._read(response)
                    answer = Response(response.status_code, dict(response.headers), data)
            head.check()
        if answer.status_code >= 400:
            raise status_error(model, answer.status_code, answer.headers, answer.text, self.redact)
        return answer

    async def _read(self, response: httpx.Response) -> bytes:
        """The whole body, decoded within the cap."""
        chunks: list[bytes] = []

        async def take(piece: bytes) -> None:
            chunks.append(piece)

        await self._each_piece(response, take)
        return b"".join(chunks)

    async def _each_piece(self, response: httpx.Response, take: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand each decoded piece of the body to ``take``, reading the next raw chunk only after it
        returned, and letting the scheduler run between inflated pieces of one chunk.

        A response built with its content (``httpx.MockTransport`` in tests) was read, and decoded, by
        httpx already: only the cap applies to it.
        """
        if response.is_stream_consumed:
            decoder = BodyDecoder(None, self.max_response_bytes)
            await _feed(decoder, response.content, take)
        else:
            codings = response.headers.get_list("content-encoding")
            decoder = BodyDecoder(content_coding(codings) if codings else None, self.max_response_bytes)
            async for chunk in response.aiter_raw():
                await _feed(decoder, chunk, take)
        decoder.end()

    async def post_sse(self, model: str, path: str, body: dict[str, Any], on_event: EventHandler) -> None:
        """POST ``body`` and hand each Server-Sent Event of the response, ``(event, data)``, to ``on_event``
        as it arrives, reading the next chunk only after ``on_event`` returns (so a slow consumer pauses
        the socket). Blocks until the body ends, or until ``on_event`` returns True (the stream's own
        end) and the rest of the body was drained (see ``STREAM_END_GRACE``).

        Raises:
            UpstreamError: a transport failure, an answer that cannot be taken, or an error status.
        """
        content = encode_body(model, body)
        reader = EventReader(self.max_event_bytes)
        drain = trio.CancelScope()  # bounds the read of the body after the stream's own end
        ended = False

        async def take(piece: bytes) -> None:
            nonlocal ended
            if ended:
                return
            for event in reader.feed(piece):
                if await on_event(*event):
                    ended = True
                    drain.deadline = trio.current_time() + min(
                        STREAM_END_GRACE, client.timeout.read or math.inf
                    )
                    return

        with transport_errors(model, self.redact), self.lease() as client:
            head = _HeadDeadline(client.timeout.read)
            with head.scope:
                async with client.stream(
                    "POST", path, content=content, headers=_JSON, extensions=head.extensions
                ) as response:
                    if response.status_code >= 400:
                        text = (await self._read(response)).decode("utf-8", errors="replace")
                        raise status_error(model, response.status_code, response.headers, text, self.redact)
                    check_content_type(response.headers.get("content-type"), stream=True)
                    with drain:
                        try:
                            await self._each_piece(response, take)
                        except (httpx.HTTPError, BadResponse):
                            if not ended:
                                raise  # else the answer was complete; the connection is not reused
                    if not ended:
                        for event in reader.end():
                            await on_event(*event)
            head.check()

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


class _HeadDeadline:
    """A cancel scope that bounds the wait for a response head, as a whole, by ``timeout`` seconds: armed
    when httpcore starts receiving the head (its ``trace`` extension says so), disarmed once it came.
    Enter :attr:`scope` around the exchange and pass :attr:`extensions` with the request."""

    __slots__ = ("extensions", "scope", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = math.inf if timeout is None else timeout
        self.scope = trio.CancelScope()
        self.extensions = {"trace": self._trace}

    async def _trace(self, name: str, info: dict[str, Any]) -> None:
        if name.endswith(".receive_response_headers.started"):
            self.scope.deadline = trio.current_time() + self.timeout
        elif name.endswith(".receive_response_headers.complete"):
            self.scope.deadline = math.inf

    def check(self) -> None:
        """Raise httpx's own read timeout if the head did not come in time."""
        if self.scope.cancelled_caught:
            raise httpx.ReadTimeout(f"no complete response head within {self.timeout}s")


def _pool_of(transport: httpx.AsyncBaseTransport) -> httpcore.AsyncConnectionPool | None:
    pool = getattr(transport, "_pool", None)
    return pool if isinstance(pool, httpcore.AsyncConnectionPool) else None


async def _feed(decoder: BodyDecoder, chunk: bytes, take: Callable[[bytes], Awaitable[None]]) -> None:
    for piece in decoder.feed(chunk):
        await take(piece)
        if decoder.more:
            await trio.lowlevel.checkpoint()
