"""The engine's error tree.

Every failure a caller of the engine can see is one of these. Foreign errors (httpx, DSPy, LiteLLM)
are translated at the edge where they happen with ``raise X from exc``; the web layer maps each class to
exactly one HTTP status. ``trio.Cancelled`` is never translated: a caller's own cancel scope (and so its
deadline) is reported the Trio way, by the caller's scope.

::

    EngineError
    ├── InvalidInputError          the request itself is wrong (a field, a value, an option)
    │   └── UnknownProgramError    no program is registered under that name
    ├── OverloadedError            admission refused: the queue is full (carries retry_after)
    ├── DeadlineExceededError      an engine-imposed time limit ran out
    ├── SlowConsumerError          a stream's consumer stopped reading (``timeout`` backpressure)
    ├── EngineClosedError          the engine is shutting down or closed
    ├── RequestCancelledError      the engine cancelled the request on purpose (fail-fast batch, cancel by id)
    ├── RequestAbandonedError      a stream's consumer read on after its own scope ended the stream
    ├── ConfigError                the configuration cannot be used
    ├── ProgramError               the DSPy program failed (e.g. the LM's output did not parse)
    └── UpstreamError              the LM provider failed
        ├── UpstreamRateLimitedError   429 (carries retry_after)
        ├── UpstreamServerError        5xx
        ├── UpstreamConnectionError    connect / read / write failures
        ├── UpstreamTimeoutError       the provider did not answer within the per-attempt timeout
        └── UpstreamResponseError      the provider answered with something we cannot read
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeadlineExceededError",
    "EngineClosedError",
    "EngineError",
    "InvalidInputError",
    "OverloadedError",
    "ProgramError",
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
    """

    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(EngineError):
    """Raised when a request is malformed: a missing or unknown input field, a wrong type, a bad option.

    Attributes:
        field: The offending field, when one field is to blame.
    """

    code = "invalid_input"

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

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceededError(EngineError):
    """Raised when a time limit the engine enforces runs out.

    That is a ``timeout=`` given to the engine, or a wait the engine can tell in advance will not end
    before the deadline. A deadline set by the caller's own cancel scope is reported by that scope
    (``trio.TooSlowError`` from ``trio.fail_after``), not by this error.
    """

    code = "deadline_exceeded"


class SlowConsumerError(EngineError):
    """Raised (as a stream's error event) when a stream under the ``timeout`` backpressure policy could
    not hand its consumer an event for ``consumer_timeout`` seconds. The upstream call is cancelled."""

    code = "slow_consumer"


class EngineClosedError(EngineError):
    """Raised for requests made after the engine began shutting down, and for in-flight requests that
    the shutdown had to cancel once its drain timeout ran out."""

    code = "engine_closed"


class RequestCancelledError(EngineError):
    """The outcome of a request the engine cancelled on purpose: ``engine.cancel(request_id)``, or the rest
    of a ``fail_fast`` batch after one item failed. (A cancel by the caller's own scope is reported by
    that scope instead.)"""

    code = "cancelled"


class RequestAbandonedError(EngineError):
    """The error event of a stream whose own caller's scope was cancelled (without its deadline passing)
    while its consumer still read events, e.g. in a shielded scope. Outcome ``abandoned``. Other callers
    see such a cancel the Trio way, as ``trio.Cancelled`` caught by their scope."""

    code = "abandoned"


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
        retryable: Whether trying again later may succeed (429, 5xx, connection failures).
    """

    code = "upstream_error"
    retryable = False

    def __init__(self, message: str, *, model: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.status = status


class UpstreamRateLimitedError(UpstreamError):
    """Raised when the provider answers 429. ``retry_after`` holds its ``Retry-After`` (or
    ``retry-after-ms``) in seconds, or None when it sent neither."""

    code = "upstream_rate_limited"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, model=model, status=status)
        self.retry_after = retry_after


class UpstreamServerError(UpstreamError):
    """Raised when the provider answers with a 5xx status."""

    code = "upstream_server_error"
    retryable = True


class UpstreamConnectionError(UpstreamError):
    """Raised when the connection to the provider could not be made or broke before the answer ended."""

    code = "upstream_connection_error"
    retryable = True


class UpstreamTimeoutError(UpstreamError):
    """Raised when the provider did not answer within the LM's per-attempt timeout."""

    code = "upstream_timeout"
    retryable = True


class UpstreamResponseError(UpstreamError):
    """Raised when the provider answers with something that is not a valid completion (bad JSON, a
    malformed stream chunk, a non-retryable 4xx)."""

    code = "upstream_bad_response"
