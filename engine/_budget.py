"""What a tenant may spend: USD per fixed window, and the price table that turns tokens into USD.

A budget counts spend in fixed windows of ``window`` seconds (a multiple of ``window`` on the budget's
clock starts each one: with ``window = 86400`` on wall time, a UTC day). A request is refused before it
is queued, and so before any upstream call, when its tenant has already spent the window's budget; what
a request costs is known only when it ends, so requests already running when the budget runs out may
overshoot it by their own cost. Nothing is reserved in advance.

:class:`LocalBudget` serves one process; ``dspy_trio.engine.cluster`` implements the same port on Redis, so
every worker and replica spends from one tally.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ._validate import non_negative, positive


@attrs.frozen
class Price:
    """What one LM's tokens cost (``[lms.NAME.price]``), in USD per million tokens.

    Attributes:
        input_per_mtok: Per million prompt tokens.
        output_per_mtok: Per million completion tokens.
    """

    input_per_mtok: float = attrs.field(default=0.0, validator=non_negative)
    output_per_mtok: float = attrs.field(default=0.0, validator=non_negative)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for these tokens."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@attrs.frozen
class BudgetLimit:
    """A tenant's spend limit (``[tenants.NAME.budget]``).

    Attributes:
        usd: USD the tenant may spend per window (0: nothing that costs).
        window: The window's length in seconds (default a day).
    """

    usd: float = attrs.field(validator=non_negative)
    window: float = attrs.field(default=86400.0, validator=positive)


@attrs.frozen
class Spent:
    """A budget's state: ``usd`` spent in the current window, which ends in ``ends_in`` seconds."""

    usd: float
    ends_in: float


class Budget(Protocol):
    """One tenant's spend in the current window."""

    @property
    def limit(self) -> BudgetLimit: ...

    async def spent(self) -> Spent:
        """The spend of the current window so far. May block for one bounded round-trip (shared)."""
        ...

    def spend(self, usd: float) -> None:
        """Add ``usd`` to the current window. Never blocks (a shared budget sends it soon)."""
        ...

    def peek(self) -> Spent:
        """The spend of the current window as far as this process knows now. Never blocks."""
        ...


def window_of(now: float, window: float) -> tuple[int, float]:
    """The index of the window containing ``now`` and the seconds until it ends."""
    index = math.floor(now / window)
    return index, (index + 1) * window - now


class LocalBudget:
    """A budget held by this process.

    Args:
        limit: The budget.
        clock: Seconds; Trio's clock by default (a ``MockClock`` in tests).
    """

    def __init__(self, limit: BudgetLimit, clock: Callable[[], float] = trio.current_time) -> None:
        self.limit = limit
        self._clock = clock
        self._index = -math.inf
        self._usd = 0.0

    def __repr__(self) -> str:
        return f"<LocalBudget {self._usd:g}/{self.limit.usd:g} USD>"

    def _roll(self) -> float:
        index, ends_in = window_of(self._clock(), self.limit.window)
        if index != self._index:
            self._index, self._usd = index, 0.0
        return ends_in

    async def spent(self) -> Spent:
        await trio.lowlevel.checkpoint()
        return self.peek()

    def peek(self) -> Spent:
        ends_in = self._roll()
        return Spent(self._usd, ends_in)

    def spend(self, usd: float) -> None:
        self._roll()
        self._usd += usd
