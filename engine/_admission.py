"""Admission control: a bounded FIFO queue in front of a global in-flight limit.

A request either gets a slot at once, waits its turn in a queue of at most ``max_queued`` requests, or is
refused at once with :class:`OverloadedError` — nothing ever waits in an unbounded line. Waiting happens
inside the caller's cancel scope, so the request's deadline covers its queue time; a request cancelled
while queued leaves the queue immediately. Slots are a ``trio.CapacityLimiter``, which is FIFO-fair and
hands a released slot straight to the longest waiter.
"""

from __future__ import annotations

import math

import attrs
import trio

from ._errors import OverloadedError

# The service-time estimate before any request has finished, in seconds.
_DEFAULT_SERVICE_TIME = 1.0
# Weight of the newest sample in the service-time moving average.
_EWMA_ALPHA = 0.2


@attrs.frozen
class AdmissionStatistics:
    """A snapshot of admission. ``in_flight`` holds slots; ``queued`` waits for one."""

    in_flight: int
    queued: int
    max_in_flight: int
    max_queued: int
    service_time: float


class Admission:
    """Slots for running requests, with a bounded queue in front.

    Args:
        max_in_flight: Requests that may hold a slot at once.
        max_queued: Requests that may wait for a slot; more are refused at once.
    """

    def __init__(self, max_in_flight: int, max_queued: int) -> None:
        self._slots = trio.CapacityLimiter(max_in_flight)
        self._max_queued = max_queued
        self._service_time = _DEFAULT_SERVICE_TIME

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<Admission [{s.in_flight}/{s.max_in_flight} in flight, {s.queued}/{s.max_queued} queued]>"

    def acquire_nowait(self, owner: object) -> None:
        """Take a slot for ``owner`` without waiting.

        Raises:
            trio.WouldBlock: if no slot is free (or others are already waiting for one).
        """
        self._slots.acquire_on_behalf_of_nowait(owner)

    def check(self) -> None:
        """Raise :class:`OverloadedError` if a request arriving now would be refused."""
        if self._slots.borrowed_tokens >= self._slots.total_tokens and self._queue_full():
            raise self._overloaded()

    def _queue_full(self) -> bool:
        return self._slots.statistics().tasks_waiting >= self._max_queued

    def _overloaded(self) -> OverloadedError:
        return OverloadedError(
            f"engine overloaded: {self._slots.borrowed_tokens} requests in flight and "
            f"{self._max_queued} queued",
            retry_after=self.retry_after(),
        )

    async def acquire(self, owner: object) -> None:
        """Take a slot for ``owner``, waiting in the queue if none is free.

        Blocks until a slot is free, in FIFO order. Raises ``trio.Cancelled`` (leaving the queue) if the
        caller's scope is cancelled first.

        Raises:
            OverloadedError: at once, when the queue is already full.
        """
        try:
            self.acquire_nowait(owner)
        except trio.WouldBlock:
            pass
        else:
            # Holding the slot now: yield without a cancellation point, or a cancel here would leak it.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._queue_full():
            raise self._overloaded()
        await self._slots.acquire_on_behalf_of(owner)

    def release(self, owner: object, *, service_time: float | None = None) -> None:
        """Give back ``owner``'s slot; ``service_time`` (seconds it was held) feeds the estimate."""
        self._slots.release_on_behalf_of(owner)
        if service_time is not None:
            self._service_time += _EWMA_ALPHA * (service_time - self._service_time)

    def retry_after(self) -> float:
        """Seconds until a new request would likely get a slot: the queue ahead of it, served
        ``max_in_flight`` at a time, at the recent average service time (at least 1 ms)."""
        waves = math.ceil((self._slots.statistics().tasks_waiting + 1) / self._slots.total_tokens)
        return max(0.001, round(waves * self._service_time, 3))

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            in_flight=self._slots.borrowed_tokens,
            queued=self._slots.statistics().tasks_waiting,
            max_in_flight=int(self._slots.total_tokens),
            max_queued=self._max_queued,
            service_time=self._service_time,
        )
