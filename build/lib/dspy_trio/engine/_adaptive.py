"""Adaptive concurrency per upstream: AIMD between configured bounds.

The limit grows by ``1 / limit`` for every call that succeeds without latency inflation (about one more
slot per round of calls), and halves when the upstream pushes back: a 429, a 503 or 529 ("overloaded"),
a timeout, or a latency above ``inflation`` times the best latency seen recently. A decrease waits for the
calls that were already in flight at the last decrease to drain (one decrease per round trip), so a burst
of errors from one round halves the limit once, not to the floor.
"""

from __future__ import annotations

import math

import attrs
import trio

from ._errors import ConfigError
from ._validate import number


@attrs.frozen
class AdaptiveSettings:
    """Bounds and sensitivity of an adaptive limit.

    Attributes:
        initial: Limit at start (kept within the bounds).
        minimum, maximum: Bounds (at least 1; ``minimum <= maximum``).
        inflation: Latency above this multiple of the recent best counts as overload (more than 1).
        decrease: Factor applied on overload (between 0 and 1).
    """

    initial: float = attrs.field(default=16, validator=number(minimum=1))
    minimum: float = attrs.field(default=1, validator=number(minimum=1))
    maximum: float = attrs.field(default=512, validator=number(minimum=1))
    inflation: float = attrs.field(default=3.0, validator=number(above=1))
    decrease: float = attrs.field(default=0.5, validator=number(above=0, below=1))

    def __attrs_post_init__(self) -> None:
        if self.minimum > self.maximum:
            raise ConfigError(f"minimum ({self.minimum!r}) must not exceed maximum ({self.maximum!r})")


class AdaptiveLimit:
    """A concurrency limit that moves with the upstream's health. Acquire a slot around each call."""

    def __init__(self, settings: AdaptiveSettings) -> None:
        self.settings = settings
        self.limit = min(settings.maximum, max(settings.minimum, float(settings.initial)))
        self._slots = trio.CapacityLimiter(max(1, math.floor(self.limit)))
        self._best_latency = math.inf
        self._calls = 0
        self._hold_decrease_until = 0  # a call number: decreases wait for earlier calls to finish
        self.increases = 0
        self.decreases = 0

    def __repr__(self) -> str:
        return f"<AdaptiveLimit {self.limit:.2f} [{self._slots.borrowed_tokens} in use]>"

    @property
    def in_use(self) -> int:
        return self._slots.borrowed_tokens

    def _apply(self) -> None:
        self.limit = min(self.settings.maximum, max(self.settings.minimum, self.limit))
        self._slots.total_tokens = max(1, math.floor(self.limit))

    async def acquire(self, owner: object) -> int:
        """Wait for a slot; returns the call's sequence number (pass it to :meth:`release`)."""
        await self._slots.acquire_on_behalf_of(owner)
        self._calls += 1
        return self._calls

    def release(self, owner: object, call: int, *, latency: float | None, overloaded: bool) -> None:
        """Give the slot back and adjust the limit from how the call went.

        Args:
            call: What :meth:`acquire` returned.
            latency: Seconds the call took, when it completed.
            overloaded: Whether the upstream pushed back (429, 503, 529, timeout).
        """
        self._slots.release_on_behalf_of(owner)
        if latency is not None and not overloaded:
            self._best_latency = min(self._best_latency, latency)
            overloaded = latency > self.settings.inflation * self._best_latency
        if overloaded:
            if call > self._hold_decrease_until:
                self.limit *= self.settings.decrease
                self.decreases += 1
                self._hold_decrease_until = self._calls
                self._apply()
        elif latency is not None:
            self.limit += 1.0 / self.limit
            self.increases += 1
            self._apply()
