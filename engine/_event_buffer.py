"""The bounded buffer between a stream's producer (the running program) and its consumer.

One producer, one consumer, at most ``capacity`` events. What happens when it is full is the stream's
backpressure policy:

- ``block``: the producer waits for the consumer. Because the LM backend pushes each delta before it
  reads the next bytes from the provider, the provider's socket read pauses too, and TCP flow control
  carries the backpressure upstream. Memory stays at ``capacity`` events.
- ``timeout``: the same, but a consumer that makes no progress for ``consumer_timeout`` seconds ends the
  stream with :class:`SlowConsumerError` (and so cancels the upstream call).
- ``drop``: the producer never waits; the oldest text delta in the buffer is dropped to make room. What
  is dropped is counted. StatusEvent and terminal events are never dropped.

Coalescing merges a delta into the delta queued just before it (same predictor and field) up to
``coalesce_chars`` characters, and lets the consumer hold back the newest delta until it is
``coalesce_ms`` old, so fast streams cost fewer, larger events. Both run on Trio's clock.
"""

from __future__ import annotations

import math
from collections import deque

import attrs
import trio

from ._errors import SlowConsumerError
from ._stream_events import FieldDelta, StreamEvent
from ._stream_options import Backpressure


class EventBuffer:
    """A bounded FIFO of stream events with a backpressure policy. Not shared between streams."""

    def __init__(
        self,
        capacity: int,
        policy: Backpressure,
        *,
        consumer_timeout: float = math.inf,
        coalesce_chars: int = 0,
        coalesce_ms: float = 0.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("an event buffer holds at least one event")
        self._slots: deque[StreamEvent] = deque()
        # When each queued event was queued: only coalesce_ms needs it.
        self._created: deque[float] | None = deque() if coalesce_ms > 0 else None
        self._capacity = capacity
        self._policy = policy
        self._consumer_timeout = consumer_timeout
        self._coalesce_chars = coalesce_chars
        self._coalesce_s = coalesce_ms / 1000.0
        self._coalescing = coalesce_chars > 0 or coalesce_ms > 0
        self._not_empty = trio.lowlevel.ParkingLot()
        self._not_full = trio.lowlevel.ParkingLot()
        self._closed = False
        self.dropped = 0
        self.coalesced = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        return (
            f"<EventBuffer [{len(self._slots)}/{self._capacity} {self._policy} | "
            f"dropped {self.dropped}, coalesced {self.coalesced}]{' closed' if self._closed else ''}>"
        )

    def _merge(self, event: StreamEvent) -> bool:
        if not (self._coalescing and isinstance(event, FieldDelta) and self._slots):
            return False
        last = self._slots[-1]
        if not (isinstance(last, FieldDelta) and last.same_field(event)):
            return False
        merged = last.text + event.text
        if self._coalesce_chars and len(merged) > self._coalesce_chars:
            return False
        self._slots[-1] = attrs.evolve(last, text=merged)
        self.coalesced += 1
        return True

    def _drop_oldest_delta(self) -> bool:
        for index, slot in enumerate(self._slots):
            if isinstance(slot, FieldDelta):
                del self._slots[index]
                if self._created is not None:
                    del self._created[index]
                self.dropped += 1
                return True
        return False

    async def put(self, event: StreamEvent) -> None:
        """Queue ``event``. Blocks while the buffer is full under ``block`` and ``timeout``.

        A cancel point, but with room in the buffer not a schedule point: a fast producer queues a
        batch of events per wake-up of the consumer instead of one per trip through the scheduler (the
        producer, an LM, yields at its own socket reads or pacing sleeps).

        Raises:
            SlowConsumerError: under ``timeout``, when the consumer took nothing for ``consumer_timeout``.
            trio.ClosedResourceError: after :meth:`close`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the stream has ended")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._coalescing and self._merge(event):
            if self._not_empty:
                self._not_empty.unpark_all()
            return
        turns = 0
        while len(self._slots) >= self._capacity:
            if self._policy == "drop":
                # A consumer woken by earlier puts has not run yet (put does not yield while there is
                # room): give it its turn before dropping. Two, as Trio may run this task first in the
                # next batch. A consumer that falls behind still loses the oldest deltas.
                if turns < 2:
                    turns += 1
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if self._closed:
                        raise trio.ClosedResourceError("the stream has ended")
                    continue
                if self._drop_oldest_delta():
                    break
                # Nothing queued may be dropped (status events only): the new delta is the oldest
                # droppable one; anything else goes in over capacity. Never wait under drop.
                if isinstance(event, FieldDelta):
                    self.dropped += 1
                    return
                break
            with trio.move_on_after(self._consumer_timeout) as waited:
                await self._not_full.park()
            if waited.cancelled_caught:
                raise SlowConsumerError(
                    f"the consumer read nothing for {self._consumer_timeout:g}s; the stream was stopped"
                )
            if self._closed:
                raise trio.ClosedResourceError("the stream has ended")
        self._slots.append(event)
        if self._created is not None:
            self._created.append(trio.current_time())
        if len(self._slots) > self.peak:
            self.peak = len(self._slots)
        if self._not_empty:
            self._not_empty.unpark_all()

    def close(self) -> None:
        """No more events will come; the consumer drains what is queued. Idempotent."""
        self._closed = True
        self._not_empty.unpark_all()
        self._not_full.unpark_all()

    def _ready(self) -> float:
        """When the head event may be handed out (``-inf``: now)."""
        head = self._slots[0]
        if self._created is None or self._closed or len(self._slots) > 1 or not isinstance(head, FieldDelta):
            return -math.inf
        if self._coalesce_chars and len(head.text) >= self._coalesce_chars:
            return -math.inf
        return self._created[0] + self._coalesce_s

    async def get(self) -> StreamEvent:
        """The next event. Blocks until one is ready (see coalescing). A cancel point; a schedule
        point only when it waits.

        Raises:
            trio.EndOfChannel: when the buffer is closed and drained.
        """
        while True:
            if not self._slots:
                if self._closed:
                    raise trio.EndOfChannel
                await self._not_empty.park()
                continue
            if self._created is not None and (ready := self._ready()) > trio.current_time():
                with trio.move_on_at(ready):
                    await self._not_empty.park()
                continue
            await trio.lowlevel.checkpoint_if_cancelled()
            event = self._slots.popleft()
            if self._created is not None:
                self._created.popleft()
            if self._not_full:
                self._not_full.unpark()
            return event
