"""A keep-alive pool of HTTP/1.1 connections to one origin, with a connection cap and FIFO waiters.

Design (why it is this small): httpcore's pool re-examines every connection for every queued request on
each request start and end, which costs O(connections²) per event at high concurrency. Here the cap is a
``trio.Semaphore`` — its waiters are served first in, first out, and waiting for it is the pool wait —
and a token is held exactly while a connection is in use. Idle connections wait in a deque, newest on
the right: a request takes the newest (the one least likely to have been closed by the server), expiry
pops the oldest from the left. A new connection is opened only when no idle one is left, so open
connections never exceed the cap.

Idle connections are reaped on every acquire and release — those idle longer than ``idle_timeout`` are
closed, and the one about to be reused is first checked for a peer close (EOF readable while idle) and
discarded if so. A pool nobody uses is swept by :meth:`Pool.reap`, which the owner may call on a timer
(``LeanClient.reap_forever``), so sockets the server closed do not linger in CLOSE-WAIT.
"""

from __future__ import annotations

import ssl
from collections import deque

import attrs
import trio

from ._connection import Connection, Timeouts, open_connection
from ._errors import PoolTimeout
from ._network import NetworkBackend, Origin, SocketBackend


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool: connections ``active`` (in use) and ``idle``, requests ``waiting``."""

    active: int
    idle: int
    waiting: int
    opened: int


class Pool:
    """Connections to one origin; at most ``max_connections`` open at a time.

    Args:
        origin: Where to connect.
        max_connections: The cap on open connections (active and idle together).
        timeouts: ``connect`` for opening, ``pool`` for waiting on the cap.
        ssl_context: For ``https`` origins.
        idle_timeout: Seconds an idle connection is kept for reuse.
        network: Where connections are opened (the real network unless given).
    """

    def __init__(
        self,
        origin: Origin,
        max_connections: int,
        timeouts: Timeouts,
        ssl_context: ssl.SSLContext | None,
        idle_timeout: float = 5.0,
        network: NetworkBackend | None = None,
    ) -> None:
        self.origin = origin
        self.network: NetworkBackend = network or SocketBackend()
        self.timeouts = timeouts
        self.idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        self._slots = trio.Semaphore(max_connections)
        self._max = max_connections
        self._idle: deque[Connection] = deque()
        self._opened = 0
        self._closed = False

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            active=self._max - self._slots.value,
            idle=len(self._idle),
            waiting=self._slots.statistics().tasks_waiting,
            opened=self._opened,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        origin = f"{self.origin.scheme}://{self.origin.host}:{self.origin.port}"
        return f"<Pool {origin} [{s.active} active, {s.idle} idle, {s.waiting} waiting | {s.opened} opened]>"

    async def acquire(self) -> Connection:
        """A connection for one exchange: a live idle one, or a new one. Blocks while all
        ``max_connections`` are in use (first come, first served), then while connecting.
        Hand it back with :meth:`release` whatever happens.

        Raises:
            PoolTimeout: no connection became free within ``timeouts.pool``.
            ConnectTimeout, ConnectError: opening a new connection failed.
        """
        if self._slots.value == 0:
            with trio.move_on_after(self.timeouts.pool) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise PoolTimeout(f"no free connection within {self.timeouts.pool}s")
        else:
            await self._slots.acquire()
        try:
            self._expire(trio.current_time())
            while self._idle:
                connection = self._idle.pop()
                if not connection.peer_gone():
                    return connection
                connection.close()
            connection = await open_connection(self.origin, self.timeouts, self._ssl_context, self.network)
            self._opened += 1
            return connection
        except BaseException:
            self._slots.release()
            raise

    def release(self, connection: Connection) -> None:
        """Take back a connection from :meth:`acquire`: kept for reuse if its exchange completed and it
        may carry another, closed otherwise (a cancelled or failed exchange always closes it)."""
        now = trio.current_time()
        if connection.reusable and not self._closed:
            connection.h11.start_next_cycle()
            connection.idle_since = now
            self._idle.append(connection)
        else:
            connection.close()
        self._slots.release()
        self._expire(now)

    def reap(self) -> int:
        """Close idle connections that expired or that the server closed; returns how many. Synchronous:
        one ``poll`` syscall per idle connection."""
        self._expire(trio.current_time())
        alive = deque(connection for connection in self._idle if not connection.peer_gone())
        reaped = len(self._idle) - len(alive)
        for connection in self._idle:
            if connection not in alive:
                connection.close()
        self._idle = alive
        return reaped

    def _expire(self, now: float) -> None:
        while self._idle and now - self._idle[0].idle_since >= self.idle_timeout:
            self._idle.popleft().close()

    def close(self) -> None:
        """Close idle connections and stop keeping new ones (active ones close when released)."""
        self._closed = True
        while self._idle:
            self._idle.popleft().close()
