"""The serving process: the app on Hypercorn's connection code through our own listener, signals, a drain
before shutdown, logging, and the checks and settings around them.

The listener (``web/listener.py``) accepts connections, contains the failure of any one of them, speaks
HTTP/1.1 and WebSocket only (``web/protocol.py``) and lets dead peers go at once (``web/connection.py``);
the keep-alive guard (``web/keepalive.py``) wraps the app, whose ASGI entry is the front door
(``web/door.py``).

On SIGTERM or SIGINT (or :meth:`Server.shutdown`) the service drains (``web/service.py``, which owns its
life: ``/ready`` turns 503 and the engine refuses new requests; in-flight ones get ``drain_timeout``
seconds to finish, and the rest are cancelled with a typed ``engine_closed`` error, an error event on
streams). Only then is Hypercorn told to stop, so no connection is cut in the middle of an answer; then
the process exits.

``--workers N`` starts N such processes on one port (``SO_REUSEPORT``; the kernel spreads connections),
supervised by the parent (``web/workers.py``: a worker that dies is restarted, SIGTERM drains them all,
``/metrics`` covers all of them). Each has its own engine and limits, unless ``DSPY_TRIO_REDIS_URL`` makes
the workers (and replicas) share their upstream quotas, cool-downs and cancels (``dspy_trio.engine.cluster``).
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
from hypercorn.config import Config as HypercornConfig

from dspy_trio.engine import GCSettings, tune_gc_for_serving
from dspy_trio.engine._groups import collapse  # the engine's one rule for keeping groups out of APIs
from dspy_trio.engine.lm import TrioLM

from .app import create_app
from .keepalive import KeepAliveGuard
from .listener import serve_app
from .routing import Route
from .service import Service
from .settings import ServiceSettings
from .workers import run_snapshots, supervise, workers_dir

logger = logging.getLogger("dspy_trio.web")


def hypercorn_config(settings: ServiceSettings, *, worker_count: int = 1) -> HypercornConfig:
    """Hypercorn's configuration for the service: bind, backlog, timeouts, WebSocket limits, no logs."""
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.workers = worker_count  # >1 makes Hypercorn bind with SO_REUSEPORT
    config.backlog = 4096  # Hypercorn's default (100) resets connections in a burst of 1,000 clients
    config.websocket_ping_interval = settings.ws_ping_interval or None
    # The engine has drained before the listener is asked to stop, so this only bounds the flushing of
    # the last responses and the life of WebSockets still open (they are closed when it ends).
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = settings.keep_alive_timeout  # idle keep-alive connections close after it
    # Frames over the limit get an error frame from the app; only far larger ones close the socket (1009).
    config.websocket_max_message_size = 4 * settings.max_body_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


class _EngineFailed(Exception):
    """Ends serving when the engine failed to open (the failure itself is in the service state)."""


@attrs.define
class Server:
    """A running service: its URL, its state (the :class:`dspy_trio.web.service.Service`), and a way to
    stop it as SIGTERM would."""

    url: str
    state: Service

    def shutdown(self) -> None:
        """Begin the graceful shutdown (drain, then stop). Returns at once."""
        self.state.request_stop()


async def serve(
    settings: ServiceSettings,
    *,
    lms: Mapping[str, TrioLM] | None = None,
    handle_signals: bool = True,
    worker_count: int = 1,
    freeze_heap: bool = True,
    routes: Sequence[Route] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT or :meth:`Server.shutdown`; supports ``nursery.start``.

    With ``freeze_heap`` (the serving process's default), once the app has started the heap built at
    start-up (the app, the engine, DSPy, pydantic) is collected once and moved out of the garbage
    collector's reach with ``gc.freeze()``, and the young generation's threshold is raised to 10,000
    (``dspy_trio.engine.tune_gc_for_serving``), so full collections do not walk that heap and stall the event
    loop, and young ones stop re-walking the requests in flight. ``open_server`` (tests,
    embedding) does not do it: a process-wide GC setting is the serving process's call.

    Blocks for the life of the server, including the drain (and for one full collection at start-up).
    """
    app = create_app(settings, lms=lms, routes=routes)
    service = app.service
    signals_scope = trio.CancelScope()

    async def watch_signals() -> None:
        with signals_scope, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                service.request_stop()
                return

    engine_config = settings.engine
    limited = any(lm.rate_limit.rpm or lm.rate_limit.tpm for lm in engine_config.lms.values())
    if worker_count > 1 and limited and not engine_config.cluster.redis_url:
        logger.warning(
            "%d workers and no DSPY_TRIO_REDIS_URL: each worker applies the full RPM/TPM limits, so the "
            "upstream may see up to %d times its quota (set DSPY_TRIO_REDIS_URL to share it)",
            worker_count,
            worker_count,
        )

    snapshots_scope = trio.CancelScope()

    async def snapshots(directory: Path) -> None:
        with snapshots_scope:
            await run_snapshots(directory, lambda: service.engine)

    tuned_gc: GCSettings | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.drain_when_asked)
            if (directory := workers_dir()) is not None:
                nursery.start_soon(snapshots, directory)
            if handle_signals:
                nursery.start_soon(watch_signals)
            config = hypercorn_config(settings, worker_count=worker_count)
            guarded = KeepAliveGuard(  # around the front door itself: Quart's __call__ adds nothing
                app.door, max_body_bytes=settings.max_body_bytes, drain_timeout=settings.keep_alive_timeout
            )
            binds = await nursery.start(
                functools.partial(
                    serve_app,
                    guarded,
                    config,
                    dead_peer_timeout=settings.dead_peer_timeout,
                    allowed_hosts=settings.allowed_hosts,
                    shutdown_trigger=service.drained,
                )
            )
            if service.failure is not None:  # the engine did not open: Hypercorn would serve 503s forever
                service.request_stop()
                raise _EngineFailed
            if freeze_heap:  # Hypercorn has run the app's start-up (the engine is open) by now
                tuned_gc = tune_gc_for_serving()
            task_status.started(Server(binds[0], service))
            logger.info("serving on %s", binds[0])
            await service.drained()
            signals_scope.cancel()  # Hypercorn now closes its connections and ends the lifespan itself
            snapshots_scope.cancel()
    except BaseException as exc:
        # Hypercorn echoes the engine's failure (LifespanFailureError): the caller sees one error, ours.
        if service.failure is None or isinstance(exc, trio.Cancelled):
            raise
        logger.debug("serving ended by the engine's failure", exc_info=exc)
    finally:
        if tuned_gc is not None:  # the process may go on (tests, an embedding app): let it all be collected
            tuned_gc.restore()
    if service.failure is not None:
        raise RuntimeError(f"the engine failed: {service.failure}") from service.failure
    logger.info("stopped")


@asynccontextmanager
async def open_server(
    settings: ServiceSettings,
    *,
    lms: Mapping[str, TrioLM] | None = None,
    routes: Sequence[Route] | None = None,
) -> AsyncIterator[Server]:
    """Run the service in the background for the block (tests, embedding); drains it on exit.

    An exception raised in the block reaches the caller as itself, not wrapped in an exception group.
    """
    try:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                functools.partial(
                    serve, settings, lms=lms, handle_signals=False, freeze_heap=False, routes=routes
                )
            )
            try:
                yield server
            finally:
                server.shutdown()
    except BaseExceptionGroup as group:
        raise collapse(group) from None


def run_workers(argv: Sequence[str], workers: int) -> int:
    """Start ``workers`` serving processes on one port and supervise them (see ``web/workers.py``)."""
    return supervise(argv, workers)
