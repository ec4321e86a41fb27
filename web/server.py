"""Running the service on Hypercorn's Trio worker, with a drain before shutdown.

On SIGTERM or SIGINT (or :meth:`Server.shutdown`): ``/ready`` turns 503 and the engine refuses new
requests; in-flight ones get ``drain_timeout`` seconds to finish, and the rest are cancelled with a typed
``engine_closed`` error (an error event on streams). Only then is Hypercorn told to stop, so no
connection is cut in the middle of an answer; then the process exits.

``--workers N`` starts N such processes on one port (``SO_REUSEPORT``; the kernel spreads connections);
each has its own engine, limits and metrics.
"""

from __future__ import annotations

import errno
import functools
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from engine.lm import TrioLM

from .app import ServiceState, create_app
from .settings import ServiceSettings

logger = logging.getLogger("web")


class UTCFormatter(logging.Formatter):
    """Log lines stamped with ISO 8601 UTC times (``2026-11-25T20:15:04.123Z``).

    With ``json_lines`` the message is taken to be a JSON object (the engine's request lines) and the time
    goes in as its first key, ``"ts"``, so each line stays one JSON object.
    """

    def __init__(self, fmt: str | None = None, *, json_lines: bool = False) -> None:
        super().__init__(fmt)
        self.json_lines = json_lines

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return super().format(record)
        message = record.getMessage()
        if not message.startswith("{"):
            return f"{self.formatTime(record)} {message}"
        rest = message[1:].lstrip()
        separator = "" if rest.startswith("}") else ","
        return f'{{"ts":"{self.formatTime(record)}"{separator}{rest}'


def configure_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr with ISO 8601 UTC timestamps; request lines stay one JSON object per line.

    Idempotent: calling it again replaces the handlers it installed.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "dspy_trio", False)]:
        root.removeHandler(handler)
    plain = logging.StreamHandler()
    plain.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plain.dspy_trio = True  # type: ignore[attr-defined]
    root.addHandler(plain)
    root.setLevel(level)
    requests = logging.getLogger("engine.requests")
    for handler in [h for h in requests.handlers if getattr(h, "dspy_trio", False)]:
        requests.removeHandler(handler)
    json_lines = logging.StreamHandler()
    json_lines.setFormatter(UTCFormatter(json_lines=True))
    json_lines.dspy_trio = True  # type: ignore[attr-defined]
    requests.addHandler(json_lines)
    requests.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


class CannotListenError(Exception):
    """The address the service should listen on cannot be used (in use, not local, not allowed)."""


def check_can_listen(host: str, port: int) -> None:
    """Fail early, with one clear message, if ``host:port`` cannot be bound; port 0 always can.

    Run it before starting anything, and before worker processes bind with ``SO_REUSEPORT`` (which would
    make the probe fail on their own sockets). Raises :class:`CannotListenError`.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListenError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Hypercorn binds
            try:
                probe.bind(address)
            except OSError as exc:
                reason = {
                    errno.EADDRINUSE: "the address is already in use (another server on that port?)",
                    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
                    errno.EACCES: "permission denied (ports below 1024 need privileges)",
                }.get(exc.errno or 0, exc.strerror or str(exc))
                raise CannotListenError(f"cannot listen on {host}:{port}: {reason}") from exc


def hypercorn_config(settings: ServiceSettings, *, worker_count: int = 1) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.workers = worker_count  # >1 makes Hypercorn bind with SO_REUSEPORT
    config.backlog = 4096  # Hypercorn's default (100) resets connections in a burst of 1,000 clients
    config.websocket_ping_interval = settings.ws_ping_interval or None
    # The engine has drained before Hypercorn is asked to stop, so this only bounds the flushing of the
    # last responses, and the wait for Hypercorn's WebSocket ping tasks, which outlive closed sockets.
    config.graceful_timeout = 1.0
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
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT or :meth:`Server.shutdown`; supports ``nursery.start``.

    Blocks for the life of the server, including the drain.
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

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_then_stop)
        if handle_signals:
            nursery.start_soon(watch_signals)
        config = hypercorn_config(settings, worker_count=worker_count)
        binds = await nursery.start(
            functools.partial(hypercorn_serve, app, config, shutdown_trigger=stopped.wait)
        )
        task_status.started(Server(binds[0], state, stop))
        logger.info("serving on %s", binds[0])
        await stopped.wait()
        signals_scope.cancel()  # Hypercorn now closes its connections and ends the lifespan itself
    logger.info("stopped")


@asynccontextmanager
async def open_server(
    settings: ServiceSettings, *, lms: Mapping[str, TrioLM] | None = None
) -> AsyncIterator[Server]:
    """Run the service in the background for the block (tests, embedding); drains it on exit."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            functools.partial(serve, settings, lms=lms, handle_signals=False)
        )
        try:
            yield server
        finally:
            server.shutdown()


def run_workers(argv: Sequence[str], workers: int) -> int:
    """Start ``workers`` serving processes on one port and wait for them; forwards SIGTERM/SIGINT."""
    command = [sys.executable, "-m", "web.cli", *argv, "--worker-of", str(workers)]
    children = [subprocess.Popen(command) for _ in range(workers)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)
