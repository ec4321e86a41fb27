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

from ._config import Backpressure
from ._errors import SlowConsumerError
from ._stream_events import FieldDelta, StreamEvent


@attrs.define
class _Slot:
    event: StreamEvent
    created: float


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
        self._slots: deque[_Slot] = deque()
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
        if not (isinstance(last.event, FieldDelta) and last.event.same_field(event)):
            return False
        merged = last.event.text + event.text
        if self._coalesce_chars and len(merged) > self._coalesce_chars:
            return False
        last.event = attrs.evolve(last.event, text=merged)
        self.coalesced += 1
        return True

    def _drop_oldest_delta(self) -> bool:
        for index, slot in enumerate(self._slots):
            if isinstance(slot.event, FieldDelta):
                del self._slots[index]
                self.dropped += 1
                return True
        return False

    async def put(self, event: StreamEvent) -> None:
        """Queue ``event``. Blocks while the buffer is full under ``block`` and ``timeout``.

        Raises:
            SlowConsumerError: under ``timeout``, when the consumer took nothing for ``consumer_timeout``.
            trio.ClosedResourceError: after :meth:`close`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the stream has ended")
        await trio.lowlevel.checkpoint()
        if self._merge(event):
            self._not_empty.unpark_all()
            return
        while len(self._slots) >= self._capacity:
            if self._policy == "drop" and self._drop_oldest_delta():
                break
            with trio.move_on_after(self._consumer_timeout) as waited:
                await self._not_full.park()
            if waited.cancelled_caught:
                raise SlowConsumerError(
                    f"the consumer read nothing for {self._consumer_timeout:g}s; the stream was stopped"
                )
            if self._closed:
                raise trio.ClosedResourceError("the stream has ended")
        self._slots.append(_Slot(event, trio.current_time()))
        self.peak = max(self.peak, len(self._slots))
        self._not_empty.unpark_all()

    def close(self) -> None:
        """No more events will come; the consumer drains what is queued. Idempotent."""
        self._closed = True
        self._not_empty.unpark_all()
        self._not_full.unpark_all()

    def _ready(self) -> float:
        """When the head event may be handed out (``-inf``: now)."""
        head = self._slots[0]
        if (
            not self._coalescing
            or self._closed
            or len(self._slots) > 1
            or not isinstance(head.event, FieldDelta)
        ):
            return -math.inf
        if self._coalesce_chars and len(head.event.text) >= self._coalesce_chars:
            return -math.inf
        return head.created + self._coalesce_s

    async def get(self) -> StreamEvent:
        """The next event. Blocks until one is ready (see coalescing).

        Raises:
            trio.EndOfChannel: when the buffer is closed and drained.
        """
        while True:
            if not self._slots:
                if self._closed:
                    raise trio.EndOfChannel
                await self._not_empty.park()
                continue
            ready = self._ready()
            if ready > trio.current_time():
                with trio.move_on_at(ready):
                    await self._not_empty.park()
                continue
            await trio.lowlevel.checkpoint()
            if not self._slots:  # the producer's drop policy may have taken it meanwhile
                continue
            event = self._slots.popleft().event
            self._not_full.unpark()
            return event
