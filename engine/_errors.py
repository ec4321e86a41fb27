"""The engine's error tree, and the outcomes a request can end with.

Every failure a caller of the engine can see is one of these. Foreign errors (httpx, DSPy, LiteLLM)
are translated at the edge where they happen with ``raise X from exc``; the web layer maps each class to
exactly one HTTP status. ``trio.Cancelled`` is never translated: a caller's own cancel scope (and so its
deadline) is reported the Trio way, by the caller's scope.

::

    EngineError
    ├── InvalidInputError          the request itself is wrong (a field, a value, an option)
    │   └── UnknownProgramError    no program is registered under that name
    ├── OverloadedError            admission refused: the queue is full (carries retry_after)
    │   └── RateLimitWaitError     a wait for an upstream's capacity would pass the deadline
    ├── DeadlineExceededError      a service-imposed time limit ran out
    ├── SlowConsumerError          a stream's consumer stopped reading (``timeout`` backpressure)
    ├── EngineClosedError          the engine is shutting down or closed
    ├── RequestCancelledError      the engine cancelled the request on purpose (fail-fast batch, cancel by id)
    ├── RequestAbandonedError      a stream's consumer read on after its own scope ended the stream
    ├── ConfigError                the configuration cannot be used
    ├── ProgramError               the DSPy program failed (e.g. the LM's output did not parse)
    └── UpstreamError              the LM provider failed
        ├── UpstreamRateLimitedError   429
        ├── UpstreamServerError        5xx (503, 529 ...)
        ├── UpstreamConnectionError    connect / read / write failures
        ├── UpstreamTimeoutError       the provider did not answer within the per-attempt timeout
        └── UpstreamResponseError      the provider answered with something we cannot read

What the engine decides from an error is a property of its class, not an ``isinstance`` ladder:
``outcome`` (how a request ended by it is counted), and for upstream errors ``retryable``,
``retry_cause`` (the label retries are counted under) and ``pushback`` (whether it tells the adaptive
concurrency limit that the upstream is overloaded). Every upstream error may carry ``retry_after``.

This is the lowest module of the engine: it imports none of the others, and the vocabulary they share
(:data:`Outcome`, the ways a request can end) lives here with the errors that decide it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

# How a request ended: each accepted request is counted under exactly one (see EngineStatistics).
Outcome = Literal[
    "succeeded", "failed", "timed_out", "abandoned", "cancelled", "shut_down", "rejected", "invalid"
]

__all__ = [
    "ClusterUnavailableError",
    "ConfigError",
    "DeadlineExceededError",
    "EngineClosedError",
    "EngineError",
    "InvalidInputError",
    "Outcome",
    "OverloadedError",
    "ProgramError",
    "RateLimitWaitError",
    "RequestAbandonedError",
    "RequestCancelledError",
    "SlowConsumerError",
    "UnknownProgramError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamRateLimitedError",
    "UpstreamResponseError",
    "UpstreamServerError",
    "UpstreamTimeoutError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose.

    Attributes:
        message: A human-readable explanation, safe to show to a client.
        code: A short stable identifier (``"invalid_input"``, ``"overloaded"``, ...).
        outcome: The outcome a request that ends with this error is counted under.
    """

    code = "engine_error"
    outcome: ClassVar[Outcome] = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce rebuilds with cls(*args), which keyword-only and extra constructor
        # arguments break: rebuild without __init__ and restore the attributes instead, so errors survive
        # pickle (process boundaries) and copy.
        return (_rebuild, (type(self), self.args), dict(vars(self)))


def _rebuild(cls: type[EngineError], args: tuple[Any, ...]) -> EngineError:
    error = cls.__new__(cls)
    error.args = args
    return error


class InvalidInputError(EngineError):
    """Raised when a request is malformed: a missing or unknown input field, a wrong type, a bad option.

    Attributes:
        field: The offending field, when one field is to blame.
    """

    code = "invalid_input"
    outcome: ClassVar[Outcome] = "invalid"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownProgramError(InvalidInputError):
    """Raised when a request names a program that is not registered."""

    code = "unknown_program"

    def __init__(self, program: str, known: list[str]) -> None:
        super().__init__(f"unknown program {program!r}; registered programs: {', '.join(sorted(known))}")
        self.program = program


class OverloadedError(EngineError):
    """Raised at once when admission is refused because the bounded queue is full.

    Nothing waited and nothing was started. ``retry_after`` is the engine's estimate, in seconds, of when
    the queue will have room again.
    """

    code = "overloaded"
    outcome: ClassVar[Outcome] = "rejected"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitWaitError(OverloadedError):
    """Raised at once, instead of sleeping, when a wait for an upstream's capacity would end after the
    caller's deadline: a requests- or tokens-per-minute limit, or the cool-down an upstream asked for
    with ``Retry-After``. Nothing was sent for that LM call. ``retry_after`` is the wait, in seconds.
    """

    code = "rate_limit_wait"


