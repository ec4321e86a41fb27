"""The service's HTTP/1.1 protocol: Hypercorn's h11 protocol with HTTP/2 refused and RFC 9112's framing
rules enforced before a request reaches the app.

Why: Hypercorn 0.18 speaks HTTP/2 cleartext on a plain port (the ``PRI * HTTP/2.0`` preface, and
``Upgrade: h2c``), and its h2 protocol raised an uncaught ``KeyError`` on a DATA frame for a stream it
had already answered, which ended the whole server. The service speaks HTTP/1.1 and WebSocket; HTTP/2
belongs in a TLS-terminating proxy in front. h11 (which parses our requests) frames a request carrying
both ``Content-Length`` and ``Transfer-Encoding: chunked`` by the chunks and keeps the connection open,
so the bytes ``Content-Length`` counted run as a second request: the classic request-smuggling
primitive between a proxy and a server that disagree on framing.

The rules, checked on the request head once h11 has parsed it (one pass over the headers, as Hypercorn
already made to look for an upgrade):

- HTTP/2's prior-knowledge preface, or any version but 1.0 and 1.1: ``505`` (``http2_not_supported`` /
  ``http_version_not_supported``) and the connection closes.
- ``Upgrade: h2c`` switches nothing: the request is answered as the plain HTTP/1.1 request it also is.
- ``Content-Length`` with ``Transfer-Encoding``, or ``Transfer-Encoding`` in an HTTP/1.0 request: ``400``
  (``ambiguous_message_framing``) and the connection closes (RFC 9112 section 6.1: the server MUST close).
- What h11 refuses itself (conflicting lengths, two ``Host`` headers, an unknown transfer coding, a
  malformed line) keeps h11's status (400, or 501 for a coding it does not implement) and closes, as
  Hypercorn did, but with a JSON body naming the problem (``malformed_request``) instead of none.
- A ``Host`` that does not name this server, when it is bound to loopback (or the names are
  configured): ``421`` (``host_not_allowed``) and the connection closes. A page whose name an attacker
  re-pointed at 127.0.0.1 (DNS rebinding) is otherwise same-origin with the server
  (:mod:`dspy_trio.web.hosts`).
- Empty lines (CRLF or LF) where a request line is expected are skipped (RFC 9112 section 2.2: a
  server SHOULD ignore at least one): an old client's stray CRLF after a body no longer costs the next
  request a 400 and the connection. h11 took them for an empty request head.
- Bytes after a request that closes the connection (``Connection: close``, HTTP/1.0 without keep-alive)
  are dropped unread (RFC 9112 section 9.6: the server MUST NOT process further requests on it) and the
  request gets its answer. h11 raised "Got data when expecting EOF" on them, which Hypercorn answered
  with a 400 in place of the request's own answer.
- A WebSocket handshake that can never be accepted (a body, HTTP/1.0, no key, a version but 13) gets a
  400 ``invalid_websocket_handshake`` or a 426 ``unsupported_websocket_version`` and closes; a valid one
  is answered by the app while h11 still frames the connection (:mod:`dspy_trio.web.handshake`), so a
  refusal is one HTTP answer with ``Connection: close``, and only a 101 switches the connection.

Every refusal is one JSON error in the API's shape (``{"error": {"message", "type", "code", "param"}}``),
sent in one write, with ``Connection: close``; nothing after it on the connection is read.

An answer of a known length (``Content-Length``: every JSON answer) is written in one socket write too:
its head waits for its body (which the app sends next) instead of going out on its own. Hypercorn wrote
the head, the body and the (empty) end of a message separately: two system calls and three shielded
writes per answer, about a tenth of the server's CPU for a cached answer. A streamed answer (SSE,
NDJSON: chunked) still sends its head at once.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import h11
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Body, EndBody, Request, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream

from .encoding import dumps
from .errors import error_body
from .handshake import PendingHandshake, closing, handshake_refusal, is_websocket_handshake
from .hosts import AllowedHosts

# The ASGI extension through which a handler below the framework learns that its client left
# (:mod:`dspy_trio.web.lean`): a list of cancel scopes, each cancelled when the request's stream closes
# (which removes the extension: a handler that finds none must wait for the ``http.disconnect``).
LEAVING = "dspy_trio.leaving"

_HTTP_1 = frozenset({b"1.0", b"1.1"})
_EMPTY_LINES = re.compile(rb"(?:\r?\n)+")


class _H11Connection(h11.Connection):
    """h11's server side, skipping empty lines where a request line is expected (RFC 9112 section 2.2)
    and dropping what the client sends after a request that closes the connection (section 9.6).

    Reaches into h11's private receive buffer (``_receive_buffer``: a ``bytearray`` in ``_data``, cut with
    ``_extract``, as h11's own readers do): h11 has no public way to drop bytes it has buffered.
    tests/test_web_protocol.py fails if a new h11 changes that.
    """

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        if self.their_state is h11.IDLE:
            buffer = self._receive_buffer
            empty = _EMPTY_LINES.match(buffer._data)
            if empty is not None:
                buffer._extract(empty.end())
            if buffer._data == b"\r" and not self._receive_buffer_closed:
                return h11.NEED_DATA  # maybe the first half of an empty line: h11 would refuse a lone CR
        elif self.their_state is h11.MUST_CLOSE:
            self._receive_buffer._extract(len(self._receive_buffer))  # never read: the connection closes
        return super().next_event()


class RequestRefused(Exception):
    """A request head breaks one of the rules above: answer ``status`` with this error and close."""

    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def check_request_head(request: h11.Request, hosts: AllowedHosts | None = None) -> None:
    """Raise :class:`RequestRefused` if the head must not be served (see the module's rules); ``hosts``
    are the names the server answers for (None: any)."""
    if request.http_version not in _HTTP_1:
        if request.method == b"PRI" and request.target == b"*":
            raise RequestRefused(
                505,
                "http2_not_supported",
                "HTTP/2 is not served on this port: speak HTTP/1.1 (or WebSocket), or put a "
                "TLS-terminating proxy in front for HTTP/2",
            )
        raise RequestRefused(
            505,
            "http_version_not_supported",
            f"HTTP/{request.http_version.decode('ascii', 'replace')} is not supported: speak HTTP/1.1",
        )
    length = coded = False
    host = b""
    for name, value in request.headers:  # h11 lower-cases the names
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            coded = True
        elif name == b"host":  # h11 refuses a second one
            host = value
    if coded and length:
        raise RequestRefused(
            400,
            "ambiguous_message_framing",
            "a request must not carry both Content-Length and Transfer-Encoding (RFC 9112 section 6.1)",
        )
    if coded and request.http_version == b"1.0":
        raise RequestRefused(
            400,
            "ambiguous_message_framing",
            "Transfer-Encoding is not allowed in an HTTP/1.0 request (RFC 9112 section 6.1)",
        )
    if hosts is not None and host and not hosts.allows(host):
        shown = host.decode("latin-1")[:100]
        raise RequestRefused(
            421,
            "host_not_allowed",
            f"this server does not answer for the host {shown!r} (a defence against DNS rebinding): "
            "reach it as localhost, or list the name in DSPY_TRIO_ALLOWED_HOSTS",
        )
    if is_websocket_handshake(request) and (refusal := handshake_refusal(request)) is not None:
        raise RequestRefused(*refusal)


class _HTTPStream(HTTPStream):
    """Hypercorn's HTTP stream, with the ``LEAVING`` extension in each request's scope: the cancel
    scopes a handler put there are cancelled when the stream closes (the client left, or the answer
    ended), as the ``http.disconnect`` it also queues would tell a task that waited for it; the
    extension is gone from then on."""

    async def handle(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and not self.closed:
            # Taken away, too: a handler that has not looked yet (the client sent its request and left
            # before the handler ran) finds none, and waits for the http.disconnect queued below.
            extensions: Any = self.scope["extensions"]
            for scope in extensions.pop(LEAVING, ()):
                scope.cancel()
        await super().handle(event)
        if isinstance(event, Request):  # the app is spawned, not yet running: it will find the list
            extensions = self.scope["extensions"]
            extensions[LEAVING] = []


def _has_length(headers: Any) -> bool:
    return any(name.lower() == b"content-length" for name, _ in headers)


class HTTP11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol (keep-alive, pipelining, WebSocket upgrades) with the rules above.

    Built by :class:`dspy_trio.web.connection.Connection` for every connection, in place of Hypercorn's
    ``ProtocolWrapper`` (which is what switched a connection to HTTP/2).
    """

    def __init__(self, *args: Any, hosts: AllowedHosts | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # H11Protocol's arguments
        self.hosts = hosts  # the names this server answers for (dspy_trio.web.hosts); None: any
        limit = self.config.h11_max_incomplete_size
        self.connection = _H11Connection(h11.SERVER, max_incomplete_event_size=limit)
        self._held = b""  # the head of an answer of known length, until its body goes with it

    async def stream_send(self, event: StreamEvent) -> None:
        # Hypercorn's, with an answer of known length framed into one write (see the module's notes).
        if isinstance(event, Response) and event.status_code >= 200 and _has_length(event.headers):
            headers = [*event.headers, *self.config.response_headers("h11")]
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            self._held = self._framed(h11.Response(headers=headers, status_code=event.status_code))
            return
        if isinstance(event, Body | EndBody):
            data = self._framed(h11.Data(data=event.data) if isinstance(event, Body) else h11.EndOfMessage())
            if self._held:
                data, self._held = self._held + data, b""
            if data:  # the end of a message of known length frames nothing
                await self.send(RawData(data=data))
            return
        if self._held:  # anything else first lets the head go (a stream that closes without a body)
            held, self._held = self._held, b""
            await self.send(RawData(data=held))
        await super().stream_send(event)

    def _framed(self, event: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
        """``event`` as h11 frames it; nothing when the connection already failed (as Hypercorn's
        ``_send_h11_event`` lets it pass)."""
        try:
            return self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return b""

    async def handle(self, event: Event) -> None:
        try:
            await super().handle(event)
        except RequestRefused as refused:
            await self._refuse(refused.status, refused.code, refused.message, refused.headers)

    async def _check_protocol(self, event: h11.Request) -> None:
        # Hypercorn's raises to switch to HTTP/2 (after a 101 for Upgrade: h2c); ours never switches.
        check_request_head(event, self.hosts)

    async def _create_stream(self, request: h11.Request) -> None:
        # Hypercorn's, but a WebSocket handshake's connection stays h11's until the app answers it.
        stream: HTTPStream | WSStream
        arguments = (self.app, self.config, self.context, self.task_group, self.ssl, self.client, self.server)
        if is_websocket_handshake(request):
            assert isinstance(self.connection, h11.Connection)
            end = self.connection.next_event()  # a handshake has no body (check_request_head): it ends here
            assert isinstance(end, h11.EndOfMessage), end
            self.connection = PendingHandshake(self.connection)  # type: ignore[assignment]  # as H11WSConnection
            stream = WSStream(*arguments, self._handshake_send, STREAM_ID)
        else:
            stream = _HTTPStream(*arguments, self.stream_send, STREAM_ID)
        self.stream = stream
        headers = request.headers.raw_items() if self.config.h11_pass_raw_headers else list(request.headers)
        await stream.handle(
            Request(
                stream_id=STREAM_ID,
                headers=headers,
                http_version=request.http_version.decode(),
                method=request.method.decode("ascii").upper(),
                raw_path=request.target,
                state=self.connection_state,
            )
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()

    async def _handshake_send(self, event: StreamEvent) -> None:
        # What a WebSocket stream sends (an HTTP stream sends through stream_send directly): its refusal
        # closes the connection; its acceptance (101) resumes the reading h11 had paused.
        handshake = self.connection
        pending = isinstance(handshake, PendingHandshake) and not handshake.switched
        if pending and isinstance(event, Response) and event.status_code >= 200:
            event = closing(event)
        await self.stream_send(event)
        if pending and isinstance(handshake, PendingHandshake) and handshake.switched:
            await self.can_read.set()

    async def _send_error_response(self, status_code: int) -> None:
        # Called only from Hypercorn's ``except h11.RemoteProtocolError`` block: that error is the one
        # being handled, so its message names the problem.
        error = sys.exception()
        detail = str(error)[:200] if isinstance(error, h11.RemoteProtocolError) else "malformed request"
        await self._respond(status_code, "malformed_request", f"malformed HTTP/1.1 request: {detail}")

    async def _refuse(
        self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await self._respond(status, code, message, headers)
        await self.send(Closed())

    async def _respond(
        self, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        payload = dumps(error_body(message, type="invalid_request_error", code=code)).encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
            *(extra or ()),
            *self.config.response_headers("h11"),
        ]
        events = (
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=payload),
            h11.EndOfMessage(),
        )
        try:
            data = b"".join(self.connection.send(event) or b"" for event in events)
        except h11.LocalProtocolError:  # a response was already under way: closing is all that is left
            return
        await self.send(RawData(data=data))  # one write


__all__ = ["LEAVING", "HTTP11Protocol", "RequestRefused", "check_request_head"]
