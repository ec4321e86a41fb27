"""A token bucket on Trio's clock, for requests-per-minute and tokens-per-minute limits.

Waiting for tokens happens inside the caller's deadline: when the wait could not end before the deadline,
:meth:`TokenBucket.acquire` fails at once with :class:`RateLimitWaitError` instead of sleeping for
nothing. A charge may be corrected afterwards (TPM is charged with an estimate before the call and
corrected with the real usage after), so the level may go below zero: later callers then wait longer.
"""

from __future__ import annotations

import trio

from ._errors import RateLimitWaitError


class TokenBucket:
    """``per_minute`` tokens a minute, at most ``burst`` at once (default: a minute's worth).

    Args:
        per_minute: Refill rate, in tokens per minute.
        burst: Capacity; a request for more than this is always refused.
        name: For error messages (``"rpm"``, ``"tpm"``).
    """

    def __init__(self, per_minute: float, *, burst: float | None = None, name: str = "tokens") -> None:
        if not per_minute > 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = per_minute / 60.0
        self.capacity = burst if burst is not None else per_minute
        self.name = name
        self._level = self.capacity
        self._updated = trio.current_time()
        self.waited = 0.0  # seconds callers spent waiting, in total
        self._lock = trio.Lock()  # FIFO: a large request is not starved by small ones

    def __repr__(self) -> str:
        return f"<TokenBucket {self.name} [{self.level():.1f}/{self.capacity:g}, {self.rate * 60:g}/min]>"

    def _refill(self) -> None:
        now = trio.current_time()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    def level(self) -> float:
        """Tokens available now (negative after corrections that overdrew it)."""
        self._refill()
        return self._level

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` tokens will be available (0 if they are now)."""
        missing = amount - self.level()
        return 0.0 if missing <= 0 else missing / self.rate

    async def acquire(self, amount: float = 1.0) -> None:
        """Take ``amount`` tokens, waiting for them in FIFO order.

        Raises:
            RateLimitWaitError: at once, when the tokens could not arrive before the caller's deadline.
            ValueError: ``amount`` exceeds the capacity, so it never could (callers clamp their charge).
        """
        if amount > self.capacity:
            raise ValueError(f"{self.name}: {amount:g} exceeds the bucket's capacity {self.capacity:g}")
        async with self._lock:
            wait = self.wait_time(amount)
            if wait > 0:
                if trio.current_time() + wait > trio.current_effective_deadline():
                    raise RateLimitWaitError(
                        f"{self.name} limit: {wait:.3f}s wait for capacity would pass the deadline",
                        retry_after=wait,
                    )
                started = trio.current_time()
                await trio.sleep(wait)
                self.waited += trio.current_time() - started
            else:
                await trio.lowlevel.checkpoint()
            self._refill()
            self._level -= amount

    def adjust(self, delta: float) -> None:
        """Charge ``delta`` more tokens (or refund, if negative) after the fact."""
        self._refill()
        self._level = min(self.capacity, self._level - delta)
