"""The lean client the HTTP backends call: ``post_json`` and ``post_sse`` on one origin's pool.

One request is one ``send_all``; its bytes (head and JSON body) are built once. The head of a POST with
a JSON body is a constant per path plus ``content-length``: h11 validates it once per path and, for each
request, is only told that such a request went out. h11 — a well-kept library — so still owns the hard
part: framing the response (content-length, chunked, EOF, 1xx, ``Connection: close``, HTTP/1.0) and
deciding keep-alive. (Writing each head through h11 cost several times more CPU than the rest of the
request building together.)

The response is read with h11 from the same Trio stream: a JSON body is collected whole, an SSE body is
cut into lines and events and handed to the caller's ``on_event`` one at a time, the socket being read
again only after ``on_event`` returns (backpressure reaches TCP).

Error mapping happens here and only here: the transport's own failures become the engine's
``UpstreamTimeoutError`` / ``UpstreamConnectionError``, error statuses go through the backends' shared
:func:`~engine.lm._http_errors.status_error`. ``trio.Cancelled`` passes through untouched, and any exit
that is not a complete exchange closes the connection instead of returning it to the pool.
"""

from __future__ import annotations

import codecs
import json
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from ..._errors import UpstreamConnectionError, UpstreamTimeoutError
from .._http_errors import status_error
from .._sse import SSEParser
from ._connection import Connection, ExchangeTimer, Origin, Timeouts
from ._errors import RemoteProtocolError, TransportError, TransportTimeout
from ._pool import Pool
from ._protocol import encode_body
from ._tls import default_ssl_context

USER_AGENT = "dspy-trio"
_EOL = re.compile("\r\n|\r|\n")
# A JSON answer larger than this is refused rather than held in memory.
MAX_BODY_BYTES = 64 * 1024 * 1024


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
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}


@contextmanager
def _mapped(model: str) -> Iterator[None]:
    try:
        yield
    except TransportTimeout as exc:
        raise UpstreamTimeoutError(f"{model}: no answer in time ({type(exc).__name__})", model=model) from exc
    except TransportError as exc:
        raise UpstreamConnectionError(f"{model}: {type(exc).__name__}: {exc}", model=model) from exc


