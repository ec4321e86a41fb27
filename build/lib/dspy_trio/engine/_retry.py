"""Retries of failed LM attempts: which failures, how long to wait, and how many overall.

- Only retryable failures (429, 5xx, connection failures, per-attempt timeouts), and never once a token of
  the attempt reached the caller (a stream cannot be taken back).
- Exponential backoff with full jitter: a random wait in ``[0, min(max_delay, base_delay * 2**n)]``, never
  shorter than the upstream's ``Retry-After`` (on any retryable status: 429, 503, 529 ...). A
  ``Retry-After`` longer than ``max_retry_after`` counts as ``max_retry_after``, so one header cannot put
  a call without a deadline (or the upstream's shared cool-down) to sleep for years.
- Never past the deadline: when the wait would end after the caller's deadline, give up at once with the
  last error instead of sleeping.
- A retry budget: retries may be at most ``budget_ratio`` of the requests seen in the last ``window``
  seconds (plus ``budget_floor``), so a failing upstream is not hammered with retries.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable

import attrs
import trio

from ._errors import UpstreamError
from ._validate import non_negative, non_negative_int, number, positive


@attrs.frozen
class RetryPolicy:
    """How an upstream's failed attempts are retried.

    Attributes:
        max_attempts: Attempts per LM call, the first included (1 disables retries).
        base_delay: Backoff base, in seconds.
        max_delay: Backoff cap, in seconds (``Retry-After`` may ask for longer).
        budget_ratio: Retries allowed as a fraction of recent requests.
        budget_floor: Retries always allowed per window, however few the requests.
        window: Seconds of history the budget looks at.
        max_retry_after: The longest ``Retry-After`` honoured, in seconds; a longer one counts as this
            long (for the backoff and for the upstream's cool-down).
    """

    max_attempts: int = attrs.field(default=3, validator=number(minimum=1, integer=True))
    base_delay: float = attrs.field(default=0.25, validator=non_negative)
    max_delay: float = attrs.field(default=20.0, validator=non_negative)
    budget_ratio: float = attrs.field(default=0.2, validator=non_negative)
    budget_floor: int = attrs.field(default=10, validator=non_negative_int)
    window: float = attrs.field(default=10.0, validator=positive)
    max_retry_after: float = attrs.field(default=60.0, validator=positive)

    def retry_after(self, error: UpstreamError) -> float | None:
        """The wait ``error`` asks for, at most ``max_retry_after``; None when it asks for none."""
        if error.retry_after is None or math.isnan(error.retry_after):
            return None
        return min(max(0.0, error.retry_after), self.max_retry_after)

    def backoff(self, retry: int, error: UpstreamError, uniform: Callable[[float, float], float]) -> float:
        """Seconds to wait before retry number ``retry`` (from 1) after ``error``."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        wait = uniform(0.0, ceiling)
        if (asked := self.retry_after(error)) is not None:
            wait = max(wait, asked)
        return wait


class RetryBudget:
    """Counts requests and retries over a sliding window on Trio's clock."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self) -> None:
        horizon = trio.current_time() - self._policy.window
        for events in (self._requests, self._retries):
            while events and events[0] < horizon:
                events.popleft()

    def record_request(self) -> None:
        self._requests.append(trio.current_time())

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is used up."""
        self._trim()
        allowed = self._policy.budget_floor + int(self._policy.budget_ratio * len(self._requests))
        if len(self._retries) >= allowed:
            return False
        self._retries.append(trio.current_time())
        return True


def seeded(seed: int | None = None) -> Callable[[float, float], float]:
    """A jitter source; tests pass a seed to get a reproducible schedule."""
    return random.Random(seed).uniform
