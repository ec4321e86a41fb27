"""Ports for the limits one upstream's calls share (the RPM/TPM quota and the 429/503 cool-down) and a
tenant's (its own RPM/TPM window, the same quota, and its budget).

:class:`UpstreamGuard` talks to these small protocols only. The local implementations (a
:class:`LocalQuota` window, a cool-down held in memory) serve one process; ``dspy_trio.engine.cluster``
implements the same ports on Redis so that every worker and replica sharing an upstream account also shares
its quota and its cool-down.

Each LM's circuit breaker is made here too: a cluster's breakers share their openings and probes.

A call takes a :class:`Grant` before it is sent and settles it once: ``commit`` when it was sent (with
the tokens it really used), ``refund`` when it never was. The synchronous parts (``commit``, ``refund``,
``extend_to``) never block: a shared implementation sends them with its next round-trip.
"""

from __future__ import annotations

import math
from typing import Protocol

from ._breaker import BreakerSettings, CircuitBreaker
from ._budget import Budget, BudgetLimit, LocalBudget
from ._rate_window import LocalQuota


class Grant(Protocol):
    """One call's request and tokens, taken from a :class:`Quota`. Only the first settlement counts."""

    def commit(self, tokens: float | None = None) -> None:
        """The call was sent and used ``tokens`` (None: the estimate it was granted with stands)."""
        ...

    def refund(self) -> None:
        """The call was never sent: its request and tokens go back."""
        ...


class Quota(Protocol):
    """At most ``rpm`` requests and ``tpm`` tokens in any 60-second window."""

    @property
    def max_tokens(self) -> float:
        """The largest token charge one call can be granted (callers clamp their estimate to it)."""
        ...

    @property
    def waited(self) -> float:
        """Seconds callers spent waiting for capacity, in total."""
        ...

    async def acquire(self, tokens: float, *, then: float = 0.0, max_wait: float = math.inf) -> Grant:
        """Take one request and ``tokens``, waiting for them within the caller's deadline; ``then``
        seconds (the call itself) must still fit before the deadline after the wait, and the wait may
        be at most ``max_wait`` seconds (0: take them now or not at all).

        Raises:
            RateLimitWaitError: at once, when the wait and ``then`` could not end before the deadline,
                or the wait would be longer than ``max_wait`` (``retry_after``: the wait).
        """
        ...

    def peek(self, tokens: float) -> float:
        """Seconds until one request and ``tokens`` would fit, as far as this process knows now (0: now,
        or not known here); takes nothing. Never blocks."""
        ...


class CoolDown(Protocol):
    """Until when calls to an upstream must wait after a 429/503 with ``Retry-After``."""

    @property
    def until(self) -> float:
        """The end of the cool-down on Trio's clock (``-inf`` when none was ever set)."""
        ...

    def extend_to(self, until: float) -> None:
        """Make the cool-down last at least until ``until`` (Trio's clock). Never blocks."""
        ...


class Limits(Protocol):
    """Makes the quota, cool-down and circuit-breaker objects of each upstream, and the budget of each
    tenant."""

    def quota(self, upstream: str, rpm: float | None, tpm: float | None) -> Quota: ...

    def cooldown(self, upstream: str, *, max_wait: float = math.inf) -> CoolDown:
        """The cool-down of ``upstream``. ``max_wait``: the longest pause that one heard from elsewhere
        (another process of a cluster) may impose, as one's own ``Retry-After`` is capped."""
        ...

    def breaker(self, upstream: str, settings: BreakerSettings, *, longest_open: float) -> CircuitBreaker: ...
    def budget(self, tenant: str, limit: BudgetLimit) -> Budget:
        """The spend of ``tenant`` against ``limit``."""
        ...


class LocalCoolDown:
    """A cool-down held by this process only."""

    def __init__(self) -> None:
        self._until = -math.inf

    @property
    def until(self) -> float:
        return self._until

    def extend_to(self, until: float) -> None:
        self._until = max(self._until, until)


class LocalLimits:
    """Per-process limits: what one engine does without a cluster."""

    def quota(self, upstream: str, rpm: float | None, tpm: float | None) -> Quota:
        return LocalQuota(upstream, rpm, tpm)

    def cooldown(self, upstream: str, *, max_wait: float = math.inf) -> CoolDown:
        return LocalCoolDown()

    def breaker(self, upstream: str, settings: BreakerSettings, *, longest_open: float) -> CircuitBreaker:
        return CircuitBreaker(upstream, settings, longest_open=longest_open)

    def budget(self, tenant: str, limit: BudgetLimit) -> Budget:
        return LocalBudget(limit)
