"""A WebSocket handshake on the HTTP/1.1 connection: checked before the app runs, and framed by h11 until
the app answers it, so a refusal is one ordinary HTTP answer and the connection then closes cleanly.

Hypercorn 0.18 switches a connection to WebSocket (``H11WSConnection``) as soon as a handshake's head is
parsed, before the app has answered it. Measured, that breaks four ways:

- an invalid handshake (no ``Sec-WebSocket-Key``, a version but 13, HTTP/1.0) gets a bare 400 from
  ``WSStream``, which never ends its stream: the socket is held until the client leaves;
- a handshake with a body: the body's bytes reach ``WSStream`` before the answer, which sends a bare 400;
  the app's answer then fails in h11 (a traceback) and a WebSocket close frame follows the 400;
- a refused handshake (the app's 401, 403, 503) ends the connection without ``Connection: close``, so a
  client that reuses the connection (httpx does) loses its next request;
- bytes after the handshake (a pipelined request) reach ``WSStream`` before the app's answer: a bare 400,
  and the app's refusal breaks in h11 ("can't handle event type Response ... state=DONE").

What the service does instead (:class:`dspy_trio.web.protocol.HTTP11Protocol` calls these):

- :func:`handshake_refusal` names what can never become a WebSocket (a body, HTTP/1.0, no key, another
  version: 426 with ``Sec-WebSocket-Version: 13``, RFC 6455 section 4.4), answered before the app runs,
  with a JSON body and ``Connection: close``, like the protocol's other refusals;
- :class:`PendingHandshake` keeps h11 in charge of the connection until the app answers: bytes sent after
  the handshake wait in h11's buffer (the connection reads no further meanwhile); a refusal is an HTTP
  answer h11 frames, with ``Connection: close`` (:func:`closing`), and the connection closes after it; an
  acceptance (101) switches the connection, and what the client sent after its handshake becomes the
  WebSocket's first bytes.
"""

from __future__ import annotations

import dataclasses

import h11
from hypercorn.protocol.events import Data, Response
from hypercorn.protocol.h11 import STREAM_ID
from hypercorn.typing import H11SendableEvent

_WEBSOCKET_VERSION = b"13"


def is_websocket_handshake(request: h11.Request) -> bool:
    """Whether Hypercorn serves ``request`` as a WebSocket: a ``GET`` with ``Upgrade: websocket`` and an
    ``upgrade`` token in ``Connection`` (the last of each header, as Hypercorn reads them)."""
    if request.method.upper() != b"GET":
        return False
    upgrade = connection = b""
    for name, value in request.headers:  # h11 lower-cases the names
        if name == b"upgrade":
            upgrade = value
        elif name == b"connection":
            connection = value
    return upgrade.strip().lower() == b"websocket" and any(
        token.strip() == b"upgrade" for token in connection.lower().split(b",")
    )


def handshake_refusal(request: h11.Request) -> tuple[int, str, str, list[tuple[bytes, bytes]]] | None:
    """Why the WebSocket handshake ``request`` can never be accepted, as (status, code, message, extra
    headers); None when it can (the app then decides: route, key, origin, readiness)."""
    if request.http_version != b"1.1":
        return 400, "invalid_websocket_handshake", "a WebSocket handshake needs HTTP/1.1", []
    key = version = None
    body = False
    for name, value in request.headers:
        if name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            body = True
    if body:
        return 400, "invalid_websocket_handshake", "a WebSocket handshake has no body", []
    if not key:
        return 400, "invalid_websocket_handshake", "a WebSocket handshake needs Sec-WebSocket-Key", []
    if version is None or version.strip() != _WEBSOCKET_VERSION:
        message = "this server speaks WebSocket version 13 (Sec-WebSocket-Version: 13)"
        return 426, "unsupported_websocket_version", message, [(b"sec-websocket-version", _WEBSOCKET_VERSION)]
    return None


def closing(event: Response) -> Response:
    """``event`` (an answer that refuses a handshake) with ``Connection: close``."""
    if any(name.lower() == b"connection" and value.lower() == b"close" for name, value in event.headers):
        return event
    return dataclasses.replace(event, headers=[*event.headers, (b"connection", b"close")])


class PendingHandshake:
    """The connection of a WebSocket handshake: h11's until the app answers, the WebSocket's after a 101.

    Built once h11 has parsed the handshake's head and its end (a handshake has no body). Until the app
    has answered, whatever the client sends next waits in h11's buffer, unparsed (the protocol pauses
    its reading), and h11 frames the answer. After a 101 the bytes h11 held, and all that follow, are
    WebSocket data; after a refusal the connection closes (:func:`closing`).
    It offers what Hypercorn's protocol uses of a connection (as Hypercorn's ``H11WSConnection`` does).

    Args:
        connection: The h11 connection that parsed the handshake.
    """

    def __init__(self, connection: h11.Connection) -> None:
        self.h11_connection = connection
        self.buffer = bytearray()
        self.switched = False

    # What Hypercorn's protocol reads. Before the switch: h11's; after it: a WebSocket's (no HTTP state,
    # so the protocol never recycles the connection).
    @property
    def our_state(self) -> object:
        return None if self.switched else self.h11_connection.our_state

    @property
    def their_state(self) -> object:
        return None if self.switched else self.h11_connection.their_state

    they_are_waiting_for_100_continue = False

    def receive_data(self, data: bytes) -> None:
        if self.switched:
            self.buffer.extend(data)
        else:
            self.h11_connection.receive_data(data)

    def next_event(self) -> Data | type[h11.NEED_DATA] | type[h11.PAUSED]:
        if not self.switched:
            # Until the app has answered, nothing more is parsed (h11 keeps it); after a refusal the
            # connection closes and what the client sent after its handshake is never read.
            waiting = self.h11_connection.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
            return h11.PAUSED if waiting else h11.NEED_DATA
        if self.buffer:
            data = Data(stream_id=STREAM_ID, data=bytes(self.buffer))
            self.buffer = bytearray()
            return data
        return h11.NEED_DATA

    def send(self, event: H11SendableEvent) -> bytes:
        data = self.h11_connection.send(event) or b""
        if not self.switched and self.h11_connection.our_state is h11.SWITCHED_PROTOCOL:
            self.switched = True  # accepted: what h11 held is the WebSocket's
            self.buffer = bytearray(self.h11_connection.trailing_data[0])
        return data

    def start_next_cycle(self) -> None:
        self.h11_connection.start_next_cycle()


__all__ = ["PendingHandshake", "closing", "handshake_refusal", "is_websocket_handshake"]
