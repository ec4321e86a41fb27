"""Ports for the limits one upstream's calls share: RPM/TPM buckets and the 429/503 cool-down.

:class:`UpstreamGuard` talks to these small protocols only. The local implementations (a
:class:`TokenBucket` per limit, a cool-down held in memory) serve one process, as the engine always did;
``engine.cluster`` implements the same ports on Redis so that every worker and replica sharing an
upstream account also shares its quota and its cool-down.

Both ports are synchronous where the guard's code path must not block (``adjust``, ``extend_to``): a
shared implementation queues the write and sends it in the background, or with the next acquire.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

from ._token_bucket import TokenBucket

LimitKind = Literal["rpm", "tpm"]


class Quota(Protocol):
    """Requests or tokens per minute. :class:`TokenBucket` is the local implementation."""

    @property
    def capacity(self) -> float:
        """The most that may be taken at once."""
        ...

    @property
    def waited(self) -> float:
        """Seconds callers spent waiting for capacity, in total."""
        ...

    async def acquire(self, amount: float = 1.0) -> None:
        """Take ``amount``, waiting for it within the caller's deadline.

        Raises:
            RateLimitWaitError: at once, when the capacity could not arrive before the deadline.
        """
        ...

    def adjust(self, delta: float) -> None:
        """Charge ``delta`` more (or refund, if negative) after the fact. Never blocks."""
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

    def quota(self, upstream: str, kind: LimitKind, per_minute: float) -> Quota: ...

    def cooldown(self, upstream: str) -> CoolDown: ...


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

    def quota(self, upstream: str, kind: LimitKind, per_minute: float) -> Quota:
        return TokenBucket(per_minute, name=f"{upstream} {kind}")

    def cooldown(self, upstream: str) -> CoolDown:
        return LocalCoolDown()
