"""Admission control: a bounded queue served in weighted fair order, in front of a global in-flight limit.

A request either gets a slot at once, waits its turn in a queue of at most ``max_queued`` requests, or is
refused at once — nothing ever waits in an unbounded line, nor in a line it cannot leave in time:

- :class:`OverloadedError` when the engine's queue is full;
- :class:`TenantOverloadedError` when its tenant's own queue is full (at its in-flight cap and
  ``max_queued`` waiting);
- :class:`DeadlineUnmeetableError` when the wait it can expect (the starts ahead of it, at the measured
  service rate), and then the shortest service recently seen, already pass its deadline: it would time
  out in the queue, or in a call it got too late to finish.

The queue is a :class:`dspy_trio.engine._fair_queue.FairQueue`: when the engine is saturated, a released
slot goes to the tenant furthest behind its weighted share, first come first served within a tenant.
Waiting happens inside the caller's cancel scope, so the request's deadline covers its queue time; a
request cancelled while queued leaves the queue at once, and a slot handed to a waiter is its own from
that instant (a cancel arriving after it is seen by the request's next checkpoint, not here), so a slot
is never lost and never given twice.
"""

from __future__ import annotations

import math

import attrs
import trio

from ._errors import DeadlineUnmeetableError, OverloadedError, TenantOverloadedError
from ._fair_queue import FairQueue, Lane, Ticket

# The service-time estimate before any request has finished, in seconds.
_DEFAULT_SERVICE_TIME = 1.0
# Weight of the newest sample in the service-time moving average.
_EWMA_ALPHA = 0.2
# How fast the low estimate of the service time rises towards a longer sample (it falls to a shorter one
# at once): it stays near the shortest recent services.
_LOW_ALPHA = 0.05


@attrs.frozen
class AdmissionStatistics:
    """A snapshot of admission. ``in_flight`` holds slots; ``queued`` waits for one.

    Attributes:
        service_time: Seconds a request holds its slot, a moving average (the default 1 s before any).
        deadline_refusals: Requests refused because their deadline could not be met.
    """

    in_flight: int
    queued: int
    max_in_flight: int
    max_queued: int
    service_time: float
    deadline_refusals: int = 0


