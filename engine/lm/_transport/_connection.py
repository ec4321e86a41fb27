"""One HTTP/1.1 connection: a network stream (a TCP or TLS socket, or an in-memory peer) driven by an
``h11.Connection``.

The connection never spawns a task and never awaits in its cleanup: :meth:`Connection.close` closes the
stream synchronously (no TLS ``close_notify``; HTTP's own framing already protects against a truncated
body). So a cancelled request closes its socket at the moment the ``Cancelled`` exception passes
through, with no shielded cleanup to bound — the upstream sees the close within a scheduler tick.

Timeouts are one cancel scope per exchange (:class:`ExchangeTimer`) whose deadline each phase moves: to
``write`` seconds from now while the request is sent, then to ``read`` seconds from now before every
read, so ``read`` bounds the silence between two reads, not the whole body (a long stream stays alive as
long as it makes progress). One scope, not one per phase: entering and leaving a cancel scope is among
the costliest things a request does in Trio.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

import attrs
import h11
import trio

from ._errors import (
    ConnectTimeout,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    WriteError,
    WriteTimeout,
)
from ._network import NetworkBackend, NetworkStream, Origin

READ_SIZE = 65536


@attrs.frozen
class Timeouts:
    """Seconds each phase of an exchange may take (``math.inf`` for no limit).

    Attributes:
        connect: Opening the TCP connection and the TLS handshake.
        read: Silence between two reads of the response.
        write: Sending the whole request.
        pool: Waiting for a free connection when all are busy.
    """

    connect: float = 10.0
    read: float = 120.0
    write: float = 30.0
    pool: float = 30.0


class ExchangeTimer:
    """The one cancel scope of an exchange and which phase its deadline bounds now.

    Enter :attr:`scope` around the exchange; :meth:`writing` and :meth:`reading` move its deadline;
    when the scope fired, :meth:`error` is the timeout to raise.
    """

    __slots__ = ("phase", "scope", "timeouts")

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.scope = trio.CancelScope()
        self.phase = "write"

    def writing(self) -> None:
        self.phase = "write"
        self.scope.deadline = trio.current_time() + self.timeouts.write

    def reading(self, limit: float = math.inf) -> None:
        """Allow ``timeouts.read`` seconds for the next read, but never past ``limit``."""
        self.phase = "read"
        self.scope.deadline = min(trio.current_time() + self.timeouts.read, limit)

    def pause(self) -> None:
        """No deadline while the caller's own code runs (a stream's consumer). Set once per read, not
        per event: setting a deadline is not free."""
        if self.scope.deadline != math.inf:
            self.scope.deadline = math.inf

    def error(self) -> WriteTimeout | ReadTimeout:
        if self.phase == "write":
            return WriteTimeout(f"request not sent within {self.timeouts.write}s")
        return read_timeout_error(self.timeouts.read)


async def open_connection(
    origin: Origin, timeouts: Timeouts, ssl_context: ssl.SSLContext | None, network: NetworkBackend
) -> Connection:
    """Open a connection to ``origin`` through ``network`` (TLS with SNI for ``https``). Blocks for the
    connect and handshake.

    Raises:
        ConnectTimeout: not open within ``timeouts.connect``.
        ConnectError: refused, unreachable, unresolvable, or the TLS handshake failed.
    """
    stream: NetworkStream | None = None
    with trio.move_on_after(timeouts.connect) as scope:
        stream = await network.connect(origin, ssl_context)
    if scope.cancelled_caught or stream is None:
        if stream is not None:
            stream.close()
        raise ConnectTimeout(f"no connection to {origin.host}:{origin.port} within {timeouts.connect}s")
    return Connection(stream, timeouts)


class Connection:
    """An open HTTP/1.1 connection, used by one exchange at a time (the pool sees to that).

    Args:
        stream: The connected stream (a socket, or the in-memory backend's).
        timeouts: ``write`` bounds :meth:`send`, ``read`` each read of :meth:`next_event`.
    """

    def __init__(self, stream: NetworkStream, timeouts: Timeouts) -> None:
        self.stream = stream
        self.timeouts = timeouts
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.closed = False
        self.eof = False  # the peer ended its side: nothing more can come on this connection

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.h11.our_state}/{self.h11.their_state}"
        return f"<Connection {self.stream!r} {state}>"

    def close(self) -> None:
        """Close the socket now (synchronous; the peer sees EOF or RST at once). Idempotent."""
        if not self.closed:
            self.closed = True
            self.stream.close()

    def peer_gone(self) -> bool:
        """Whether the idle connection cannot carry a request: closed, the peer closed it (EOF is
        readable), or the peer sent bytes nobody asked for. Costs one ``poll`` syscall on a socket."""
        if self.closed or self.h11.our_state is not h11.IDLE or self.h11.trailing_data[0]:
            return True
        return self.stream.readable()

    @property
    def reusable(self) -> bool:
        """After a complete exchange: both sides are done, neither asked to close, and the body did not
        end with the connection (a response framed by EOF, as HTTP/1.0 bodies are)."""
        if self.closed or self.eof:
            return False
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def send(self, data: bytes, timer: ExchangeTimer) -> None:
        """Send the whole request in one ``send_all``, ``timer``'s deadline ``timeouts.write`` from now
        (the caller turns that scope's cancellation into ``timer.error()``, a :class:`WriteTimeout`).
        Blocks until the kernel took every byte.

        Raises:
            WriteError: the connection broke.
        """
        timer.writing()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WriteError(f"connection broke while sending: {exc.__cause__ or exc}") from exc

    async def next_event(self, timer: ExchangeTimer, limit: float = math.inf) -> Any:
        """The next h11 event of the response, reading from the socket as needed; every read first moves
        ``timer``'s deadline to ``timeouts.read`` seconds from now, or to ``limit`` if sooner (the caller
        turns that scope's cancellation into ``timer.error()``, a :class:`ReadTimeout`). Blocks while
        the peer is silent.

        Raises:
            ReadError: the connection broke.
            RemoteProtocolError: the response is not valid HTTP/1.1, or the peer closed it early.
        """
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise RemoteProtocolError(f"invalid response: {exc}") from exc
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise RemoteProtocolError("the server closed the connection without a complete response")
                return event
            timer.reading(limit)
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ReadError(f"connection broke while reading: {exc.__cause__ or exc}") from exc
            self.eof = not data
            self.h11.receive_data(bytes(data))


def read_timeout_error(timeout: float) -> ReadTimeout:
    return ReadTimeout(f"no data from the server for {timeout}s")
