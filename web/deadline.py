"""A request's deadline: parsed once, capped once, counted from the arrival of the request's head.

::

    deadline = RequestDeadline.start(settings, arrived=call.arrived, asked=body.timeout_secs,
                                     header=call.timeout_header)      # Call.deadline() does this
    with deadline.scope():                 # the engine sees it as trio.current_effective_deadline()
        result = await engine.predict(...)
    ...
    raise deadline.error()                 # DeadlineExceededError, 504 / an error event
"""

from __future__ import annotations

import math

import attrs
import trio

from dspy_trio.engine import DeadlineExceededError

from .errors import HTTPError
from .settings import ServiceSettings


def _invalid(param: str) -> HTTPError:
    return HTTPError(
        422,
        f"{param} must be a positive number of seconds",
        type="invalid_request_error",
        code="invalid_timeout",
        param=param,
    )


@attrs.frozen
class RequestDeadline:
    """When a request must end, on Trio's clock.

    Attributes:
        arrived: When the request's head arrived (Trio clock): the deadline counts from here, so time
            spent reading the body or waiting for the server counts too.
        timeout: Seconds the request may take (asked for, capped, or the default).
    """

    arrived: float
    timeout: float

    @classmethod
    def start(
        cls,
        settings: ServiceSettings,
        *,
        arrived: float,
        asked: float | None = None,
        header: str | None = None,
        param: str = "timeout_secs",
    ) -> RequestDeadline:
        """Parse and cap a timeout: ``asked`` (a number already checked by the body's model) wins over
        ``header`` (``X-Request-Timeout``); neither means ``settings.default_timeout``.

        Raises:
            HTTPError: 422 ``invalid_timeout`` when either is not a positive finite number.
        """
        if asked is not None:
            if isinstance(asked, bool) or not isinstance(asked, int | float):
                raise _invalid(param)
            if not (asked > 0 and math.isfinite(asked)):
                raise _invalid(param)
        elif header is not None:
            try:
                asked = float(header)
            except ValueError:
                raise _invalid("X-Request-Timeout") from None
            if not (asked > 0 and math.isfinite(asked)):
                raise _invalid("X-Request-Timeout")
        return cls(arrived, settings.timeout_for(asked))

    @classmethod
    def of_head(cls, settings: ServiceSettings, *, arrived: float, header: str | None) -> RequestDeadline:
        """The deadline the request's head names: ``X-Request-Timeout`` (capped), or
        ``settings.default_timeout`` when it names none or an invalid one (the handler refuses that with
        its 422 once the body, whose ``timeout_secs`` wins over the header, is read). The body must have
        arrived by then: waiting longer for it is a 408.
        """
        try:
            return cls.start(settings, arrived=arrived, header=header)
        except HTTPError:
            return cls(arrived, settings.timeout_for(None))

    @property
    def at(self) -> float:
        """The absolute deadline (Trio clock)."""
        return self.arrived + self.timeout

    def scope(self) -> trio.CancelScope:
        """A cancel scope with this deadline: the request's work runs inside it."""
        return trio.CancelScope(deadline=self.at)

    def error(self) -> DeadlineExceededError:
        """The error of a request that ran past this deadline."""
        return DeadlineExceededError(f"the request ran past its timeout of {self.timeout:g}s")
