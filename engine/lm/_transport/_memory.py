"""An in-memory network for the lean transport: peers that answer from scripted bytes, with no socket.

The lean transport runs unchanged over it (h11 framing, the pool, keep-alive, timeouts, cancellation,
the caps on answers), so its behaviours are tested on a virtual clock in microseconds::

    backend = MockBackend(lambda request: [http_response(200, json={"ok": True})])
    client = LeanClient("http://upstream.test/v1/", network=backend)
    await client.post_json("m", "chat/completions", {...})
    assert len(backend.streams) == 1 and backend.requests[0].json() == {...}

Each connection the transport opens is a :class:`MockStream`. The peer at its far end reads the
requests sent on it (with h11, so a request split over several sends is still one) and answers each
complete request with the reply ``respond(request)`` returns: a sequence of chunks, where one receive
gets one chunk (or its first ``max_bytes``), an empty chunk (:data:`EOF`) closes the peer's side there
for good, and a number is a pause: the chunks after it are sent that many seconds later (Trio's clock,
counted from the request's arrival). Between answers the peer is open and silent: a receive blocks
until the caller's cancel scope ends it, as a silent server's socket would. (httpcore ships
``AsyncMockBackend`` for the same purpose.)
"""

from __future__ import annotations

import json as jsonlib
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

from ._errors import ConnectError
from ._network import Origin

EOF = b""
"""A chunk that closes the peer's side of the connection (a receive returns ``b""`` from then on)."""


@attrs.frozen
class MockRequest:
    """One complete request an in-memory peer received.

    Attributes:
        connection: Which connection carried it (0 for the first one the transport opened).
        head: The request line and headers, as h11 parsed them.
        body: The request body.
        at: When it arrived in full (Trio's clock).
    """

    connection: int
    head: h11.Request
    body: bytes
    at: float

    @property
    def target(self) -> str:
        return self.head.target.decode()

    @property
    def headers(self) -> dict[str, str]:
        """Header names lower-case (as h11 gives them)."""
        return {name.decode("latin-1"): value.decode("latin-1") for name, value in self.head.headers}

    def json(self) -> Any:
        """The body parsed as JSON."""
        return jsonlib.loads(self.body)


Reply = Sequence[bytes | float]
Respond = Callable[[MockRequest], Reply]