class DeadlineExceededError(EngineError):
    """The error of a request whose service-imposed time limit ran out (the web layer's
    ``timeout_secs``, for instance).

    A deadline set by the caller's own cancel scope is reported by that scope (``trio.TooSlowError``
    from ``trio.fail_after``), not by this error; a wait the engine can tell in advance would pass the
    deadline is a :class:`RateLimitWaitError`.
    """

    code = "deadline_exceeded"
    outcome: ClassVar[Outcome] = "timed_out"


class SlowConsumerError(EngineError):
    """Raised (as a stream's error event) when a stream under the ``timeout`` backpressure policy could
    not hand its consumer an event for ``consumer_timeout`` seconds. The upstream call is cancelled."""

    code = "slow_consumer"


class EngineClosedError(EngineError):
    """Raised for requests made after the engine began shutting down, and for in-flight requests that
    the shutdown had to cancel once its drain timeout ran out."""

    code = "engine_closed"
    outcome: ClassVar[Outcome] = "shut_down"


class RequestCancelledError(EngineError):
    """The outcome of a request the engine cancelled on purpose: ``dspy_trio.engine.cancel(request_id)``, or
    the rest
    of a ``fail_fast`` batch after one item failed. (A cancel by the caller's own scope is reported by
    that scope instead.)"""

    code = "cancelled"
    outcome: ClassVar[Outcome] = "cancelled"


class RequestAbandonedError(EngineError):
    """The error event of a stream whose own caller's scope was cancelled (without its deadline passing)
    while its consumer still read events, e.g. in a shielded scope. Outcome ``abandoned``. Other callers
    see such a cancel the Trio way, as ``trio.Cancelled`` caught by their scope."""

    code = "abandoned"
    outcome: ClassVar[Outcome] = "abandoned"


class ClusterUnavailableError(EngineError):
    """Raised when an operation that needs the shared state of a cluster (Redis) cannot reach it, e.g. a
    cancel by id of a request that may run in another process. Nothing was changed; try again later."""

    code = "cluster_unavailable"


class ConfigError(EngineError):
    """Raised when a configuration value, file, program or LM cannot be used."""

    code = "config_error"


class ProgramError(EngineError):
    """Raised when the DSPy program itself fails, e.g. the LM's output cannot be parsed into the
    signature's output fields."""

    code = "program_error"


class UpstreamError(EngineError):
    """Base class of failures of the LM provider.

    Attributes:
        model: The model that was called.
        status: The HTTP status the provider answered with, if it answered.
        retry_after: Seconds the provider asked us to wait (``retry-after-ms`` or ``Retry-After``),
            or None when it did not say.
        retryable: Whether trying again later may succeed (429, 5xx, connection failures, timeouts).
        retry_cause: The label retries after this error are counted under; None when not retryable.
        pushback: Whether the error tells the adaptive concurrency limit the upstream is overloaded
            (429, a timeout, and the "overloaded" statuses 503 and 529).
    """

    code = "upstream_error"
    retryable: ClassVar[bool] = False
    retry_cause: ClassVar[str | None] = None
    pushback: bool = False

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.status = status
        self.retry_after = retry_after


class UpstreamRateLimitedError(UpstreamError):
    """Raised when the provider answers 429."""

    code = "upstream_rate_limited"
    retryable = True
    retry_cause = "rate_limited"
    pushback = True

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, model=model, status=status, retry_after=retry_after)


# Statuses that say "overloaded, slow down" rather than "broken": 503 Service Unavailable, and 529,
# Anthropic's overloaded_error. They push the adaptive concurrency limit down like a 429.
OVERLOADED_STATUSES = frozenset({503, 529})


class UpstreamServerError(UpstreamError):
    """Raised when the provider answers with a 5xx status (or 529, Anthropic's "overloaded"). A 503 or
    529 is pushback: the adaptive concurrency limit falls as for a 429."""

    code = "upstream_server_error"
    retryable = True
    retry_cause = "server_error"

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, model=model, status=status, retry_after=retry_after)
        self.pushback = status in OVERLOADED_STATUSES


class UpstreamConnectionError(UpstreamError):
    """Raised when the connection to the provider could not be made or broke before the answer ended."""

    code = "upstream_connection_error"
    retryable = True
    retry_cause = "connection"


class UpstreamTimeoutError(UpstreamError):
    """Raised when the provider did not answer within the LM's per-attempt timeout."""

    code = "upstream_timeout"
    retryable = True
    retry_cause = "timeout"
    pushback = True


class UpstreamResponseError(UpstreamError):
    """Raised when the provider answers with something that is not a valid completion (bad JSON, a
    malformed stream chunk, a non-retryable 4xx)."""

    code = "upstream_bad_response"
