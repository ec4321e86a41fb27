"""Running the service on Hypercorn's Trio worker, with a drain before shutdown.

On SIGTERM or SIGINT (or :meth:`Server.shutdown`): ``/ready`` turns 503 and the engine refuses new
requests; in-flight ones get ``drain_timeout`` seconds to finish, and the rest are cancelled with a typed
``engine_closed`` error (an error event on streams). Only then is Hypercorn told to stop, so no
connection is cut in the middle of an answer; then the process exits.

``--workers N`` starts N such processes on one port (``SO_REUSEPORT``; the kernel spreads connections),
supervised by the parent (``web/workers.py``: a worker that dies is restarted, SIGTERM drains them all,
``/metrics`` covers all of them). Each has its own engine and limits, unless ``DSPY_TRIO_REDIS_URL`` makes
the workers (and replicas) share their upstream quotas, cool-downs and cancels (``engine.cluster``).
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from engine._groups import collapse  # the engine's one rule for keeping groups out of APIs
from engine.lm import TrioLM

from .app import create_app
from .keepalive import KeepAliveGuard
from .settings import ServiceSettings
from .state import ServiceState
from .workers import run_snapshots, supervise, workers_dir

logger = logging.getLogger("web")


def hypercorn_config(settings: ServiceSettings, *, worker_count: int = 1) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.workers = worker_count  # >1 makes Hypercorn bind with SO_REUSEPORT
    config.backlog = 4096  # Hypercorn's default (100) resets connections in a burst of 1,000 clients
    config.websocket_ping_interval = settings.ws_ping_interval or None
    # The engine has drained before Hypercorn is asked to stop, so this only bounds the flushing of the
    # last responses, and the wait for Hypercorn's WebSocket ping tasks, which outlive closed sockets.
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = settings.keep_alive_timeout  # idle keep-alive connections close after it
    # Frames over the limit get an error frame from the app; only far larger ones close the socket (1009).
    config.websocket_max_message_size = 4 * settings.max_body_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


@attrs.define
class Server:
    """A running service: its URL, and a way to stop it as SIGTERM would."""

    url: str
    state: ServiceState
    _stop: trio.Event

    def shutdown(self) -> None:
        """Begin the graceful shutdown (drain, then stop). Returns at once."""
        self._stop.set()


async def serve(
    settings: ServiceSettings,
    *,
    lms: Mapping[str, TrioLM] | None = None,
    handle_signals: bool = True,
    worker_count: int = 1,
    freeze_heap: bool = True,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT or :meth:`Server.shutdown`; supports ``nursery.start``.

    With ``freeze_heap`` (the serving process's default), the heap built at start-up (the app, the
    engine, DSPy, pydantic) is collected once and moved out of the garbage collector's reach with
    ``gc.freeze()`` once the app has started, so later full collections do not walk it and stall the
    event loop (issue #13: worst loop stall ~200 ms -> ~65 ms). ``open_server`` (tests, embedding) does
    not do it: a process-wide GC setting is the serving process's call.

    Blocks for the life of the server, including the drain (and for one full collection at start-up).
    """
    app = create_app(settings, lms=lms)
    state: ServiceState = app.extensions["dspy_trio"]
    stop = trio.Event()
    stopped = trio.Event()

    async def drain_then_stop() -> None:
        await stop.wait()
        logger.info("shutting down: draining in-flight requests")
        state.draining = True
        if state.engine is not None:
            await state.engine.drain()
        stopped.set()

    signals_scope = trio.CancelScope()

    async def watch_signals() -> None:
        with signals_scope, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
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
            await run_snapshots(directory, lambda: state.engine)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_then_stop)
        if (directory := workers_dir()) is not None:
            nursery.start_soon(snapshots, directory)
        if handle_signals:
            nursery.start_soon(watch_signals)
        config = hypercorn_config(settings, worker_count=worker_count)
        guarded = KeepAliveGuard(
            app, max_body_bytes=settings.max_body_bytes, drain_timeout=settings.keep_alive_timeout
        )
        binds = await nursery.start(
            functools.partial(hypercorn_serve, guarded, config, shutdown_trigger=stopped.wait)
        )
        if freeze_heap:  # Hypercorn has run the app's start-up (the engine is open) by now
            gc.collect()
            gc.freeze()
        task_status.started(Server(binds[0], state, stop))
        logger.info("serving on %s", binds[0])
        await stopped.wait()
        signals_scope.cancel()  # Hypercorn now closes its connections and ends the lifespan itself
        snapshots_scope.cancel()
    logger.info("stopped")


@asynccontextmanager
async def open_server(
    settings: ServiceSettings, *, lms: Mapping[str, TrioLM] | None = None
) -> AsyncIterator[Server]:
    """Run the service in the background for the block (tests, embedding); drains it on exit.

    An exception raised in the block reaches the caller as itself, not wrapped in an exception group.
    """
    try:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                functools.partial(serve, settings, lms=lms, handle_signals=False, freeze_heap=False)
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
