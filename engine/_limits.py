"""Ports for the limits one upstream's calls share: the RPM/TPM quota and the 429/503 cool-down.

:class:`UpstreamGuard` talks to these small protocols only. The local implementations (a
:class:`LocalQuota` window, a cool-down held in memory) serve one process; ``dspy_trio.engine.cluster``
implements the same ports on Redis so that every worker and replica sharing an upstream account also shares
its quota and its cool-down.

A call takes a :class:`Grant` before it is sent and settles it once: ``commit`` when it was sent (with
the tokens it really used), ``refund`` when it never was. The synchronous parts (``commit``, ``refund``,
``extend_to``) never block: a shared implementation sends them with its next round-trip.
"""

from __future__ import annotations

import math
from typing import Protocol

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

    async def acquire(self, tokens: float, *, then: float = 0.0) -> Grant:
        """Take one request and ``tokens``, waiting for them within the caller's deadline; ``then``
        seconds (the call itself) must still fit before the deadline after the wait.

        Raises:
            RateLimitWaitError: at once, when the wait and ``then`` could not end before the deadline.
        """
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
    """Makes the quota and cool-down objects of each upstream."""

    def quota(self, upstream: str, rpm: float | None, tpm: float | None) -> Quota: ...

    def cooldown(self, upstream: str, *, max_wait: float = math.inf) -> CoolDown:
        """The cool-down of ``upstream``. ``max_wait``: the longest pause that one heard from elsewhere
        (another process of a cluster) may impose, as one's own ``Retry-After`` is capped."""
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
