"""The bounded event buffer: policies and coalescing at exact virtual times."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from dspy_trio.engine import FieldDelta, SlowConsumerError, StatusEvent
from dspy_trio.engine._event_buffer import EventBuffer


def delta(text: str, field: str = "answer") -> FieldDelta:
    return FieldDelta("self", field, text)


async def test_block_policy_holds_the_producer_at_capacity(autojump_clock: Any) -> None:
    buffer = EventBuffer(3, "block")
    put_times: list[float] = []

    async def produce() -> None:
        for i in range(6):
            await buffer.put(delta(str(i)))
            put_times.append(trio.current_time())
        buffer.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.sleep(10)
        assert len(buffer) == 3
        assert len(put_times) == 3
        received = []
        while True:
            try:
                received.append(await buffer.get())
            except trio.EndOfChannel:
                break
            await trio.sleep(1)
    assert [e.text for e in received] == ["0", "1", "2", "3", "4", "5"]  # type: ignore[union-attr]
    assert put_times == [0, 0, 0, 10, 11, 12]
    assert buffer.peak == 3


async def test_timeout_policy_gives_up_on_a_consumer_that_stops(autojump_clock: Any) -> None:
    buffer = EventBuffer(2, "timeout", consumer_timeout=5)
    await buffer.put(delta("a"))
    await buffer.put(delta("b"))
    start = trio.current_time()
    with pytest.raises(SlowConsumerError, match="read nothing for 5s"):
        await buffer.put(delta("c"))
    assert trio.current_time() - start == 5


async def test_timeout_counts_progress_not_total_time(autojump_clock: Any) -> None:
    buffer = EventBuffer(1, "timeout", consumer_timeout=5)

    async def slow_consumer() -> None:
        while True:
            await trio.sleep(4)
            await buffer.get()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_consumer)
        for i in range(5):
            await buffer.put(delta(str(i)))
        assert trio.current_time() == 16
        nursery.cancel_scope.cancel()


async def test_drop_policy_never_waits_and_drops_the_oldest_deltas(autojump_clock: Any) -> None:
    buffer = EventBuffer(3, "drop")
    await buffer.put(StatusEvent("running"))
    for i in range(5):
        await buffer.put(delta(str(i)))
    assert trio.current_time() == 0
    assert buffer.dropped == 3
    buffer.close()
    events = []
    while True:
        try:
            events.append(await buffer.get())
        except trio.EndOfChannel:
            break
    assert events == [StatusEvent("running"), delta("3"), delta("4")]


async def test_coalescing_merges_up_to_the_char_limit_while_the_consumer_lags(autojump_clock: Any) -> None:
    buffer = EventBuffer(10, "block", coalesce_chars=4)
    for text in ["ab", "c", "d", "ef", "g"]:
        await buffer.put(delta(text))
    await buffer.put(delta("x", field="reasoning"))
    buffer.close()
    texts = []
    while True:
        try:
            texts.append(await buffer.get())
        except trio.EndOfChannel:
            break
    assert texts == [delta("abcd"), delta("efg"), delta("x", field="reasoning")]
    assert buffer.coalesced == 3


async def test_coalescing_holds_the_newest_delta_for_coalesce_ms(autojump_clock: Any) -> None:
    buffer = EventBuffer(10, "block", coalesce_ms=100)
    arrivals: list[tuple[str, float]] = []

    async def consume() -> None:
        while True:
            try:
                event = await buffer.get()
            except trio.EndOfChannel:
                return
            assert isinstance(event, FieldDelta)
            arrivals.append((event.text, round(trio.current_time(), 6)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(10):  # one token every 30 ms
            await buffer.put(delta(str(i)))
            await trio.sleep(0.03)
        await trio.sleep(1)
        await buffer.put(delta("late"))
        buffer.close()
    # Each event leaves 100 ms after its first token arrived, carrying every token seen by then.
    assert arrivals == [("0123", 0.1), ("4567", 0.22), ("89", 0.34), ("late", 1.3)]


async def test_close_wakes_a_waiting_consumer_and_refuses_new_events(autojump_clock: Any) -> None:
    buffer = EventBuffer(2, "block")
    async with trio.open_nursery() as nursery:

        async def close_later() -> None:
            await trio.sleep(2)
            buffer.close()

        nursery.start_soon(close_later)
        with pytest.raises(trio.EndOfChannel):
            await buffer.get()
        assert trio.current_time() == 2
    with pytest.raises(trio.ClosedResourceError):
        await buffer.put(delta("x"))
