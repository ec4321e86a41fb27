"""One accepted TCP connection: Hypercorn's Trio connection code with our protocol and a prompt goodbye.

Hypercorn's ``TCPServer`` reads the socket and feeds its protocol; ours differs in five ways:

- the protocol is always :class:`dspy_trio.web.protocol.HTTP11Protocol` (no switch to HTTP/2);
- a peer that reset the connection (or that TCP gave up on, see below) has its socket closed at once,
  and the WebSocket ping task of a connection whose peer is gone stops at once: Hypercorn's ping task
  sleeps out its interval (20 s) after the socket is dead, and held the file descriptor that long (a
  storm of 1,000 reset WebSockets left 509 descriptors open 8 s later);
- accepted sockets get TCP keep-alive and ``TCP_USER_TIMEOUT`` (``dead_peer_timeout``), so a peer that
  vanished without a reset (a dead host, a dropped route) is found by the kernel: an idle connection
  through keep-alive probes, a busy one (a WebSocket's pings, an SSE stream) when its data stays
  unacknowledged. Without them such a socket lives until TCP's retransmissions give up (~15 minutes);
- a socket write is shielded from cancellation as Hypercorn's is (a cancelled request never leaves half an
  answer on a kept-alive connection), but only until the server's shutdown deadline
  (:class:`ShieldedWrites`): Hypercorn's shield had no end, so a client that stopped reading held its
  write, and with it the graceful shutdown, until the client left;
- the keep-alive timer is one task for the connection's life, whose deadline each request moves (none
  while a request runs, ``keep_alive_timeout`` once the connection is idle again). Hypercorn cancelled
  its timer task and started a new one (``nursery.start``, behind a lock) at every request: about a
  tenth of the server's CPU for a cached answer. The timer closes an idle connection when it runs out,
  or when the server stops (``terminated``); a connection whose peer left ends it.
"""

from __future__ import annotations

import contextlib
import socket
from math import inf

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from .hosts import AllowedHosts
from .protocol import HTTP11Protocol

# Linux's ceilings (a larger value is EINVAL): keep-alive idle time and interval in seconds
# (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL), the probe count (MAX_TCP_KEEPCNT), and TCP_USER_TIMEOUT, an int
# of milliseconds (about 24.8 days).
_MAX_KEEPALIVE_SECONDS = 32767
_MAX_USER_TIMEOUT_MS = 2**31 - 1


def watch_for_dead_peers(sock: trio.socket.SocketType, timeout: float | None) -> None:
    """Have the kernel drop ``sock`` once its peer has been unreachable for about ``timeout`` seconds.

    Keep-alive probes start after half of it idle and three go unanswered within the other half;
    data left unacknowledged for ``timeout`` aborts the connection (``TCP_USER_TIMEOUT``). Either way
    the next read fails and the connection closes. ``None`` leaves the kernel's defaults. Each value is
    capped at the kernel's ceiling (keep-alive times at 32767 s, the user timeout at 2**31 - 1 ms), and
    each option is set on its own: one the platform lacks or refuses never costs the others.
    """
    if timeout is None:
        return
    idle = min(_MAX_KEEPALIVE_SECONDS, max(1, int(timeout / 2)))
    interval = min(_MAX_KEEPALIVE_SECONDS, max(1, int(timeout / 6)))
    user_timeout = min(_MAX_USER_TIMEOUT_MS, int(timeout * 1000))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), user_timeout),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):  # the peer may be gone already: the first read will say so
                sock.setsockopt(level, option, value)


class ShieldedWrites:
    """The server's socket writes in progress, shielded from cancellation until :meth:`end_by`'s deadline.

    One per server, shared by its connections. A write that outlives the deadline is abandoned and its
    connection closed (half a message cannot be finished); until then, cancelling a request never cuts
    its bytes short. Costs a set insertion and removal per write.
    """

    def __init__(self) -> None:
        self._deadline = inf
        self._active: set[trio.CancelScope] = set()

    def scope(self) -> trio.CancelScope:
        """A shielded scope for one write, ended by the deadline; :meth:`done` it after the write."""
        scope = trio.CancelScope(shield=True, deadline=self._deadline)
        self._active.add(scope)
        return scope

    def done(self, scope: trio.CancelScope) -> None:
        self._active.discard(scope)

    def end_by(self, deadline: float) -> None:
        """No write may outlast ``deadline`` (Trio clock): those in progress and those to come."""
        self._deadline = min(self._deadline, deadline)
        for scope in self._active:
            scope.deadline = min(scope.deadline, deadline)


