"""Admission on the virtual clock: weighted fair order across tenants, FIFO within one, limits that are
never exceeded, exactly one outcome for every request, and refusals of waits that cannot end in time.

Every test runs on ``MockClock(autojump_threshold=0)``; the property tests drive random tenants,
weights, service times, arrivals, cancels and deadlines through the real :class:`Admission`, a task per
request, and check the invariants at every instant and at the end.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from dspy_trio.engine import DeadlineUnmeetableError, OverloadedError, TenantOverloadedError
from dspy_trio.engine._admission import Admission
from dspy_trio.engine._fair_queue import Lane, Ticket

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Probe:
    """Checks the admission's invariants each time a request starts or ends."""

    def __init__(self, admission: Admission, lanes: list[Lane]) -> None:
        self.admission = admission
        self.lanes = lanes
        self.starts: list[tuple[float, str]] = []
        self.peak = 0

    def check(self) -> None:
        admission = self.admission
        assert 0 <= admission.in_flight <= admission.max_in_flight
        assert 0 <= admission.queued <= admission.max_queued
        assert admission.in_flight == sum(lane.in_flight for lane in self.lanes)
        assert admission.queued == sum(lane.queued for lane in self.lanes)
        for lane in self.lanes:
            assert 0 <= lane.in_flight <= lane.max_in_flight
            assert 0 <= lane.queued <= lane.max_queued
        self.peak = max(self.peak, admission.in_flight)


async def hold(admission: Admission, probe: Probe, lane: Lane, service: float, outcome: list[str]) -> None:
    """One request: a slot, ``service`` seconds in it, the slot back. Appends its one outcome."""
    ticket = Ticket(lane)
    try:
        await admission.acquire(ticket)
    except OverloadedError as exc:
        outcome.append(exc.code)
        return
    except trio.Cancelled:
        outcome.append("cancelled in queue")
        raise
    probe.starts.append((trio.current_time(), lane.name))
    probe.check()
    try:
        await trio.sleep(service)
        outcome.append("served")
    except trio.Cancelled:
        outcome.append("cancelled running")
        raise
    finally:
        admission.release(ticket, service_time=trio.current_time() - ticket.started)
        probe.check()


async def closed_loop(
    admission: Admission, probe: Probe, lane: Lane, service: float, until: float, served: Counter[str]
) -> None:
    """A client that sends its next request as soon as the last one ends, until ``until``. Counts the
    requests that *started* before ``until`` (what is still queued then drains alone, in any order)."""
    while trio.current_time() < until:
        outcome: list[str] = []
        await hold(admission, probe, lane, service, outcome)
        if outcome == ["served"] and trio.current_time() - service < until:
            served[lane.name] += 1


async def test_fifo_inside_one_tenant(autojump_clock: Any) -> None:
    admission = Admission(1, 10)
    lane = Lane("a")
    order: list[int] = []
    probe = Probe(admission, [lane])

    async def one(i: int) -> None:
        ticket = Ticket(lane)
        await admission.acquire(ticket)
        order.append(i)
        probe.check()
        await trio.sleep(1)
        admission.release(ticket, service_time=1)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
            await trio.sleep(0.01)
    assert order == list(range(6))


async def test_a_quiet_tenant_is_next_however_long_the_noisy_queue(autojump_clock: Any) -> None:
    """FIFO made the quiet tenant wait behind all 40 of the noisy one's requests (10 waves of 1 s); now
    its request takes the next free slot."""
    admission = Admission(4, 100)
    noisy, quiet = Lane("noisy"), Lane("quiet")
    probe = Probe(admission, [noisy, quiet])
    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(hold, admission, probe, noisy, 1.0, [])
        await trio.sleep(2.5)  # noisy has started three waves; 28 of its requests wait
        assert admission.queued == 28
        started = trio.current_time()
        outcome: list[str] = []
        await hold(admission, probe, quiet, 1.0, outcome)
        assert outcome == ["served"]
        assert trio.current_time() - started == pytest.approx(1.5)  # 0.5 for the next slot, 1 of service


async def test_weights_share_the_slots_three_to_one(autojump_clock: Any) -> None:
    admission = Admission(4, 1000)
    heavy, light = Lane("heavy", 3), Lane("light", 1)
    probe = Probe(admission, [heavy, light])
    served: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        for lane in (heavy, light):
            for _ in range(20):
                nursery.start_soon(closed_loop, admission, probe, lane, 0.2, 60.0, served)
    assert served["heavy"] / served["light"] == pytest.approx(3.0, rel=0.02)
    assert served.total() == pytest.approx(60 / 0.2 * 4, rel=0.01)