class LeanClient:
    """HTTP/1.1 POSTs to one origin over a keep-alive pool; the lean stand-in for ``httpx.AsyncClient``.

    Args:
        base_url: ``http(s)://host[:port]/root/``; request paths are joined to it.
        headers: Sent with every request (e.g. ``Authorization``).
        timeouts: Connect, read, write and pool timeouts.
        max_connections: Connections to the origin at most.
        idle_timeout: Seconds an idle connection is kept.
        ssl_context: For ``https``; one shared context with certifi's CAs when omitted.
        accept_gzip: Ask for gzip-compressed answers (``Accept-Encoding: gzip``). Off by default: LM
            answers are small and decompressing costs CPU. An encoded answer is decoded either way.
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
        self.pool = Pool(self.origin, max_connections, self.timeouts, ssl_context, idle_timeout)
        default_port = port == (443 if parts.scheme == "https" else 80)
        host = self.origin.host if ":" not in self.origin.host else f"[{self.origin.host}]"
        self._host = host if default_port else f"{host}:{port}"
        static = [("host", self._host), ("user-agent", USER_AGENT)]
        if accept_gzip:
            static.append(("accept-encoding", "gzip"))
        static += [(name.lower(), value) for name, value in (headers or {}).items()]
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
                    connection.decoder(event)
                    return connection, event
                if not isinstance(event, h11.InformationalResponse):  # pragma: no cover - h11 guarantees
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} before the response")
        except BaseException:
            self.pool.release(connection)  # not reusable mid-exchange: closed
            raise

    async def _read_body(self, connection: Connection, timer: ExchangeTimer) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await connection.next_event(timer)
            if isinstance(event, h11.Data):
                chunk = connection.decode(bytes(event.data))
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise RemoteProtocolError(f"response body larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            elif isinstance(event, h11.EndOfMessage):
                chunks.append(connection.decode(b"", final=True))
                return b"".join(chunks)

    async def request_json(self, path: str, payload: bytes) -> Response:
        """POST ``payload`` (JSON bytes, see :func:`encode_body`) to ``path`` and read the whole response
        (any status). Blocks for the exchange.

        Raises:
            TransportError: a transport failure (see ``_errors``); the connection is then closed.
        """
        timer = ExchangeTimer(self.timeouts)
        with timer.scope:
            connection, head = await self._start(path, payload, "application/json", timer)
            try:
                content = await self._read_body(connection, timer)
            finally:
                self.pool.release(connection)
            return Response(head.status_code, _headers(head), content)
        raise timer.error()

    async def post_json(self, model: str, path: str, body: dict[str, Any]) -> Response:
        """POST ``body`` as JSON and return the response. Blocks for the whole response.

        Raises:
            UpstreamError: a transport failure, or an error status (mapped by :func:`status_error`).
        """
        payload = encode_body(model, body)  # before a connection is taken: a bad body sends nothing
        with _mapped(model):
            response = await self.request_json(path, payload)
        if response.status_code >= 400:
            raise status_error(model, response.status_code, response.headers, response.text)
        return response

    async def post_sse(
        self, model: str, path: str, body: dict[str, Any], on_event: Callable[[str, str], Awaitable[None]]
    ) -> None:
        """POST ``body`` and hand each Server-Sent Event of the response, ``(event, data)``, to ``on_event``
        as it arrives, reading the socket again only after ``on_event`` returns (so a slow consumer
        pauses the socket). Blocks until the body ends.

        Raises:
            UpstreamError: a transport failure, or an error status.
        """
        payload = encode_body(model, body)
        timer = ExchangeTimer(self.timeouts)
        with _mapped(model), timer.scope:
            connection, head = await self._start(path, payload, "text/event-stream", timer)
            try:
                if head.status_code >= 400:
                    text = (await self._read_body(connection, timer)).decode("utf-8", errors="replace")
                    raise status_error(model, head.status_code, _headers(head), text)
                await self._events(connection, timer, on_event)
            finally:
                self.pool.release(connection)
            return
        with _mapped(model):
            raise timer.error()

    async def _events(
        self,
        connection: Connection,
        timer: ExchangeTimer,
        on_event: Callable[[str, str], Awaitable[None]],
    ) -> None:
        parser = SSEParser()
        lines = LineSplitter()
        while True:
            event = await connection.next_event(timer)
            if isinstance(event, h11.Data):
                text = lines.feed(connection.decode(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                text = lines.feed(connection.decode(b"", final=True), final=True)
            else:  # pragma: no cover - h11 yields only Data then EndOfMessage here
                continue
            for line in text:
                if (sse := parser.feed(line)) is not None:
                    # The read scope must not time out the consumer: only socket reads are bounded.
                    timer.pause()
                    await on_event(*sse)
            if isinstance(event, h11.EndOfMessage):
                if (sse := parser.feed("")) is not None:
                    timer.pause()
                    await on_event(*sse)
                return

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


class LineSplitter:
    """UTF-8 bytes in, complete lines out, split at ``\\n``, ``\\r\\n`` or ``\\r`` as SSE defines lines
    (the ends are not kept); a ``\\r`` at the end of a chunk waits for the next one in case ``\\n``
    follows it."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    def feed(self, data: bytes, *, final: bool = False) -> list[str]:
        """The lines completed by ``data``; with ``final``, also the last unterminated one.

        Raises:
            RemoteProtocolError: a line grew past ``MAX_BODY_BYTES`` characters without ending.
        """
        new = self._decoder.decode(data, final)
        if not final and "\n" not in new and "\r" not in new and not self._buffer.endswith("\r"):
            self._buffer += new  # no line ends here: no need to split everything again
            if len(self._buffer) > MAX_BODY_BYTES:
                raise RemoteProtocolError(f"an event-stream line longer than {MAX_BODY_BYTES} characters")
            return []
        text = self._buffer + new
        held = ""
        if not final and text.endswith("\r"):
            text, held = text[:-1], "\r"
        lines = _EOL.split(text)
        rest = lines.pop()
        if final:
            self._buffer = ""
            if rest:
                lines.append(rest)
        else:
            self._buffer = rest + held
            if len(self._buffer) > MAX_BODY_BYTES:
                raise RemoteProtocolError(f"an event-stream line longer than {MAX_BODY_BYTES} characters")
        return lines
