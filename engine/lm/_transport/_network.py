"""Where the lean transport's bytes go: a network backend opens byte streams to an origin.

The transport above (``_connection``, ``_pool``, ``_client``) speaks HTTP/1.1 with h11 and never names a
socket: it asks a :class:`NetworkBackend` for a :class:`NetworkStream` and sends, receives, closes and
polls through it. :class:`SocketBackend` is the real one (TCP, TLS with SNI); ``_memory.MockBackend``
answers from scripted bytes without a socket, so the default transport runs in fast tests (httpcore's
``_backends`` have the same shape).

A stream's contract is the one the transport relies on for cancellation: :meth:`NetworkStream.close` is
synchronous and immediate (the peer sees the close within a scheduler tick, with no shielded cleanup to
bound), and a broken or closed stream raises ``trio.BrokenResourceError`` / ``trio.ClosedResourceError``
like any ``trio.abc.Stream``.
"""

from __future__ import annotations

import select
import ssl
from typing import Protocol

import attrs
import trio

from ._errors import ConnectError


@attrs.frozen
class Origin:
    """Where connections go: ``scheme`` (``http``/``https``), ``host`` and ``port``."""

    scheme: str
    host: str
    port: int


class NetworkStream(Protocol):
    """One open connection's bytes."""

    async def send_all(self, data: bytes, /) -> None:
        """Send every byte; blocks until the kernel (or the peer) took them all."""

    async def receive_some(self, max_bytes: int, /) -> bytes | bytearray:
        """Up to ``max_bytes`` bytes, ``b""`` once the peer ended its side; blocks while it is silent."""

    def close(self) -> None:
        """Close now, without awaiting (the peer sees EOF or RST at once). Idempotent."""

    def readable(self) -> bool:
        """Whether a receive would return at once (bytes, or the peer's EOF): on an idle keep-alive
        connection, that the peer closed it or sent what nobody asked for. Never blocks."""


class NetworkBackend(Protocol):
    """Opens the streams of the lean transport's connections."""

    async def connect(self, origin: Origin, ssl_context: ssl.SSLContext | None) -> NetworkStream:
        """A stream to ``origin`` (TLS with ``ssl_context`` for ``https``). Blocks for the connect and
        the handshake; the caller bounds it with its connect timeout.

        Raises:
            ConnectError: refused, unreachable, unresolvable, or the TLS handshake failed.
        """
        ...


class SocketStream:
    """A connected TCP socket, with TLS over it or not. Sending and receiving are the Trio stream's own
    bound methods (no layer in between on the hot path); closing closes the socket itself."""

    __slots__ = ("_socket", "receive_some", "send_all")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.send_all = stream.send_all
        self.receive_some = stream.receive_some
        self._socket = _raw_socket(stream)

    def __repr__(self) -> str:
        return f"<SocketStream fd={self._socket.fileno()}>"

    def close(self) -> None:
        self._socket.close()

    def readable(self) -> bool:
        """One ``poll`` syscall."""
        poller = select.poll()
        poller.register(self._socket.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))


class SocketBackend:
    """The real network: ``trio.open_tcp_stream``, then a TLS handshake with SNI for ``https``."""

    async def connect(self, origin: Origin, ssl_context: ssl.SSLContext | None) -> SocketStream:
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
            stream = tcp
            if origin.scheme == "https":
                assert ssl_context is not None
                tls = trio.SSLStream(tcp, ssl_context, server_hostname=origin.host, https_compatible=True)
                stream = tls
                await tls.do_handshake()
        except (OSError, trio.BrokenResourceError) as exc:
            if stream is not None:
                _raw_socket(stream).close()
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {cause}") from exc
        except BaseException:
            if stream is not None:
                _raw_socket(stream).close()
            raise
        return SocketStream(stream)


def _raw_socket(stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> trio.socket.SocketType:
    tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    return tcp.socket
