"""Single-flight under cancellation, on a virtual clock: the shared call ends exactly when its last waiter
leaves (never before), its deadline is the latest of its waiters', every waiter gets one outcome, a
streamed call fans out to waiters that join late, and nothing is left running.

The waiters call the sharing layer (``SharedLM`` over a ``Sharing`` registry) the way the engine's
programs do; the upstream is a fake ``TrioLM`` that records when each call started and how it ended.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine import UpstreamServerError
from dspy_trio.engine._cache_config import CacheConfig
from dspy_trio.engine._coalesce import SharedLM, Sharing
from dspy_trio.engine.lm import Completion, DeltaSink, TrioLM
from dspy_trio.engine.lm._base import Message

from .helpers import tasks_living

MESSAGES = [{"role": "user", "content": "What is Trio?"}]
TEXT = "Trio runs structured concurrency"


@attrs.define
class Call:
    started: float
    ended: float | None = None
    how: str | None = None  # "completed", "cancelled", "failed"


class Upstream(TrioLM):  # type: ignore[misc]
    """A fake upstream: answers after ``duration`` seconds, or streams ``tokens`` one every ``step``."""

    def __init__(
        self,
        duration: float = 1.0,
        *,
        tokens: Sequence[str] = (),
        step: float = 0.1,
        error: Exception | None = None,
    ) -> None:
        super().__init__("fake/model")
        self.duration = duration
        self.tokens = list(tokens)
        self.step = step
        self.error = error
        self.calls: list[Call] = []

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        call = Call(trio.current_time())
        self.calls.append(call)
        try:
            if sink is not None and self.tokens:
                for token in self.tokens:
                    await trio.sleep(self.step)
                    await sink.send(token)
            else:
                await trio.sleep(self.duration)
            if self.error is not None:
                raise self.error
        except trio.Cancelled:
            call.ended, call.how = trio.current_time(), "cancelled"
            raise
        except Exception:
            call.ended, call.how = trio.current_time(), "failed"
            raise
        call.ended, call.how = trio.current_time(), "completed"
        text = "".join(self.tokens) or TEXT
        return Completion([text], {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})


class Collect:
    """A waiter's sink: what it received, delta by delta."""

    def __init__(self, delay: float = 0.0) -> None:
        self.deltas: list[str] = []
        self.delay = delay

    async def send(self, text: str) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        self.deltas.append(text)


def run(test: Any) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


# --- the property: random waiters joining and leaving ---------------------------------------------


@attrs.frozen
class Plan:
    join: float  # when the waiter calls
    leave: float | None  # when it leaves (None: it stays until the answer)
    how: str  # "cancel" (its scope cancelled: a client gone), "deadline" (its own deadline), "stay"


def plans() -> st.SearchStrategy[tuple[float, list[Plan]]]:
    """An upstream duration and waiters; no two events at the same instant (joins on whole seconds,
    leaves on halves, the call's end on quarters), so the expected story has one order."""

    def plan(join: int, after: int, how: str) -> Plan:
        return Plan(float(join), None if how == "stay" else join + after + 0.5, how)

    waiter = st.builds(
        plan, st.integers(0, 12), st.integers(0, 8), st.sampled_from(["cancel", "deadline", "stay"])
    )
    return st.tuples(st.integers(0, 10).map(lambda d: d + 0.25), st.lists(waiter, min_size=1, max_size=8))


def expected_story(duration: float, waiters: list[Plan]) -> tuple[list[tuple[float, float, str]], list[str]]:
    """The calls the upstream must see, ``(started, ended, how)``, and each waiter's outcome."""
    events: list[tuple[float, int, str]] = []
    for index, w in enumerate(waiters):
        events.append((w.join, index, "join"))
        if w.leave is not None:
            events.append((w.leave, index, "leave"))
    events.sort()
    calls: list[tuple[float, float, str]] = []
    outcomes = ["?"] * len(waiters)
    active: set[int] = set()
    started: float | None = None

    def complete_if_due(now: float) -> None:
        nonlocal started
        if started is not None and started + duration < now:
            calls.append((started, started + duration, "completed"))
            for index in active:
                outcomes[index] = "answer"
            active.clear()
            started = None

    for at, index, kind in events:
        complete_if_due(at)
        if kind == "join":
            if started is None:
                started = at
            active.add(index)
        elif index in active:
            active.discard(index)
            outcomes[index] = waiters[index].how
            if not active:
                assert started is not None
                calls.append((started, at, "cancelled"))
                started = None
    complete_if_due(math.inf)
    return calls, outcomes


