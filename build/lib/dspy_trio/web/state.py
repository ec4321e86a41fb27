"""What the handlers of one service share: settings, and the engine while serving."""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from dspy_trio.engine import Engine

from .errors import HTTPError
from .settings import ServiceSettings

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


@attrs.define
class ServiceState:
    """The service's shared state (one per app).

    Attributes:
        settings: The service settings.
        engine: The engine while serving, else None.
        draining: Set when shutdown begins: new requests get 503.
    """

    settings: ServiceSettings
    engine: Engine | None = None
    draining: bool = False
    # Why the engine ended on its own (it failed to open, or crashed while serving), and who to tell.
    failure: BaseException | None = None
    on_failure: Callable[[], None] = lambda: None

    def fail(self, error: BaseException) -> None:
        """Record that the engine failed: refuse traffic and ask the server to stop."""
        logger.critical("the engine failed; the service stops: %r", error, exc_info=error)
        if self.failure is None:
            self.failure = error
        self.draining = True
        self.on_failure()

    @property
    def ready(self) -> bool:
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
