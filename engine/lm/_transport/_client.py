"""The lean client the HTTP backends call: ``post_json`` and ``post_sse`` on one origin's pool.

One request is one ``send_all``; its bytes (head and JSON body) are built once. The head of a POST with
a JSON body is a constant per path plus ``content-length``: h11 validates it once per path and, for each
request, is only told that such a request went out. h11 — a well-kept library — so still owns the hard
part: framing the response (content-length, chunked, EOF, 1xx, ``Connection: close``, HTTP/1.0) and
deciding keep-alive. (Writing each head through h11 cost several times more CPU than the rest of the
request building together.)

The response is read with h11 from the same Trio stream: a JSON body is collected whole, an SSE body is
cut into lines and events and handed to the caller's ``on_event`` one at a time, the socket being read
again only after ``on_event`` returns (backpressure reaches TCP), until the body ends or ``on_event``
says the stream ended (``_protocol.STREAM_END_GRACE``).

Every body passes through a :class:`~._body.BodyDecoder` (the whole answer's cap, bounded inflation, a
yield to the scheduler between inflated pieces) and a stream's also through an
:class:`~dspy_trio.engine.lm._sse.EventReader` (one event's cap, strict UTF-8): the same two the httpx path
uses.

Error mapping happens here and only here: the transport's own failures become the engine's
``UpstreamTimeoutError`` / ``UpstreamConnectionError``, an answer that cannot be taken (:class:`BadResponse`)
``UpstreamResponseError``, error statuses go through the backends' shared
:func:`~dspy_trio.engine.lm._http_errors.status_error`; clients read fixed phrases, the details go to the log,
redacted. ``trio.Cancelled`` passes through untouched, and any exit that is not a complete exchange
closes the connection instead of returning it to the pool.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from ..._errors import UpstreamConnectionError, UpstreamResponseError, UpstreamTimeoutError
from .._body import (
    MAX_EVENT_BYTES,
    MAX_RESPONSE_BYTES,
    BadResponse,
    BodyDecoder,
    check_content_type,
    content_coding,
)
from .._http_errors import failure, status_error
from .._redact import Redactor
from .._sse import EventReader
from ._connection import Connection, ExchangeTimer, Timeouts
from ._errors import RemoteProtocolError, TransportError, TransportTimeout
from ._network import NetworkBackend, Origin
from ._pool import Pool
from ._protocol import STREAM_END_GRACE, EventHandler, encode_body
from ._tls import default_ssl_context

USER_AGENT = "dspy-trio"


class Response:
    """A complete response: ``status_code``, ``headers`` (lower-case names) and ``content`` bytes."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}] {len(self.content)} bytes>"

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON. Raises ``ValueError`` when it is not JSON."""
        return json.loads(self.content)


def _headers(response: h11.Response) -> dict[str, str]:
    """``response``'s header fields by lower-case name; a field repeated is joined by ``", "`` (RFC 9110
    section 5.3), as httpx presents it, so that both transports read the same bytes the same way."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in response.headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _body_of(response: h11.Response, limit: int) -> tuple[str | None, BodyDecoder]:
    """``response``'s content type, and the decoder for its body (see ``_body``): one pass over the
    headers."""
    content_type = None
    codings: list[str] = []
    for name, value in response.headers:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-encoding":
            codings.append(value.decode("latin-1"))
    return content_type, BodyDecoder(content_coding(codings) if codings else None, limit)


@contextmanager
def _mapped(model: str, redact: Redactor) -> Iterator[None]:
    """Translate the transport's failures: a fixed phrase for clients, the details to the log."""
    try:
        yield
    except BadResponse as exc:
        raise failure(UpstreamResponseError, model, exc.public, str(exc), redact) from exc
    except TransportTimeout as exc:
        raise failure(UpstreamTimeoutError, model, exc.public, str(exc), redact) from exc
    except TransportError as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise failure(UpstreamConnectionError, model, exc.public, detail, redact) from exc


