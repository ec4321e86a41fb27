"""What the handlers of one service share: settings, the engine while serving, and who owns which request."""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from engine import Engine

from .errors import HTTPError
from .settings import ServiceSettings

logger = logging.getLogger("web")

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


class _Owning:
    """The context manager of :meth:`ServiceState.owning` (a class: no generator kept per request)."""

    __slots__ = ("_owner", "_owners", "_request_id")

    def __init__(self, owners: dict[str, str], request_id: str, owner: str) -> None:
        self._owners, self._request_id, self._owner = owners, request_id, owner

    def __enter__(self) -> None:
        self._owners[self._request_id] = self._owner

    def __exit__(self, *exc_info: object) -> None:
        self._owners.pop(self._request_id, None)


@attrs.define
class ServiceState:
    """The service's shared state (one per app).

    Attributes:
        settings: The service settings.
        engine: The engine while serving, else None.
        draining: Set when shutdown begins: new requests get 503.
        owners: Server-generated request id -> the owner's key (the API key that started it, or "").
    """

    settings: ServiceSettings
    engine: Engine | None = None
    draining: bool = False
    owners: dict[str, str] = attrs.field(factory=dict)
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

    def owning(self, request_id: str, owner: str) -> _Owning:
        """Record that ``owner`` started ``request_id`` for the block (so only it may cancel it)."""
        return _Owning(self.owners, request_id, owner)

    def may_cancel(self, request_id: str, owner: str) -> bool:
        """Whether ``owner`` started the in-flight request ``request_id`` (unknown ids: no)."""
        return self.owners.get(request_id) == owner