async def play(duration: float, waiters: list[Plan]) -> tuple[Upstream, list[str], int]:
    upstream = Upstream(duration)
    outcomes = ["?"] * len(waiters)
    async with trio.open_nursery() as nursery:
        sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
        lm = SharedLM("default", upstream, sharing)
        baseline = tasks_living()

        async def waiter(index: int, plan: Plan, nursery: trio.Nursery) -> None:
            await trio.sleep_until(plan.join)
            scope = trio.CancelScope()
            if plan.how == "deadline":
                assert plan.leave is not None
                scope.deadline = plan.leave
            elif plan.how == "cancel":
                assert plan.leave is not None
                nursery.start_soon(cancel_at, scope, plan.leave)
            with scope:
                completion = await lm.complete_call(MESSAGES, {}, None, {})
                assert outcomes[index] == "?", "a second outcome"
                outcomes[index] = "answer" if completion.texts == [TEXT] else "wrong answer"
            if scope.cancelled_caught:
                assert outcomes[index] == "?", "a second outcome"
                outcomes[index] = plan.how

        async def cancel_at(scope: trio.CancelScope, when: float) -> None:
            await trio.sleep_until(when)
            scope.cancel()

        async with trio.open_nursery() as waiters_nursery:
            for index, plan in enumerate(waiters):
                waiters_nursery.start_soon(waiter, index, plan, waiters_nursery)
        left = tasks_living() - baseline
        nursery.cancel_scope.cancel()
    return upstream, outcomes, left


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans())
def test_the_shared_call_ends_exactly_when_its_last_waiter_leaves(plan: tuple[float, list[Plan]]) -> None:
    """Waiters join and leave (a cancel, their own deadline) at random: the upstream call is cancelled
    at the instant the last waiter leaves, never before; otherwise it completes and every waiter still
    there gets the answer; each waiter has exactly one outcome; no task is left."""
    duration, waiters = plan
    calls, outcomes = expected_story(duration, waiters)

    async def test() -> None:
        upstream, seen, left = await play(duration, waiters)
        assert [(c.started, c.ended, c.how) for c in upstream.calls] == calls
        assert seen == outcomes
        assert left == 0

    run(test)


# --- deadlines ---------------------------------------------------------------------------------------


def test_the_flight_deadline_is_the_latest_of_its_waiters_and_moves_in_when_that_one_leaves() -> None:
    async def test() -> None:
        upstream = Upstream(duration=100.0)
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)
            results: dict[str, str] = {}

            async def waiter(name: str, deadline: float, cancel: trio.CancelScope | None = None) -> None:
                with trio.move_on_at(deadline) as scope:
                    if cancel is not None:
                        with cancel:
                            await lm.complete_call(MESSAGES, {}, None, {})
                    else:
                        await lm.complete_call(MESSAGES, {}, None, {})
                results[name] = "timed out" if scope.cancelled_caught else "left"

            late = trio.CancelScope()
            nursery.start_soon(waiter, "early", 5.0)
            nursery.start_soon(waiter, "late", 20.0, late)
            await trio.sleep(1)
            (flight,) = sharing._flights.values()
            assert flight.scope.deadline == 20.0
            late.cancel()  # the waiter with the latest deadline leaves: the flight's moves in to 5
            await trio.testing.wait_all_tasks_blocked()
            assert flight.scope.deadline == 5.0
            await trio.sleep(10)
            assert results == {"early": "timed out", "late": "left"}
            assert [(c.started, c.ended, c.how) for c in upstream.calls] == [(0.0, 5.0, "cancelled")]

    run(test)


