"""One accepted TCP connection: Hypercorn's Trio connection code with our protocol.

Hypercorn's ``TCPServer`` reads the socket and feeds its protocol; ours differs in one way:

- the protocol is always :class:`web.protocol.HTTP11Protocol` (no switch to HTTP/2).
"""

from __future__ import annotations

import trio
from hypercorn.config import Config
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from .protocol import HTTP11Protocol


class Connection(TCPServer):
    """Serve one accepted plain-TCP connection until it closes; ``await`` it (Hypercorn's interface).

    Args:
        app: The wrapped ASGI app (``hypercorn.utils.wrap_app``).
        config: Hypercorn's configuration.
        context: The worker's context (shared by every connection).
        state: The lifespan state handed to each request.
        stream: The accepted connection.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SocketStream,
    ) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self._socket_stream = stream

    async def run(self) -> None:
        socket = self._socket_stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = HTTP11Protocol(  # type: ignore[assignment]
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    False,
                    client,
                    server,
                    self.protocol_send,
                )
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()


__all__ = ["Connection"]