class LeanClient:
    """HTTP/1.1 POSTs to one origin over a keep-alive pool; the lean stand-in for ``httpx.AsyncClient``.

    Args:
        base_url: ``http(s)://host[:port]/root/``; request paths are joined to it.
        headers: Sent with every request (e.g. ``Authorization``).
        timeouts: Connect, read, write and pool timeouts.
        max_connections: Connections to the origin at most.
        idle_timeout: Seconds an idle connection is kept.
        ssl_context: For ``https``; one shared context with certifi's CAs when omitted.
        accept_gzip: Ask for gzip-compressed answers (``Accept-Encoding: gzip``). Off by default
            (``identity`` is asked for): LM answers are small and decompressing costs CPU. A gzip or
            deflate answer is decoded either way, within ``max_response_bytes``; others are refused.
        max_response_bytes: The most bytes an answer may have once decoded: a JSON body, or a whole
            event stream. A larger one fails with ``UpstreamResponseError``.
        max_event_bytes: The most one event of a stream (or one line) may hold.
        network: Where connections are opened: the real network unless given (tests give a
            ``MockBackend``, which answers from scripted bytes).
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeouts: Timeouts | None = None,
        max_connections: int = 1024,
        idle_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        accept_gzip: bool = False,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
        network: NetworkBackend | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.origin = Origin(parts.scheme, parts.hostname, port)
        self._root = (parts.path or "/").rstrip("/") + "/"
        self.timeouts = timeouts or Timeouts()
        if parts.scheme == "https" and ssl_context is None:
            ssl_context = default_ssl_context()
        self.pool = Pool(self.origin, max_connections, self.timeouts, ssl_context, idle_timeout, network)
        default_port = port == (443 if parts.scheme == "https" else 80)
        host = self.origin.host if ":" not in self.origin.host else f"[{self.origin.host}]"
        self._host = host if default_port else f"{host}:{port}"
        static = [("host", self._host), ("user-agent", USER_AGENT)]
        static.append(("accept-encoding", "gzip" if accept_gzip else "identity"))
        static += [(name.lower(), value) for name, value in (headers or {}).items()]
        self.max_response_bytes = max_response_bytes
        self.max_event_bytes = max_event_bytes
        self.redact = Redactor.for_headers(headers or {})
        # Validated once here (h11 raises on an illegal name or value), reused for every request.
        h11.Request(method="POST", target="/", headers=static)
        self._static = static
        self._heads: dict[tuple[str, str], tuple[bytes, h11.Request]] = {}

    def __repr__(self) -> str:
        return f"<LeanClient {self.pool!r}>"

    def _head(self, path: str, accept: str) -> tuple[bytes, h11.Request]:
        """The request head up to ``content-length`` for ``path``, and the h11 event that tells the
        connection's state machine such a request was sent. Built (and validated by h11) once per path."""
        if (cached := self._heads.get((path, accept))) is not None:
            return cached
        target = self._root + path.lstrip("/")
        headers = [*self._static, ("accept", accept), ("content-type", "application/json")]
        event = h11.Request(method="POST", target=target, headers=[*headers, ("content-length", "0")])
        lines = [f"POST {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
        head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
        if len(self._heads) < 64:
            self._heads[(path, accept)] = (head, event)
        return head, event

    def _request_bytes(self, connection: Connection, path: str, payload: bytes, accept: str) -> bytes:
        """The whole request — head and JSON ``payload`` — as one bytes object.

        h11 validated the head once (:meth:`_head`); here it is only told that the request went out
        (an equivalent event with an empty body, whose bytes are dropped), so its state machine frames
        the response and decides keep-alive exactly as if it had written the request itself.
        """
        head, event = self._head(path, accept)
        connection.h11.send(event)
        connection.h11.send(h11.EndOfMessage())
        return b"".join((head, str(len(payload)).encode(), b"\r\n\r\n", payload))

    async def _start(
        self, path: str, payload: bytes, accept: str, timer: ExchangeTimer
    ) -> tuple[Connection, h11.Response]:
        """Acquire a connection, send the request, read the response head, all within ``timer``'s scope
        (the caller's). On failure the connection is closed and released here."""
        connection = await self.pool.acquire()
        try:
            data = self._request_bytes(connection, path, payload, accept)
            await connection.send(data, timer)
            # The read timeout bounds the silence between reads; the whole head must also arrive within
            # it, or a server trickling header bytes would hold the call for hours.
            head_by = trio.current_time() + self.timeouts.read
            while True:
                event = await connection.next_event(timer, head_by)
                if isinstance(event, h11.Response):
                    return connection, event
                if not isinstance(event, h11.InformationalResponse):  # pragma: no cover - h11 guarantees
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} before the response")
        except BaseException:
            self.pool.release(connection)  # not reusable mid-exchange: closed
            raise

    async def _read_body(self, connection: Connection, timer: ExchangeTimer, decoder: BodyDecoder) -> bytes:
        """The whole body, through ``decoder`` (at most ``max_response_bytes``). Yields to the scheduler
        between inflated pieces of one chunk.

        Raises:
            BadResponse: larger than the cap, or an encoding that cannot be decoded (or is corrupt).
        """
        chunks: list[bytes] = []
        while True:
            event = await connection.next_event(timer)
            if isinstance(event, h11.Data):
                for piece in decoder.feed(bytes(event.data)):
                    chunks.append(piece)
                    if decoder.more:
                        await trio.lowlevel.checkpoint()
            elif isinstance(event, h11.EndOfMessage):
                decoder.end()
                return b"".join(chunks)

    async def request_json(self, path: str, payload: bytes, *, json_only: bool = False) -> Response:
        """POST ``payload`` (JSON bytes, see :func:`encode_body`) to ``path`` and read the whole response
        (any status). Blocks for the exchange.

        Args:
            json_only: Refuse a successful answer whose content type is not JSON before reading it.

        Raises:
            TransportError: a transport failure (see ``_errors``); the connection is then closed.
        """
        timer = ExchangeTimer(self.timeouts)
        with timer.scope:
            connection, head = await self._start(path, payload, "application/json", timer)
            try:
                content_type, decoder = _body_of(head, self.max_response_bytes)
                if json_only and head.status_code < 300:
                    check_content_type(content_type, stream=False)
                content = await self._read_body(connection, timer, decoder)
            finally:
                self.pool.release(connection)
            return Response(head.status_code, _headers(head), content)
        raise timer.error()

    async def post_json(self, model: str, path: str, body: dict[str, Any]) -> Response:
        """POST ``body`` as JSON and return the response. Blocks for the whole response.

        Raises:
            UpstreamError: a transport failure, an answer that cannot be taken, or an error status
                (mapped by :func:`status_error`).
        """
        payload = encode_body(model, body)  # before a connection is taken: a bad body sends nothing
        with _mapped(model, self.redact):
            response = await self.request_json(path, payload, json_only=True)
        if response.status_code >= 400:
            raise status_error(model, response.status_code, response.headers, response.text, self.redact)
        return response

    async def post_sse(self, model: str, path: str, body: dict[str, Any], on_event: EventHandler) -> None:
        """POST ``body`` and hand each Server-Sent Event of the response, ``(event, data)``, to ``on_event``
        as it arrives, reading the socket again only after ``on_event`` returns (so a slow consumer
        pauses the socket). Blocks until the body ends, or until ``on_event`` returns True (the stream's
        own end) and the rest of the body was drained (see ``STREAM_END_GRACE``).

        Raises:
            UpstreamError: a transport failure, or an error status.
        """
        payload = encode_body(model, body)
        timer = ExchangeTimer(self.timeouts)
        with _mapped(model, self.redact), timer.scope:
            connection, head = await self._start(path, payload, "text/event-stream", timer)
            try:
                content_type, decoder = _body_of(head, self.max_response_bytes)
                if head.status_code >= 400:
                    content = await self._read_body(connection, timer, decoder)
                    text = content.decode("utf-8", errors="replace")
                    raise status_error(model, head.status_code, _headers(head), text, self.redact)
                check_content_type(content_type, stream=True)
                await self._events(connection, timer, on_event, decoder)
            finally:
                self.pool.release(connection)
            return
        with _mapped(model, self.redact):
            raise timer.error()

    async def _events(
        self,
        connection: Connection,
        timer: ExchangeTimer,
        on_event: EventHandler,
        decoder: BodyDecoder,
    ) -> None:
        reader = EventReader(self.max_event_bytes)
        while True:
            event = await connection.next_event(timer)
            if isinstance(event, h11.Data):
                for piece in decoder.feed(bytes(event.data)):
                    for sse in reader.feed(piece):
                        # The read scope must not time out the consumer: only socket reads are bounded.
                        timer.pause()
                        if await on_event(*sse):
                            await self._drain(connection, timer)
                            return
                    if decoder.more:
                        await trio.lowlevel.checkpoint()
            elif isinstance(event, h11.EndOfMessage):
                decoder.end()
                for sse in reader.end():
                    timer.pause()
                    await on_event(*sse)
                return

    async def _drain(self, connection: Connection, timer: ExchangeTimer) -> None:
        """Read the rest of a body whose stream already ended, unread, for at most ``STREAM_END_GRACE``
        seconds: if it ends by then the connection is reused, else (or if it breaks) the pool closes it."""
        with trio.move_on_after(min(STREAM_END_GRACE, self.timeouts.read)):
            try:
                while not isinstance(await connection.next_event(timer), h11.EndOfMessage):
                    pass
            except TransportError:
                pass  # the answer was complete; the connection is not reused

    async def reap(self) -> int:
        """Close the idle connections that expired or whose server closed them; returns how many."""
        await trio.lowlevel.checkpoint()
        return self.pool.reap()

    async def reap_forever(
        self, interval: float | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call :meth:`reap` every ``interval`` seconds until cancelled (returns at once with no
        interval). For ``nursery.start``."""
        task_status.started()
        if interval is None:
            return
        while True:
            await trio.sleep(interval)
            self.pool.reap()

    def close(self) -> None:
        """Close every idle connection and stop keeping connections (synchronous)."""
        self.pool.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