def test_a_waiter_whose_caller_moved_its_deadline_out_starts_afresh_when_the_flight_expires() -> None:
    """The flight's deadline is read when a waiter joins; a caller that moves its own scope's deadline
    later afterwards is still answered: its call starts a new flight when the old one expires."""

    async def test() -> None:
        upstream = Upstream(duration=3.0)
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)
            with trio.CancelScope(deadline=2.0) as scope:

                async def extend() -> None:
                    await trio.sleep(1)
                    scope.deadline = 10.0

                nursery.start_soon(extend)
                completion = await lm.complete_call(MESSAGES, {}, None, {})
            assert completion.texts == [TEXT]
            assert [(c.started, c.ended, c.how) for c in upstream.calls] == [
                (0.0, 2.0, "cancelled"),
                (2.0, 5.0, "completed"),
            ]
            nursery.cancel_scope.cancel()

    run(test)


# --- outcomes ------------------------------------------------------------------------------------------


def test_an_error_reaches_every_waiter_as_its_own_copy() -> None:
    async def test() -> None:
        error = UpstreamServerError("upstream said 500", model="fake/model", status=500)
        upstream = Upstream(duration=1.0, error=error)
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)

            async def waiter() -> None:
                try:
                    await lm.complete_call(MESSAGES, {}, None, {})
                except UpstreamServerError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as waiters:
                for _ in range(5):
                    waiters.start_soon(waiter)
            nursery.cancel_scope.cancel()
        assert len(upstream.calls) == 1
        assert len(errors) == 5
        assert len({id(e) for e in errors}) == 5, "each waiter raises its own copy"
        assert all(e.message == "upstream said 500" and e.status == 500 for e in errors)

    run(test)


def test_waiters_cancelled_while_parked_are_never_woken_and_the_rest_get_the_answer_at_its_time() -> None:
    """Waiters park on the flight itself: one cancelled while parked leaves the flight's wake-up list (a
    second wake-up of it would be an error in Trio), a streamed flight's deltas wake the others many times
    without losing any, and every waiter still there gets the answer when the call ends, not before."""

    async def test() -> None:
        upstream = Upstream(tokens=["a ", "b ", "c ", "d "], step=0.25)
        got: dict[int, tuple[float, str]] = {}
        sinks: dict[int, Collect | None] = {}
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)

            async def waiter(index: int, leave_at: float | None, task_status: Any) -> None:
                sink = sinks[index] = Collect() if index % 2 == 0 else None
                with trio.CancelScope(deadline=leave_at if leave_at is not None else math.inf):
                    task_status.started()
                    completion = await lm.complete_call(MESSAGES, {}, sink, {})
                    got[index] = (trio.current_time(), completion.texts[0])

            async with trio.open_nursery() as waiters:
                # Even ones stream (the first starts a streamed flight, which the others join).
                for index, leave_at in enumerate([None, 0.3, 0.6, None, 0.1, None]):
                    await waiters.start(waiter, index, leave_at)
            nursery.cancel_scope.cancel()
        assert len(upstream.calls) == 1
        assert upstream.calls[0].how == "completed"
        assert upstream.calls[0].ended == 1.0
        assert sorted(got) == [0, 3, 5]
        assert {at for at, _ in got.values()} == {1.0}
        assert {text for _, text in got.values()} == {"a b c d "}
        first = sinks[0]
        assert first is not None
        assert "".join(first.deltas) == "a b c d "

    run(test)


def test_identical_calls_share_and_different_ones_do_not() -> None:
    async def test() -> None:
        upstream = Upstream(duration=1.0)
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)
            async with trio.open_nursery() as waiters:
                for i in range(100):
                    waiters.start_soon(lm.complete_call, MESSAGES, {}, None, {})
                    waiters.start_soon(lm.complete_call, MESSAGES, {"temperature": 0.5}, None, {})
                    waiters.start_soon(lm.complete_call, MESSAGES, {}, None, {"rollout_id": i % 2 + 1})
            nursery.cancel_scope.cancel()
        assert len(upstream.calls) == 4  # plain, temperature 0.5, rollouts 1 and 2
        stats = sharing.statistics()
        assert stats.coalesced == 296
        assert stats.upstream_calls_saved == 296
        assert stats.tokens_saved == 296 * 8

    run(test)


