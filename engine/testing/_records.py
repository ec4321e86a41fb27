"""What the fake upstream saw: one record per request, and the kept-alive connections it closed."""

from __future__ import annotations

from typing import Any

import attrs

from ._faults import FaultKind


@attrs.define
class IdleClose:
    """A kept-alive connection the fake upstream closed for idleness.

    Attributes:
        closed_at: When the upstream closed its end (Trio's clock).
        client_closed_at: When the client closed its end in turn (None while it keeps it open: the
            client's socket then sits in CLOSE-WAIT).
    """

    closed_at: float
    client_closed_at: float | None = None


@attrs.define
class RequestRecord:
    """What the fake upstream saw of one request.

    Attributes:
        index: Arrival order, from 0.
        path: The request path.
        body: The parsed JSON body (None if it was not JSON).
        headers: The request's headers (names lower-case).
        stream: Whether the client asked for a stream.
        fault: The fault applied, if any.
        status: The status answered (None before the answer started).
        received_at: When the request was read in full.
        completed_at: When the answer was sent in full.
        client_closed_at: When the client closed the connection before the answer was complete.
        aborted: Whether the fake upstream itself cut the connection (the ``disconnect`` fault).
        client_closed_wall, completed_wall: The same moments on the wall clock (``time.time()``), for
            comparing with another process's observations.
        tokens_sent: Stream tokens written to the socket.
        bytes_sent: Bytes of the answer written to the socket (head, body and framing, as sent).
        body_bytes: Bytes of the answer's body (as encoded, without the framing).
    """

    index: int
    path: str
    body: Any
    stream: bool
    fault: FaultKind | None
    received_at: float
    headers: dict[str, str] = attrs.field(factory=dict)
    status: int | None = None
    completed_at: float | None = None
    client_closed_at: float | None = None
    aborted: bool = False
    tokens_sent: int = 0
    bytes_sent: int = 0
    body_bytes: int = 0
    client_closed_wall: float | None = None
    completed_wall: float | None = None

    @property
    def ended(self) -> bool:
        return self.completed_at is not None or self.client_closed_at is not None or self.aborted

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)