async def test_a_tenant_of_long_requests_gets_its_share_of_time_not_of_starts(autojump_clock: Any) -> None:
    """Virtual time is charged in service seconds: a tenant whose requests hold a slot 4x as long gets
    a quarter of the starts, and the same time in the slots."""
    admission = Admission(2, 1000)
    long, short = Lane("long"), Lane("short")
    probe = Probe(admission, [long, short])
    served: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        for lane, service in ((long, 2.0), (short, 0.5)):
            for _ in range(10):
                nursery.start_soon(closed_loop, admission, probe, lane, service, 200.0, served)
    assert served["long"] * 2.0 == pytest.approx(served["short"] * 0.5, rel=0.05)


async def test_weight_one_beside_weight_one_hundred_still_progresses(autojump_clock: Any) -> None:
    admission = Admission(1, 1000)
    big, small = Lane("big", 100), Lane("small", 1)
    probe = Probe(admission, [big, small])
    served: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        for lane in (big, small):
            for _ in range(5):
                nursery.start_soon(closed_loop, admission, probe, lane, 0.1, 101.0, served)
    assert served["small"] >= 9  # ~1 start in 101: 10 in 1,010 starts
    assert served["big"] / served["small"] == pytest.approx(100, rel=0.15)


async def test_an_idle_tenant_banks_no_credit(autojump_clock: Any) -> None:
    """A tenant idle while another ran alone does not then take every slot to catch up: from the moment
    both are busy they alternate."""
    admission = Admission(1, 1000)
    early, late = Lane("early"), Lane("late")
    probe = Probe(admission, [early, late])
    served: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(closed_loop, admission, probe, early, 1.0, 120.0, served)
        await trio.sleep(100)
        assert served["late"] == 0
        before = served["early"]
        for _ in range(3):
            nursery.start_soon(closed_loop, admission, probe, late, 1.0, 120.0, served)
    late_run = [name for at, name in probe.starts if at >= 100.5]
    assert served["early"] - before == pytest.approx(served["late"], abs=2)
    assert "early" in late_run[:4]  # the newcomer is next, but did not take the next twenty slots


async def test_a_tenant_at_its_cap_waits_but_lets_others_through(autojump_clock: Any) -> None:
    admission = Admission(4, 100)
    capped, other = Lane("capped", max_in_flight=1), Lane("other")
    probe = Probe(admission, [capped, other])
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(hold, admission, probe, capped, 1.0, [])
        await trio.sleep(0.1)
        assert (capped.in_flight, capped.queued, admission.in_flight) == (1, 2, 1)
        started = trio.current_time()
        await hold(admission, probe, other, 1.0, [])
        assert trio.current_time() - started == 1.0  # a free slot: no wait behind the capped tenant
    assert trio.current_time() == 3.0  # the capped tenant ran one at a time


async def test_a_full_tenant_queue_is_refused_with_its_own_code(autojump_clock: Any) -> None:
    admission = Admission(4, 100)
    lane = Lane("t", max_in_flight=1, max_queued=1)
    probe = Probe(admission, [lane])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, admission, probe, lane, 2.0, [])
        nursery.start_soon(hold, admission, probe, lane, 2.0, [])
        await trio.sleep(0.5)
        start = trio.current_time()
        with pytest.raises(TenantOverloadedError) as info:
            await admission.acquire(Ticket(lane))
        assert trio.current_time() == start
        assert info.value.tenant == "t"
        assert info.value.retry_after > 0
        admission.check(Lane("someone else"))  # the engine itself has room