# --- streaming fan-out ---------------------------------------------------------------------------------


def _join_tenths(j: int) -> int:
    return j if j < 20 else j + 1  # never at 2.0 s, the instant the stream ends


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    joins=st.lists(st.integers(0, 24).map(_join_tenths), min_size=1, max_size=6),
    delays=st.lists(st.integers(0, 3), min_size=6, max_size=6),
)
def test_a_late_streaming_waiter_gets_the_prefix_then_the_rest_live(
    joins: list[int], delays: list[int]
) -> None:
    """Streaming waiters join at random times, their sinks at random speeds: each receives the whole
    text in order (what was streamed before it joined in one piece, then the rest live). The stream
    lasts 2 s unless a slow sink holds it: everyone who joined before then shares its one upstream call;
    later ones share a second."""
    joins = [0, *joins[1:]]
    tokens = [f"t{i} " for i in range(20)]

    async def test() -> None:
        upstream = Upstream(tokens=tokens, step=0.1)
        sinks = [Collect(delay=delays[i] * 0.05) for i in range(len(joins))]
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)

            async def waiter(index: int) -> None:
                await trio.sleep(joins[index] / 10)
                completion = await lm.complete_call(MESSAGES, {}, sinks[index], {})
                assert completion.texts == ["".join(tokens)]

            async with trio.open_nursery() as waiters:
                for index in range(len(joins)):
                    waiters.start_soon(waiter, index)
            nursery.cancel_scope.cancel()
        for sink in sinks:
            assert "".join(sink.deltas) == "".join(tokens)
        assert all(c.how == "completed" for c in upstream.calls)
        if not any(delays[: len(joins)]):  # nobody held the stream back: it lasted 2 s
            late = [j for j in joins if j > 20]
            assert [c.started for c in upstream.calls] == [0.0] + ([min(late) / 10] if late else [])

    run(test)


def test_a_blocking_waiter_holds_the_upstream_read_while_it_waits_in_its_sink() -> None:
    """A waiter whose sink blocks (the ``block`` policy, its buffer full) holds the shared read back
    while it waits there, as a stream of its own would, and so (as there) the others wait too."""
    tokens = [f"t{i} " for i in range(100)]

    async def test() -> None:
        upstream = Upstream(tokens=tokens, step=0.01)
        slow, fast = Collect(delay=1.0), Collect()
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)
            async with trio.open_nursery() as waiters:
                waiters.start_soon(lm.complete_call, MESSAGES, {}, slow, {})
                waiters.start_soon(lm.complete_call, MESSAGES, {}, fast, {})
            nursery.cancel_scope.cancel()
        (call,) = upstream.calls
        assert call.how == "completed"
        assert call.ended is not None
        assert call.ended >= len(tokens) - 1  # held back a second a delta, while the slow sink waits
        assert "".join(slow.deltas) == "".join(fast.deltas) == "".join(tokens)

    run(test)


def test_a_streaming_waiter_that_never_blocks_costs_the_upstream_read_nothing() -> None:
    tokens = [f"t{i} " for i in range(300)]

    async def test() -> None:
        upstream = Upstream(tokens=tokens, step=0.01)
        async with trio.open_nursery() as nursery:
            sharing = Sharing(CacheConfig(), nursery, secret=b"k" * 32)
            lm = SharedLM("default", upstream, sharing)
            async with trio.open_nursery() as waiters:
                for _ in range(100):
                    waiters.start_soon(lm.complete_call, MESSAGES, {}, Collect(), {})
            nursery.cancel_scope.cancel()
        (call,) = upstream.calls
        assert call.ended == pytest.approx(len(tokens) * 0.01)

    run(test)