class _ConnectionContext:
    """The worker's context as one connection sees it: the same worker-wide state, but its sleeps (the
    WebSocket ping task's) end as soon as the connection's peer is gone."""

    def __init__(self, worker: WorkerContext, gone: trio.Event) -> None:
        self._worker = worker
        self._gone = gone
        self.event_class = worker.event_class
        self.single_task_class = worker.single_task_class
        self.terminate = worker.terminate
        self.terminated = worker.terminated

    async def mark_request(self) -> None:
        await self._worker.mark_request()

    async def sleep(self, wait: float) -> None:
        with trio.move_on_after(wait):
            await self._gone.wait()

    @staticmethod
    def time() -> float:
        return trio.current_time()


class Connection(TCPServer):
    """Serve one accepted plain-TCP connection until it closes; ``await`` it (Hypercorn's interface).

    Args:
        app: The wrapped ASGI app (``hypercorn.utils.wrap_app``).
        config: Hypercorn's configuration.
        context: The worker's context (shared by every connection).
        state: The lifespan state handed to each request.
        stream: The accepted connection.
        writes: The server's writes (bounded by its shutdown); a connection of its own when omitted.
        hosts: The host names the server answers for (:mod:`dspy_trio.web.hosts`); None: any.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SocketStream,
        writes: ShieldedWrites | None = None,
        hosts: AllowedHosts | None = None,
    ) -> None:
        self._gone = trio.Event()
        super().__init__(app, config, _ConnectionContext(context, self._gone), state, stream)  # type: ignore[arg-type]
        self._socket_stream = stream
        self._writes = writes or ShieldedWrites()
        self._hosts = hosts
        # The keep-alive timer: its deadline is when the idle connection closes (none while busy).
        self._idle = trio.CancelScope(deadline=trio.current_time() + config.keep_alive_timeout)
        self._over = False  # the connection ended: the timer has nothing left to close

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):  # a request starts (busy), or the connection waits for the next
            self._idle.deadline = trio.current_time() + self.config.keep_alive_timeout if event.idle else inf
            return
        if not isinstance(event, RawData):
            if isinstance(event, Closed):
                self._end_idle_timer()
            await super().protocol_send(event)
            return
        async with self.send_lock:  # Hypercorn's, with a shield that ends at the server's deadline
            scope = self._writes.scope()
            try:
                with scope:
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            finally:
                self._writes.done(scope)
            if scope.cancelled_caught:  # abandoned part-way: nothing more can be framed on this socket
                self._socket_stream.socket.close()
                await self.protocol.handle(Closed())

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
                    hosts=self._hosts,
                )
                task_group.spawn(self._close_when_idle)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def _read_data(self) -> None:
        reset = False
        read_timeout = self.config.read_timeout  # none unless configured: then no cancel scope per read
        while True:
            try:
                if read_timeout:
                    with trio.fail_after(read_timeout):
                        data = await self.stream.receive_some(MAX_RECV)
                else:
                    data = await self.stream.receive_some(MAX_RECV)
            except trio.BrokenResourceError:  # reset, or given up on by TCP (keep-alive, user timeout)
                reset = True
                break
            except (trio.ClosedResourceError, trio.TooSlowError):
                break
            else:
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
        self._gone.set()  # the ping task, if any, stops sleeping
        self._end_idle_timer()
        if reset:  # nothing can be sent or received any more: give the descriptor back now
            await self._socket_stream.aclose()
        await self.protocol.handle(Closed())

    async def _close_when_idle(self) -> None:
        """The keep-alive timer: close the connection once it has been idle for ``keep_alive_timeout``,
        or at once when the server stops while it is idle. Blocks for the connection's life."""
        while True:
            with self._idle:
                await self.context.terminated.wait()
            idle_until = self._idle.deadline
            stopping = self.context.terminated.is_set()
            if self._over or (stopping and idle_until == inf):
                return  # it ended; or the server stops during a request, whose end closes it (the recycle)
            if stopping or trio.current_time() >= idle_until:
                break
            # It ran out as a request came (which moved the deadline before this task ran): a cancelled
            # scope stays cancelled, so watch the new deadline with a new one.
            self._idle = trio.CancelScope(deadline=idle_until)
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    def _end_idle_timer(self) -> None:
        self._over = True
        self._idle.cancel()


__all__ = ["Connection", "ShieldedWrites", "watch_for_dead_peers"]