async def test_deadline_unmeetable_is_refused_at_once_and_only_when_clearly(autojump_clock: Any) -> None:
    """With 2 slots of 1 s measured service and 6 queued, a request waits ~3.5 s and runs 1 s: one with
    2 s left is refused at once (it would time out in the queue), one with 5 s left is queued and
    served."""
    admission = Admission(2, 100)
    lane = Lane("a")
    probe = Probe(admission, [lane])
    async with trio.open_nursery() as nursery:
        await hold(admission, probe, lane, 1.0, [])  # a measurement: 1 s
        for _ in range(8):
            nursery.start_soon(hold, admission, probe, lane, 1.0, [])
        await trio.sleep(0.25)
        assert (admission.in_flight, admission.queued) == (2, 6)
        start = trio.current_time()
        with trio.move_on_after(2.0), pytest.raises(DeadlineUnmeetableError) as info:
            await admission.acquire(Ticket(lane))
        assert trio.current_time() == start
        assert info.value.retry_after == pytest.approx(3.5 + 1.0 - 2.0)
        outcome: list[str] = []
        with trio.move_on_after(5.0):
            await hold(admission, probe, lane, 1.0, outcome)
        assert outcome == ["served"]
    assert admission.deadline_refusals == 1


async def test_a_wait_that_leaves_no_time_for_the_shortest_service_is_refused(autojump_clock: Any) -> None:
    """A slot at ~3.5 s and a service of at least ~1 s: 4 s left is too little (it would time out in
    the call it got too late), but after one short service of 0.25 s the low estimate falls at once and
    the same deadline is queued."""
    admission = Admission(2, 100)
    lane = Lane("a")
    probe = Probe(admission, [lane])
    await hold(admission, probe, lane, 1.0, [])
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(hold, admission, probe, lane, 1.0, [])
        await trio.sleep(0.25)
        with trio.move_on_after(4.0), pytest.raises(DeadlineUnmeetableError):
            await admission.acquire(Ticket(lane))
    await hold(admission, probe, lane, 0.25, [])  # the low estimate follows a shorter service at once
    assert admission._low_service == 0.25
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(hold, admission, probe, lane, 1.0, [])
        await trio.sleep(0.25)
        ticket = Ticket(lane)
        with trio.move_on_after(4.0):
            await admission.acquire(ticket)  # queued, not refused
            admission.release(ticket)
    assert admission.deadline_refusals == 1


async def test_no_refusal_on_a_guess(autojump_clock: Any) -> None:
    """Before any request finished the service time is a guess: a short deadline waits in the queue."""
    admission = Admission(1, 10)
    lane = Lane("a")
    probe = Probe(admission, [lane])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, admission, probe, lane, 10.0, [])
        await trio.sleep(0.1)
        with trio.move_on_after(0.5) as scope:
            await admission.acquire(Ticket(lane))
        assert scope.cancelled_caught
        assert admission.queued == 0


# --- properties --------------------------------------------------------------------------------------


@attrs.frozen
class Arrival:
    lane: int
    at: float
    service: float
    deadline: float | None  # seconds after arrival, or None
    cancel_after: float | None  # seconds after arrival, or None


@st.composite
def schedules(draw: Any) -> tuple[int, int, list[tuple[float, float | None, float | None]], list[Arrival]]:
    max_in_flight = draw(st.integers(1, 4))
    max_queued = draw(st.integers(0, 12))
    lanes = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0.5, 1.0, 2.0, 7.0]),
                st.one_of(st.none(), st.integers(1, 3).map(float)),
                st.one_of(st.none(), st.integers(0, 4).map(float)),
            ),
            min_size=1,
            max_size=4,
        )
    )
    times = st.integers(0, 40).map(lambda n: n / 8)
    arrivals = draw(
        st.lists(
            st.builds(
                Arrival,
                lane=st.integers(0, len(lanes) - 1),
                at=times,
                service=st.integers(1, 16).map(lambda n: n / 8),
                deadline=st.one_of(st.none(), st.integers(1, 40).map(lambda n: n / 8)),
                cancel_after=st.one_of(st.none(), st.integers(0, 24).map(lambda n: n / 8)),
            ),
            min_size=1,
            max_size=30,
        )
    )
    return max_in_flight, max_queued, lanes, arrivals


