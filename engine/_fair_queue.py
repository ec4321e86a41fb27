"""The order in which queued requests get a slot: weighted fair across tenants, first come first served
within one tenant.

Each tenant has a *lane*: its queued tickets in arrival order, its weight and its own in-flight cap, and a
virtual time — the service it has consumed divided by its weight. When a slot frees, the lane with the
smallest virtual time that may run another request (it is under its own cap) gives up its oldest ticket.
Virtual time is charged in seconds of service: the recent average when a request starts, corrected by
what it really took when it ends, so a tenant whose requests run long (long prompts, long answers) is
charged for it and gets no more than its weight's share of the engine's time.

A lane that had nothing queued starts again at the queue's virtual time (the virtual time of the
latest request started), never behind it: an idle tenant banks no credit, and a quiet tenant's request
is next as soon as it arrives. A lane of weight 1 beside one of weight 100 falls behind by 1/100 of a
service for each of the other's: it still gets one start in about every 101, never none (no starvation).

This module is pure bookkeeping (no Trio): :class:`dspy_trio.engine._admission.Admission` parks and
wakes the tasks. Every operation is O(log lanes) at most; an idle lane costs a few hundred bytes.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from typing import Any


class Ticket:
    """One request's place: queued in its lane, then holding a slot until released.

    Attributes:
        lane: The tenant's lane.
        task: The task parked while queued (set by the admission).
        charged: Seconds of service charged to the lane when it started (corrected at release).
        started: When it got its slot (Trio's clock), NaN before.
    """

    __slots__ = ("charged", "lane", "started", "task")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.task: Any = None
        self.charged = 0.0
        self.started = math.nan

    def __repr__(self) -> str:
        state = "queued" if math.isnan(self.started) else f"started at {self.started:g}"
        return f"<Ticket {self.lane.name} {state}>"


class Lane:
    """A tenant's queue and its share.

    Args:
        name: The tenant's name.
        weight: Its share relative to the others (positive).
        max_in_flight: Requests of this tenant that may hold a slot at once.
        max_queued: Requests of this tenant that may wait for one.
    """

    __slots__ = (
        "_waiting",
        "heap_key",
        "in_flight",
        "max_in_flight",
        "max_queued",
        "name",
        "vtime",
        "weight",
    )

    def __init__(
        self, name: str, weight: float = 1.0, *, max_in_flight: float = math.inf, max_queued: float = math.inf
    ) -> None:
        self.name = name
        self.weight = weight
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.vtime = 0.0  # service consumed / weight, on the queue's virtual clock
        self.in_flight = 0
        self._waiting: OrderedDict[Ticket, None] | None = None  # made on first use: idle lanes stay small
        self.heap_key = -1  # the sequence number of this lane's live heap entry; -1: not in the heap

    def __repr__(self) -> str:
        return (
            f"<Lane {self.name} [weight {self.weight:g}, vtime {self.vtime:.3f} | "
            f"{self.in_flight} in flight, {self.queued} queued]>"
        )

    @property
    def queued(self) -> int:
        return len(self._waiting) if self._waiting else 0

    @property
    def runnable(self) -> bool:
        """Whether this lane's next ticket may start now (it has one, and is under its cap)."""
        return bool(self._waiting) and self.in_flight < self.max_in_flight

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not self._waiting


class FairQueue:
    """The queued tickets of every lane, in weighted fair order. See the module docstring."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Lane]] = []  # (vtime, key, lane), stale entries skipped
        self._keys = itertools.count()
        self.vtime = 0.0  # the virtual time of the latest start: where a lane that was idle begins
        self.queued = 0
        self._backlogged_weight = 0.0  # the weights of the lanes with something queued

    def __repr__(self) -> str:
        return f"<FairQueue [{self.queued} queued, vtime {self.vtime:.3f}]>"

    def __len__(self) -> int:
        return self.queued

    # --- lanes ---------------------------------------------------------------------------------------

    def _schedule(self, lane: Lane) -> None:
        """(Re)enter ``lane`` in the heap at its current virtual time if it is runnable."""
        if lane.runnable:
            key = next(self._keys)
            lane.heap_key = key
            heapq.heappush(self._heap, (lane.vtime, key, lane))
            if len(self._heap) > 64 and len(self._heap) > 4 * self.queued:
                self._compact()
        else:
            lane.heap_key = -1

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].heap_key == entry[1]]
        heapq.heapify(self._heap)

    # --- queueing ------------------------------------------------------------------------------------

    def push(self, ticket: Ticket) -> None:
        """Queue ``ticket`` at the end of its lane. A lane that had nothing queued starts no earlier
        than the queue's virtual time."""
        lane = ticket.lane
        if lane._waiting is None:
            lane._waiting = OrderedDict()
        if not lane._waiting:
            lane.vtime = max(lane.vtime, self.vtime)
            self._backlogged_weight += lane.weight
            lane._waiting[ticket] = None
            self.queued += 1
            self._schedule(lane)
            return
        lane._waiting[ticket] = None
        self.queued += 1

    def remove(self, ticket: Ticket) -> None:
        """Take a queued ticket out (its request was cancelled or timed out while queued)."""
        lane = ticket.lane
        waiting = lane._waiting
        assert waiting is not None, "only a queued ticket can be removed"
        del waiting[ticket]
        self.queued -= 1
        if not waiting:
            self._backlogged_weight -= lane.weight
            lane.heap_key = -1  # its heap entry is stale now

    def pop(self) -> Ticket | None:
        """The next ticket to start, taken out of its lane; None when no lane is runnable. The caller
        starts it (:meth:`start`)."""
        heap = self._heap
        while heap:
            _, key, lane = heapq.heappop(heap)
            if lane.heap_key != key:
                continue  # stale: the lane was re-keyed, emptied, or hit its cap
            lane.heap_key = -1
            if not lane.runnable:
                continue
            waiting = lane._waiting
            assert waiting
            ticket, _ = waiting.popitem(last=False)
            self.queued -= 1
            if not waiting:
                self._backlogged_weight -= lane.weight
            return ticket
        return None

    # --- service -------------------------------------------------------------------------------------

    def start(self, ticket: Ticket, now: float, estimate: float) -> None:
        """``ticket`` takes a slot now: charge its lane ``estimate`` seconds of service (the recent
        average; :meth:`finish` corrects it)."""
        lane = ticket.lane
        if lane.idle:
            lane.vtime = max(lane.vtime, self.vtime)  # an idle lane banks no credit
        self.vtime = max(self.vtime, lane.vtime)
        ticket.started = now
        ticket.charged = estimate
        lane.in_flight += 1
        lane.vtime += estimate / lane.weight
        if lane._waiting:
            self._schedule(lane)  # its next ticket, at the new virtual time (or out, at its cap)

    def finish(self, ticket: Ticket, service: float) -> None:
        """``ticket`` gave its slot back after ``service`` seconds: correct its lane's charge, and let
        the lane run again if its cap held it back."""
        lane = ticket.lane
        lane.in_flight -= 1
        lane.vtime += (service - ticket.charged) / lane.weight
        if lane._waiting:
            self._schedule(lane)

    # --- estimates -----------------------------------------------------------------------------------

    def starts_before(self, lane: Lane) -> int:
        """How many queued tickets start before a ticket that ``lane`` queues now, if every lane that
        has something queued keeps it queued: the lane's own (first come, first served), and of the
        others as many as their weights' share of that time (at most all they have queued). A lower
        estimate: it leaves out what arrives later."""
        own = lane.queued
        others = self.queued - own
        if not others:
            return own
        others_weight = self._backlogged_weight - (lane.weight if own else 0.0)
        share = math.floor((own + 1) * max(0.0, others_weight) / lane.weight)
        return own + min(others, share)