class MockStream:
    """One connection to an in-memory peer (see the module docstring).

    Attributes:
        index: Its place among the backend's connections, from 0.
        requests: The complete requests received on it, in order.
        closed_at: When the transport closed it (Trio's clock), or None while it is open.
    """

    def __init__(self, index: int, respond: Respond, log: list[MockRequest]) -> None:
        self.index = index
        self.requests: list[MockRequest] = []
        self.closed_at: float | None = None
        self._respond = respond
        self._log = log
        self._parser = h11.Connection(h11.SERVER)
        self._head: h11.Request | None = None
        self._body: list[bytes] = []
        self._pending: deque[tuple[float, bytes]] = deque()  # (when it is sent, chunk)
        self._peer_closed = False
        self._waiting = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("peer closed" if self._peer_closed else "open")
        return f"<MockStream {self.index} {state} | {len(self.requests)} requests>"

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    async def send_all(self, data: bytes) -> None:
        """Hand the bytes to the peer; each request they complete is answered at once. Once the peer
        closed its side the bytes are dropped, as a kernel takes them for a socket whose peer is gone."""
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._peer_closed or not data:
            return
        self._parser.receive_data(bytes(data))
        self._read_requests()

    def _read_requests(self) -> None:
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise AssertionError(f"the transport sent invalid HTTP/1.1: {exc}") from exc
            if isinstance(event, h11.Request):
                self._head, self._body = event, []
            elif isinstance(event, h11.Data):
                self._body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert self._head is not None
                request = MockRequest(self.index, self._head, b"".join(self._body), trio.current_time())
                self.requests.append(request)
                self._log.append(request)
                self._queue(request.at, self._respond(request))
                # The next request on the connection starts a new exchange: a new parser, fed the rest.
                rest = self._parser.trailing_data[0]
                self._parser = h11.Connection(h11.SERVER)
                if rest:  # (h11 reads b"" as the end of the connection)
                    self._parser.receive_data(rest)
            else:  # NEED_DATA, or the client ended its side
                return

    def _queue(self, start: float, reply: Reply) -> None:
        at = start
        for item in reply:
            if isinstance(item, bytes):
                self._pending.append((at, item))
            else:
                at += item
        self._waiting.unpark_all()

    async def receive_some(self, max_bytes: int) -> bytes:
        """The next scripted chunk (at most ``max_bytes`` of it), ``b""`` once the peer closed; blocks
        while the peer has nothing to say, or until a paused chunk is due."""
        await trio.lowlevel.checkpoint()
        while True:
            if self.closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._peer_closed:
                return b""
            if self._pending and self._pending[0][0] > trio.current_time():
                await trio.sleep_until(self._pending[0][0])
                continue
            if self._pending:
                at, chunk = self._pending.popleft()
                if chunk == EOF:
                    self._peer_closed = True
                    self._pending.clear()
                elif len(chunk) > max_bytes:
                    self._pending.appendleft((at, chunk[max_bytes:]))
                    chunk = chunk[:max_bytes]
                return chunk
            await self._waiting.park()

    def readable(self) -> bool:
        return self._peer_closed or bool(self._pending and self._pending[0][0] <= trio.current_time())

    def close(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()
            self._waiting.unpark_all()


class MockBackend:
    """An in-memory network whose peers answer each request with ``respond(request)``'s chunks.

    Args:
        respond: Called once per complete request, on any connection; returns the chunks of the
            answer (see the module docstring). An exception it raises reaches the caller of the
            transport (a test's assertion, for instance).
        connections: Accept at most this many connections; the next ones are refused with
            ``ConnectError`` (None: no limit; 0: every connection is refused).

    Attributes:
        streams: Every connection opened, in order.
        requests: Every request received, in order of arrival.
    """

    def __init__(self, respond: Respond, *, connections: int | None = None) -> None:
        self.streams: list[MockStream] = []
        self.requests: list[MockRequest] = []
        self._respond = respond
        self._connections = connections

    @classmethod
    def replying(cls, *replies: Reply, connections: int | None = None) -> MockBackend:
        """A backend whose peers answer the k-th request (counted over all connections) with
        ``replies[k]``; a request past the last reply fails with ``AssertionError``."""
        script = deque(replies)

        def respond(request: MockRequest) -> Reply:
            if not script:
                raise AssertionError(
                    f"{request.target}: more requests than the {len(replies)} scripted replies"
                )
            return script.popleft()

        return cls(respond, connections=connections)

    def __repr__(self) -> str:
        opened = sum(not stream.closed for stream in self.streams)
        counts = f"{len(self.streams)} connections, {opened} open | {len(self.requests)} requests"
        return f"<MockBackend [{counts}]>"

    async def connect(self, origin: Origin, ssl_context: ssl.SSLContext | None) -> MockStream:
        await trio.lowlevel.checkpoint()
        if self._connections is not None and len(self.streams) >= self._connections:
            raise ConnectError(
                f"cannot connect to {origin.host}:{origin.port}: refused by the in-memory peer"
            )
        stream = MockStream(len(self.streams), self._respond, self.requests)
        self.streams.append(stream)
        return stream


def http_response(
    status: int = 200,
    body: bytes = b"",
    *,
    json: Any = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    version: str = "1.1",
    length: bool = True,
) -> bytes:
    """The bytes of one HTTP response: ``json`` (encoded, with ``content-type: application/json``) or
    ``body``, framed by ``content-length`` unless ``length`` is false (then the body ends with the
    connection, so follow it with :data:`EOF`)."""
    all_headers = list(headers.items() if isinstance(headers, Mapping) else headers)
    if json is not None:
        body = jsonlib.dumps(json).encode()
        all_headers.insert(0, ("content-type", "application/json"))
    if length:
        all_headers.append(("content-length", str(len(body))))
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/{version} {status} {reason}", *(f"{name}: {value}" for name, value in all_headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