@given(schedules())
@PROPERTY
def test_any_schedule_keeps_the_limits_and_gives_one_outcome_each(
    schedule: tuple[int, int, list[tuple[float, float | None, float | None]], list[Arrival]],
) -> None:
    """Random tenants (weights, caps), arrivals, service times, deadlines and cancels at any instant
    (also the instant a slot is handed over): the engine's and every tenant's limits hold at every
    start and end, every request has exactly one outcome, a request whose deadline passed is never
    started, and the scheduler is empty and consistent at the end."""
    max_in_flight, max_queued, lane_specs, arrivals = schedule
    outcomes: list[list[str]] = [[] for _ in arrivals]

    async def main() -> None:
        admission = Admission(max_in_flight, max_queued)
        lanes = [
            Lane(
                f"t{i}",
                weight,
                max_in_flight=cap if cap is not None else math.inf,
                max_queued=queue if queue is not None else math.inf,
            )
            for i, (weight, cap, queue) in enumerate(lane_specs)
        ]
        probe = Probe(admission, lanes)

        async def request(i: int, arrival: Arrival) -> None:
            await trio.sleep(arrival.at)
            deadline = math.inf if arrival.deadline is None else trio.current_time() + arrival.deadline
            with trio.CancelScope(deadline=deadline) as scope:
                if arrival.cancel_after is not None:
                    cancel_at = trio.current_time() + arrival.cancel_after

                    async def cancel() -> None:
                        await trio.sleep_until(cancel_at)
                        scope.cancel()

                    async with trio.open_nursery() as inner:
                        inner.start_soon(cancel)
                        await hold(admission, probe, lanes[arrival.lane], arrival.service, outcomes[i])
                        inner.cancel_scope.cancel()
                else:
                    await hold(admission, probe, lanes[arrival.lane], arrival.service, outcomes[i])
            if outcomes[i] and outcomes[i][0] == "served":
                assert deadline >= trio.current_time()  # nothing ran past its deadline and was served

        async with trio.open_nursery() as nursery:
            for i, arrival in enumerate(arrivals):
                nursery.start_soon(request, i, arrival)
        probe.check()
        assert (admission.in_flight, admission.queued) == (0, 0)
        assert all(lane.idle for lane in lanes)
        assert admission._queue.pop() is None
        assert probe.peak <= max_in_flight

    trio.run(main, clock=MockClock(autojump_threshold=0))
    allowed = {
        "served",
        "cancelled in queue",
        "cancelled running",
        "overloaded",
        "tenant_overloaded",
        "deadline_unmeetable",
    }
    for outcome in outcomes:
        assert len(outcome) == 1, outcome
        assert outcome[0] in allowed


@st.composite
def contests(draw: Any) -> tuple[int, list[tuple[float, float]]]:
    slots = draw(st.integers(1, 4))
    lanes = draw(
        st.lists(
            st.tuples(st.sampled_from([1.0, 2.0, 3.0, 5.0]), st.sampled_from([0.25, 0.5, 1.0, 2.0])),
            min_size=2,
            max_size=4,
        )
    )
    return slots, lanes


@given(contests())
@PROPERTY
def test_saturating_tenants_share_time_by_weight(contest: tuple[int, list[tuple[float, float]]]) -> None:
    """Tenants of random weights and service times, each keeping more requests queued than there are
    slots: the seconds of service each one is given, divided by its weight, stay within a bound of each
    other's at every start (a few services, whatever the run's length), so over 200 s the shares are
    their weights' within 10%."""
    slots, specs = contest
    longest = max(service for _, service in specs)

    async def main() -> dict[str, float]:
        admission = Admission(slots, 10_000)
        lanes = [Lane(f"t{i}", weight) for i, (weight, _) in enumerate(specs)]
        probe = Probe(admission, lanes)
        service_of = {lane.name: service for lane, (_, service) in zip(lanes, specs, strict=True)}
        given_time: Counter[str] = Counter()
        worst = 0.0

        async def client(lane: Lane, service: float) -> None:
            nonlocal worst
            while trio.current_time() < 200:
                ticket = Ticket(lane)
                await admission.acquire(ticket)
                if trio.current_time() < 200:  # after it, the queues drain alone, in any order
                    given_time[lane.name] += service
                    normalized = [given_time[lane.name] / lane.weight for lane in lanes]
                    worst = max(worst, max(normalized) - min(normalized))
                await trio.sleep(service)
                admission.release(ticket, service_time=service)

        async with trio.open_nursery() as nursery:
            for lane in lanes:
                for _ in range(slots + 2):
                    nursery.start_soon(client, lane, service_of[lane.name])
        probe.check()
        bound = (slots + 2) * longest * 2 / min(w for w, _ in specs)
        assert worst <= bound, (worst, bound)
        return {lane.name: given_time[lane.name] / lane.weight for lane in lanes}

    normalized = trio.run(main, clock=MockClock(autojump_threshold=0))
    mean = sum(normalized.values()) / len(normalized)
    for value in normalized.values():
        assert value == pytest.approx(mean, rel=0.1)
