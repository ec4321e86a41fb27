"""The service's life in one place: starting, ready, draining, stopped, and failure.

::

    service = Service(settings, RouteTable(ROUTES))   # starting: no engine yet, 503 not_ready
    await service.start(app.nursery)                  # the app's start-up: the engine opens -> ready
    service.request_stop()                            # SIGTERM, Server.shutdown(), a failure
    await service.drain_when_asked()                  # draining: 503 to new work; in-flight ends
    await service.drained()                           # (Hypercorn's shutdown trigger) -> it stops
    await service.stop()                              # the app's shutdown: the engine closes

- **starting**: the engine is not open yet; routes that need it answer 503 ``not_ready``, ``/ready`` too.
- **ready**: the engine is open and not closing.
- **draining** (after :meth:`request_stop`): ``/ready`` and new work get 503 ``not_ready``; cancel by id and
  ``/metrics`` still answer; in-flight requests get the engine's ``drain_timeout``, then end with
  ``engine_closed``. Only then is the listener told to stop, so no answer is cut.
- **failed**: the engine failed to open, or crashed while serving (:meth:`fail`): the service refuses
  traffic and asks to stop, and ``serve`` ends with that error (a supervisor then restarts the process).

The engine lives in a task of the app's lifespan nursery (``app.nursery``), not in an async generator
(``while_serving``): its nursery must never be suspended across a ``yield``, or a cancelled lifespan
corrupts Trio's nursery stack. :func:`dspy_trio.web.server.serve` runs the process around this (signals,
the listener, worker snapshots).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from dspy_trio.engine import Engine, open_engine
from dspy_trio.engine.lm import TrioLM

from .errors import HTTPError
from .metrics import HTTPMetrics
from .routing import RouteTable
from .settings import ServiceSettings

if TYPE_CHECKING:
    from .mcp import MCPEndpoint

logger = logging.getLogger("dspy_trio.web")

# Seconds a client refused with 503 ``not_ready`` (starting, draining; also ``/ready``) is told to wait
# (``Retry-After``): a starting service is ready within about a second, and a draining one is going away,
# so the retry should soon reach another replica (as after the engine's own 503 ``engine_closed``).
NOT_READY_RETRY_AFTER = 1.0


def not_ready() -> HTTPError:
    """The 503 ``not_ready`` of a service that is starting or draining, with ``Retry-After``."""
    return HTTPError(
        503,
        "the service is not ready (starting or shutting down)",
        type="service_unavailable_error",
        code="not_ready",
        retry_after=NOT_READY_RETRY_AFTER,
    )


@attrs.define(eq=False)
class Service:
    """One service: its settings and routes, its engine while serving, and where it is in its life.

    Args:
        settings: Service and engine settings.
        routes: The route table the app, the door and the document read.
        lms: LM instances to use instead of those in the engine config (tests, embedding).

    Attributes:
        engine: The engine while serving, else None.
        mcp: The MCP endpoint (its sessions) while serving, else None.
        http_metrics: Answers by route and status (the front door counts them).
        draining: Set when shutdown begins (or the engine failed): new work gets 503.
        failure: Why the engine ended on its own (it failed to open, or crashed while serving).
    """

    settings: ServiceSettings
    routes: RouteTable
    lms: Mapping[str, TrioLM] | None = None
    engine: Engine | None = attrs.field(default=None, init=False)
    mcp: MCPEndpoint | None = attrs.field(default=None, init=False)
    http_metrics: HTTPMetrics = attrs.field(factory=HTTPMetrics, init=False)
    draining: bool = attrs.field(default=False, init=False)
    failure: BaseException | None = attrs.field(default=None, init=False)
    _stop_asked: trio.Event = attrs.field(factory=trio.Event, init=False)
    _drained: trio.Event = attrs.field(factory=trio.Event, init=False)
    _close_engine: trio.Event = attrs.field(factory=trio.Event, init=False)
    _engine_closed: trio.Event = attrs.field(factory=trio.Event, init=False)

    # -- the app's start-up and shutdown (its lifespan) --------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the engine in a task of ``nursery`` (the app's), then the MCP endpoint's sessions in
        another. Blocks until both run.

        Raises:
            Exception: what opening the engine raised (also recorded by :meth:`fail`).
        """
        from .mcp import MCPEndpoint  # the MCP SDK and its web stack load with the app, not with this module

        await nursery.start(self._run_engine)
        self.mcp = MCPEndpoint(self)
        await nursery.start(self.mcp.run)

    async def _run_engine(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            async with open_engine(self.settings.engine, lms=self.lms) as engine:
                self.http_metrics.register(engine.metrics.registry)
                self.engine = engine
                task_status.started()
                started = True
                await self._close_engine.wait()
                self.draining = True
        except Exception as exc:
            # Hypercorn would log a failed lifespan and serve on without an engine: instead the service
            # stops and ``serve`` ends with this error.
            self.fail(exc)
            if not started:
                raise
        finally:
            self._engine_closed.set()

    async def stop(self) -> None:
        """Close the MCP sessions and the engine (what still runs is cancelled by its own drain) and wait
        until it is closed."""
        if self.mcp is not None:
            self.mcp.stop()
        self._close_engine.set()
        await self._engine_closed.wait()

    # -- shutdown ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin the graceful shutdown: drain, then stop. Returns at once; idempotent."""
        self._stop_asked.set()

    async def drain_when_asked(self) -> None:
        """Wait for :meth:`request_stop`, then drain: refuse new work, let in-flight requests end (the
        engine's ``drain_timeout``, then they are cancelled). Blocks until drained."""
        await self._stop_asked.wait()
        logger.info("shutting down: draining in-flight requests")
        self.draining = True
        if self.engine is not None:
            await self.engine.drain()
        if self.mcp is not None:
            self.mcp.stop()  # no call runs in a session now: close them, so no connection waits on one
        self._drained.set()

    async def drained(self) -> None:
        """Block until the drain has ended (the listener's shutdown trigger)."""
        await self._drained.wait()

    def fail(self, error: BaseException) -> None:
        """Record that the engine failed: refuse traffic and ask to stop."""
        logger.critical("the engine failed; the service stops: %r", error, exc_info=error)
        if self.failure is None:
            self.failure = error
        self.draining = True
        self.request_stop()

    # -- what handlers ask ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the service takes new work: the engine is open, and nobody asked it to stop."""
        return self.engine is not None and not self.draining and not self.engine.closing

    def require_engine(self) -> Engine:
        """The engine, or a 503 ``not_ready`` while starting or draining."""
        if self.engine is None or self.draining:
            raise not_ready()
        return self.engine

    def engine_even_draining(self) -> Engine:
        """The engine also while it drains (cancel by id, metrics), or a 503 ``not_ready`` without one."""
        if self.engine is None:
            raise not_ready()
        return self.engine


__all__ = ["NOT_READY_RETRY_AFTER", "Service", "not_ready"]
