"""Serving an ASGI app with Hypercorn's Trio connection code, through our own accept loop.

Our equivalent of ``hypercorn.trio.serve`` (``worker_serve``): the same lifespan, sockets, graceful
shutdown (on the shutdown trigger the listeners close, then open connections get
``config.graceful_timeout`` seconds) and ``task_status`` (the bound URLs). It differs where Hypercorn's
lets one connection end the server:

- **A connection's failure ends that connection only.** Hypercorn runs every connection handler in
  one nursery with ``trio.serve_listeners``: any exception a connection's code raises (Hypercorn's h2
  protocol raised ``KeyError`` on a DATA frame for a stream it had answered) crashes that nursery, and
  with it every connection in flight and the process. Here each connection runs inside a guard that
  logs the failure (rate-limited: :class:`dspy_trio.web.rate_limited_log.RateLimitedLog`) and closes the
  socket. Only ``Exception`` is caught: ``trio.Cancelled`` (shutdown, a deadline), ``KeyboardInterrupt`` and
  ``SystemExit`` pass through untouched, also inside exception groups.
- **Tracebacks are one per kind of failure, then a line per interval.** Only failures that reached the
  guard were rate-limited: a failure in the app's task was logged with its full traceback by Hypercorn
  (``Error in ASGI Framework``), Quart and the app, per connection (about 3.5 KB of log a connection a
  hostile client could repeat). While serving, those loggers' tracebacks go to the same rate-limited
  log, one kind per exception type and the line that raised it.
- **Accept failures are one log line per interval.** At the descriptor limit (``EMFILE``) ``accept``
  fails until a connection closes; ``trio.serve_listeners`` logged a full traceback every 0.1 s
  while it retried. We retry as often, and log a line per interval with the count.
- **Connections are** :class:`dspy_trio.web.connection.Connection` **(HTTP/1.1 only)**, with TCP keep-alive
  and ``TCP_USER_TIMEOUT`` set from ``dead_peer_timeout``, and a ``Host`` check (DNS rebinding) when bound
  to loopback: :mod:`dspy_trio.web.hosts`.
- **The graceful timeout ends socket writes too.** Hypercorn shields each write from cancellation with
  no end, so a client that stopped reading held the shutdown until it left; here the shield ends at
  the shutdown's deadline (:class:`dspy_trio.web.connection.ShieldedWrites`) and that connection closes.

Each connection costs one ``try``, one closure and five ``setsockopt`` calls more than Hypercorn's, each
write a set insertion and removal; a request costs less (the head check is one pass over the header
names, without Hypercorn's decoding).
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from .connection import Connection, ShieldedWrites, watch_for_dead_peers
from .hosts import AllowedHosts
from .rate_limited_log import RateLimitedLog, RateLimitedTracebacks

logger = logging.getLogger("dspy_trio.web")

# accept(2) errors that mean "out of a resource for now, try again" (as trio.serve_listeners).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY = 0.1  # seconds between two accepts that failed for capacity (trio's)
LOG_INTERVAL = 10.0  # seconds between two lines about the same kind of failure
# Where a connection's work logs tracebacks: Hypercorn, for a failure of the app's task; the service
# (web/app.py's 500s); Quart (its app.logger is named after web/app.py).
TRACEBACK_LOGGERS = ("hypercorn.error", "dspy_trio.web", "dspy_trio.web.app")

ConnectionHandler = Callable[[trio.SocketStream], Awaitable[object]]


async def serve_connection(
    handler: ConnectionHandler, stream: trio.SocketStream, problems: RateLimitedLog
) -> None:
    """Run ``handler(stream)``; if it fails, log that (rate-limited) instead of raising. Closes ``stream``.

    Blocks until the handler returns. Re-raises only what is not an ``Exception`` (``trio.Cancelled``,
    ``KeyboardInterrupt``, ...), alone or in a group with the failures it logged.
    """
    try:
        await handler(stream)
    except* Exception as failures:
        peer = _peer(stream)
        for failure in _leaves(failures):
            kind = type(failure).__name__
            problems.record(
                f"connection:{kind}",
                f"a connection from {peer} failed and was closed: {kind}: {_short(failure)}",
                error=failure,
            )
    finally:
        await trio.aclose_forcefully(stream)


async def accept_connections(
    listener: trio.abc.Listener[trio.SocketStream],
    handler: ConnectionHandler,
    connections: trio.Nursery,
    problems: RateLimitedLog,
) -> NoReturn:
    """Accept connections on ``listener`` forever, each served in ``connections`` by ``handler``.

    Capacity errors (``EMFILE``, ``ENFILE``, ``ENOMEM``, ``ENOBUFS``) are logged (rate-limited) and
    retried every ``ACCEPT_RETRY_DELAY`` seconds; any other error ends the loop. Closes ``listener`` on
    the way out.
    """
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                name = errno.errorcode.get(exc.errno, str(exc.errno))
                problems.record(
                    f"accept:{name}",
                    f"cannot accept connections: {name} ({os.strerror(exc.errno)}); "
                    f"retrying every {ACCEPT_RETRY_DELAY:g} s",
                )
                await trio.sleep(ACCEPT_RETRY_DELAY)
            else:
                connections.start_soon(serve_connection, handler, stream, problems)


async def serve_app(
    app: object,
    config: Config,
    *,
    dead_peer_timeout: float | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    traceback_loggers: Sequence[str] = TRACEBACK_LOGGERS,
    allowed_hosts: Sequence[str] = (),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` on ``config.bind`` (plain TCP) until ``shutdown_trigger`` returns.

    Requests must name this server in ``Host`` when it is bound to loopback (or ``allowed_hosts`` lists
    names): :class:`dspy_trio.web.hosts.AllowedHosts`, with ``allowed_hosts`` as the names it adds.

    While connections are served, the ERROR records with a traceback logged to ``traceback_loggers``
    are rate-limited as the connections' own failures are (:class:`RateLimitedTracebacks`).

    Supports ``nursery.start`` (started with the bound URLs, after the app's lifespan start-up). Blocks
    for the life of the server: the start-up, serving, the graceful close of open connections
    (``config.graceful_timeout``) and the lifespan shutdown. Raises ``ValueError`` if ``config`` asks
    for TLS or QUIC (not served: put a TLS-terminating proxy in front).
    """
    if config.ssl_enabled or config.quic_bind:
        raise ValueError("TLS and QUIC are not served: put a TLS-terminating proxy in front")
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    max_requests = None  # as Hypercorn: a worker stops after this many requests (with jitter), if set
    if config.max_requests is not None:
        max_requests = config.max_requests + random.randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)
    problems = RateLimitedLog(logger, interval=LOG_INTERVAL)
    writes = ShieldedWrites()
    hosts: AllowedHosts | None = None  # known once the sockets are bound

    async def connection(stream: trio.SocketStream) -> None:
        watch_for_dead_peers(stream.socket, dead_peer_timeout)
        state = ConnectionState(lifespan_state.copy())
        await Connection(wrapped, config, context, state, stream, writes, hosts)

    async with trio.open_nursery() as lifespan_nursery:
        lifespan_nursery.start_soon(problems.run)  # until the very end: it writes what is left when cancelled
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        with RateLimitedTracebacks(problems).installed(traceback_loggers):
            async with trio.open_nursery() as connections:
                sockets = config.create_sockets()
                listeners, binds = [], []
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)
                    listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                    binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                    await config.log.info(f"Running on {binds[-1]} (CTRL + C to quit)")
                addresses = [sock.getsockname()[0] for sock in sockets.insecure_sockets]
                hosts = AllowedHosts.for_server(addresses, allowed_hosts)
                task_status.started(binds)
                try:
                    async with trio.open_nursery() as serving:
                        if shutdown_trigger is not None:
                            serving.start_soon(raise_shutdown, shutdown_trigger)
                        serving.start_soon(raise_shutdown, context.terminate.wait)
                        for listener in listeners:
                            serving.start_soon(
                                accept_connections, listener, connection, connections, problems
                            )
                except BaseExceptionGroup as error:
                    _, others = error.split((ShutdownError, KeyboardInterrupt))
                    if others is not None:
                        raise others from None  # the failures, without the shutdown that ended serving
                finally:
                    await context.terminated.set()
                    connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
                    writes.end_by(connections.cancel_scope.deadline)  # a client that stops reading too
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    leaves: list[Exception] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (AttributeError, OSError, ValueError):  # gone already, or not a socket
        return "a peer that left"
    return f"{host}:{port}"


def _short(error: BaseException, limit: int = 200) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "TRACEBACK_LOGGERS",
    "accept_connections",
    "serve_app",
    "serve_connection",
]