class Admission:
    """Slots for running requests, with a bounded, weighted fair queue in front.

    Args:
        max_in_flight: Requests that may hold a slot at once.
        max_queued: Requests that may wait for a slot; more are refused at once.
    """

    def __init__(self, max_in_flight: int, max_queued: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.in_flight = 0
        self._queue = FairQueue()
        self._service_time = _DEFAULT_SERVICE_TIME
        self._measured = False  # whether _service_time comes from a request that finished
        self._low_service = 0.0  # a low estimate of the service time: near the shortest recent ones
        self.deadline_refusals = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<Admission [{s.in_flight}/{s.max_in_flight} in flight, {s.queued}/{s.max_queued} queued]>"

    @property
    def queued(self) -> int:
        return self._queue.queued

    def _can_start(self, lane: Lane) -> bool:
        return self.in_flight < self.max_in_flight and lane.in_flight < lane.max_in_flight

    def check(self, lane: Lane | None = None) -> None:
        """Raise now what a request of ``lane`` arriving now would be refused with, if anything (the
        deadline aside).

        Raises:
            OverloadedError: the engine's queue is full.
            TenantOverloadedError: the tenant's own queue is full.
        """
        if lane is None:
            if self.in_flight >= self.max_in_flight and self._queue.queued >= self.max_queued:
                raise self._overloaded()
            return
        if not self._can_start(lane):
            self._check_room(lane)

    def _check_room(self, lane: Lane) -> None:
        if lane.queued >= lane.max_queued:
            raise TenantOverloadedError(
                f"tenant {lane.name!r} overloaded: {lane.in_flight} requests in flight and "
                f"{lane.queued} queued, its limits",
                retry_after=self._lane_retry_after(lane),
                tenant=lane.name,
            )
        if self._queue.queued >= self.max_queued:
            raise self._overloaded()

    def _overloaded(self) -> OverloadedError:
        return OverloadedError(
            f"engine overloaded: {self.in_flight} requests in flight and {self.max_queued} queued",
            retry_after=self.retry_after(),
        )

    async def acquire(self, ticket: Ticket) -> None:
        """Take a slot for ``ticket``, waiting in the queue if none is free.

        Blocks until a slot is free and it is this ticket's turn (weighted fair across tenants, FIFO
        within one). Raises ``trio.Cancelled`` (leaving the queue) if the caller's scope is cancelled
        first.

        Raises:
            OverloadedError, TenantOverloadedError: at once, when the queue (the engine's or the
                tenant's) is already full.
            DeadlineUnmeetableError: at once, when the expected wait passes the caller's deadline.
        """
        lane = ticket.lane
        if self._can_start(lane):
            self._start(ticket)
            # Holding the slot now: yield without a cancellation point, or a cancel here would leak it.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled scope's -inf deadline is no refusal
        self._check_room(lane)
        self._check_deadline(lane)
        queue = self._queue
        queue.push(ticket)
        ticket.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            queue.remove(ticket)
            ticket.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _start(self, ticket: Ticket) -> None:
        self.in_flight += 1
        # Charged the measured average, corrected at release; nothing on the default guess, whose
        # corrections would move tenants apart after others had caught up with the guess.
        estimate = self._service_time if self._measured else 0.0
        self._queue.start(ticket, trio.current_time(), estimate)

    def release(self, ticket: Ticket, *, service_time: float | None = None) -> None:
        """Give back ``ticket``'s slot; ``service_time`` (seconds it was held) feeds the estimate and
        corrects its tenant's share. The freed slot goes to the next queued ticket in fair order."""
        self.in_flight -= 1
        held = service_time if service_time is not None else trio.current_time() - ticket.started
        self._queue.finish(ticket, held)
        if service_time is not None:
            if self._measured:
                self._service_time += _EWMA_ALPHA * (service_time - self._service_time)
                low = self._low_service
                self._low_service = (
                    service_time if service_time < low else low + _LOW_ALPHA * (service_time - low)
                )
            else:
                self._service_time, self._measured = service_time, True
                self._low_service = service_time
        self._hand_over()

    def _hand_over(self) -> None:
        """Start queued tickets while slots are free, in fair order; wake their tasks."""
        queue = self._queue
        while self.in_flight < self.max_in_flight:
            ticket = queue.pop()
            if ticket is None:
                return
            self._start(ticket)
            task, ticket.task = ticket.task, None
            trio.lowlevel.reschedule(task)

    # --- estimates -----------------------------------------------------------------------------------

    def expected_wait(self, lane: Lane) -> float:
        """Seconds a ticket of ``lane`` queued now can expect to wait for its slot: the starts ahead of
        it (:meth:`FairQueue.starts_before`) and itself, at the engine's measured rate
        (``max_in_flight`` per service time), and no faster than the lane's own cap allows."""
        ahead = self._queue.starts_before(lane) + 1
        wait = ahead * self._service_time / self.max_in_flight
        if lane.max_in_flight < self.max_in_flight:
            wait = max(wait, (lane.queued + 1) * self._service_time / lane.max_in_flight)
        return wait

    def _check_deadline(self, lane: Lane) -> None:
        """Refuse a ticket whose expected wait and shortest likely service already pass its deadline.
        Only on measured service times (never on the default guess); the wait is a low estimate (it
        leaves out later arrivals that may go first) and the service the shortest recently seen, so a
        request that might still be served is queued."""
        if not self._measured:
            return
        remaining = trio.current_effective_deadline() - trio.current_time()
        if math.isinf(remaining):
            return
        wait = self.expected_wait(lane)
        if wait + self._low_service > remaining:
            self.deadline_refusals += 1
            raise DeadlineUnmeetableError(
                f"the expected wait for a slot ({wait:.3f}s) and the shortest recent service "
                f"({self._low_service:.3f}s) pass the request's deadline (in {max(0.0, remaining):.3f}s)",
                retry_after=max(0.001, round(wait + self._low_service - max(0.0, remaining), 3)),
            )

    def retry_after(self) -> float:
        """Seconds until a new request would likely get a slot: the queue ahead of it, served
        ``max_in_flight`` at a time, at the recent average service time (at least 1 ms)."""
        waves = math.ceil((self._queue.queued + 1) / self.max_in_flight)
        return max(0.001, round(waves * self._service_time, 3))

    def _lane_retry_after(self, lane: Lane) -> float:
        """Seconds until a tenant at its own limits would likely have room again."""
        slots = min(lane.max_in_flight, self.max_in_flight)
        waves = math.ceil((lane.queued + 1) / slots) if slots else 1
        return max(0.001, round(waves * self._service_time, 3))

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            in_flight=self.in_flight,
            queued=self._queue.queued,
            max_in_flight=self.max_in_flight,
            max_queued=self.max_queued,
            service_time=self._service_time,
            deadline_refusals=self.deadline_refusals,
        )
