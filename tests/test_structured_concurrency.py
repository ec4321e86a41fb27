"""Structured-concurrency properties of the engine, on random schedules (hypothesis).

Each example is a fresh ``trio.run`` on ``MockClock(autojump_threshold=0)``: a few predict, stream, batch
and batch_stream calls start at random virtual times against the simulated LM at random pacing, and each
is ended at a random time by its own deadline, by its own scope, by ``dspy_trio.engine.cancel``, by leaving
the stream early, by a drain, or by cancelling the scope of the engine's owner. After every example:

- nothing is left: 0 in flight, 0 queued, every admission slot back, no task of the engine alive;
- every stream read to its end saw exactly one terminal event, last; no stream saw two;
- no exception group escaped a public call;
- a caller whose own scope ended its call caught that cancellation (``cancelled_caught``);
- every accepted request was booked exactly once, under the outcome that matches how it ended:
  ``timed_out`` for its deadline, ``abandoned`` for its scope or an early exit, ``cancelled`` for
  ``dspy_trio.engine.cancel``, ``shut_down`` for drain/close, and the result's or error's outcome otherwise.

Times sit on grids (LM pacing on multiples of 0.25 s; cancels and engine-wide ends either on that grid,
so that they race with admissions and completions at the same virtual instant, or between its points).
Trio's choice among tasks woken at the same instant is seeded per example, so every example replays.

A second property runs over real sockets against the fake upstream (fewer examples, real clock): every
upstream connection is closed within 50 ms of the cancel that ended its request.

The default run is derandomized (the same examples every time); ``pytest --sc-deep`` runs ten times as
many, randomized.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import dspy
import pytest
import trio
import trio._core._run as trio_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from dspy_trio.engine import (
    EngineConfig,
    EngineError,
    ErrorEvent,
    FinalEvent,
    LMConfig,
    OpenAISettings,
    ProgramSpec,
    RetryPolicy,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine.lm import SimulatedLM
from dspy_trio.engine.testing import Behavior, open_fake_upstream

from .helpers import CLOSE_MARGIN, FailingLM, tasks_living

# Built once: a program given as a module instance is not rebuilt per engine (keeps examples cheap).
QA = dspy.Predict("question -> answer")
QA_BAD = dspy.Predict("question -> answer")

GRID = 0.25
DEFAULT_EXAMPLES = 2000
NETWORK_EXAMPLES = 12

# The outcome a request ended by an error with this code is booked under.
OUTCOME_OF_CODE = {
    "cancelled": "cancelled",
    "engine_closed": "shut_down",
    "overloaded": "rejected",
    "upstream_server_error": "failed",
    "deadline_exceeded": "timed_out",
    "abandoned": "abandoned",
}
# The outcome of a request ended by each way of cancelling it.
OUTCOME_OF_METHOD = {
    "deadline": "timed_out",
    "scope": "abandoned",
    "leave": "abandoned",
    "self_cancel": "abandoned",
    "engine_cancel": "cancelled",
}


@attrs.frozen
class Op:
    kind: str
    start: float
    method: str  # none, deadline, scope, engine_cancel, leave (streams), self_cancel (stream)
    after: float  # when the method fires, after the start
    size: int  # batch items
    failing: bool
    read_delay: float  # a stream consumer's pause after each event (a slow consumer lets the producer finish)


@attrs.frozen
class Plan:
    max_in_flight: int
    max_queued: int
    drain_timeout: float
    first_token: float
    token_delay: float
    words: int
    ops: tuple[Op, ...]
    end: str  # none, drain, engine_scope
    end_at: float
    scheduler_seed: int  # Trio's choice among tasks woken at the same instant


def grid(low: int, high: int, offset: float = 0.0) -> st.SearchStrategy[float]:
    return st.integers(low, high).map(lambda k: k * GRID + offset)


@st.composite
def ops(draw: Any) -> Op:
    kind = draw(st.sampled_from(["predict", "stream", "batch", "batch_stream"]))
    methods = ["none", "deadline", "scope", "engine_cancel"]
    if kind in ("stream", "batch_stream"):
        methods.append("leave")
    if kind == "stream":
        methods.append("self_cancel")  # the consumer cancels its own scope mid-stream
    return Op(
        kind=kind,
        start=draw(grid(0, 8)),
        method=draw(st.sampled_from(methods)),
        after=draw(grid(0, 12, GRID / 2) | grid(0, 12)),
        size=draw(st.integers(1, 3)),
        failing=draw(st.sampled_from([False, False, False, True])),
        read_delay=draw(st.sampled_from([0.0, 0.0, GRID])),
    )


plans = st.builds(
    Plan,
    max_in_flight=st.integers(1, 3),
    max_queued=st.integers(0, 3),
    drain_timeout=grid(0, 4),
    first_token=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
    token_delay=st.sampled_from([0.0, 0.0, 0.25]),
    words=st.integers(1, 3),
    ops=st.lists(ops(), min_size=1, max_size=5).map(tuple),
    end=st.sampled_from(["none", "none", "drain", "engine_scope"]),
    end_at=grid(0, 16, GRID / 4) | grid(0, 8),
    scheduler_seed=st.integers(0, 2**32 - 1),
)


@attrs.define
class Record:
    """What one call saw."""

    op: Op
    index: int
    fires_at: float = math.inf
    ended_at: float | None = None
    result: str | None = None  # "ok", an error code, "group"; None: ended by its own scope
    scope: trio.CancelScope | None = None
    events: list[Any] = attrs.field(factory=list)
    read_to_end: bool = False
    entered_at: float = math.inf
    cancel_hit: bool = False  # engine.cancel found the request active
    stream: Any = None
    terminal: Any = None  # a stream's terminal event as its producer set it
    doomed_reads: int = 0  # events a stream handed to a consumer whose scope was already cancelled
    items: list[Any] = attrs.field(factory=list)

    @property
    def request_id(self) -> str:
        return f"op{self.index}"

    def item_ids(self) -> list[str]:
        if self.op.kind in ("batch", "batch_stream"):
            return [f"{self.request_id}-{j}" for j in range(self.op.size)]
        return [self.request_id]


class Outcomes(logging.Handler):
    """Collects the outcome of every request from the engine's request log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_id: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(record.getMessage())
        self.by_id.setdefault(line["request_id"], []).append(line["outcome"])


@contextmanager
def request_outcomes() -> Iterator[Outcomes]:
    logger = logging.getLogger("dspy_trio.engine.requests")
    handler, level, propagate = Outcomes(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def engine_config(plan: Plan) -> EngineConfig:
    return EngineConfig(
        lms={"default": LMConfig(), "bad": LMConfig(retry=RetryPolicy(max_attempts=1))},
        programs={
            "default": ProgramSpec(QA),
            "bad": ProgramSpec(QA_BAD, lm="bad"),
        },
        max_in_flight=plan.max_in_flight,
        max_queued=plan.max_queued,
        drain_timeout=plan.drain_timeout,
    )


async def run_call(engine: Any, record: Record, nursery: trio.Nursery) -> None:
    """Start ``record.op`` at its time, end it as the op says, and write down what it saw."""
    op = record.op
    await trio.sleep(op.start)
    program = "bad" if op.failing else "default"
    inputs = {"question": f"q{record.index}"}
    if op.method not in ("none", "self_cancel"):
        record.fires_at = trio.current_time() + op.after
    leave_at = record.fires_at if op.method == "leave" else math.inf
    with trio.CancelScope() as scope:
        record.scope = scope
        if op.method == "deadline":
            scope.deadline = record.fires_at
        elif op.method in ("scope", "engine_cancel"):
            nursery.start_soon(fire, engine, record)
        try:
            if op.kind == "predict":
                await engine.predict(program, inputs, request_id=record.request_id)
            elif op.kind == "stream":
                async with engine.stream(program, inputs, request_id=record.request_id) as events:
                    record.stream = events
                    record.entered_at = trio.current_time()
                    with trio.move_on_at(leave_at):
                        while True:
                            if op.method == "self_cancel" and record.fires_at == math.inf:
                                # size 1, 2: after that many events; 3: when only the terminal is left
                                only_terminal = events.terminal is not None and not len(events.buffer)
                                if len(record.events) == op.size or (op.size == 3 and only_terminal):
                                    record.fires_at = trio.current_time()
                                    scope.cancel()
                            doomed = trio.current_time() >= trio.current_effective_deadline()
                            try:
                                event = await events.__anext__()
                            except StopAsyncIteration:
                                break
                            # Like a channel: a consumer already cancelled gets Cancelled, not an event.
                            record.doomed_reads += doomed
                            record.events.append(event)
                            if op.read_delay:
                                await trio.sleep(op.read_delay)
                        record.read_to_end = True
            elif op.kind == "batch":
                items = [inputs] * op.size
                record.items = await engine.batch(program, items, concurrency=2, request_id=record.request_id)
            else:
                items = [inputs] * op.size
                async with engine.batch_stream(
                    program, items, concurrency=2, request_id=record.request_id
                ) as outcomes:
                    with trio.move_on_at(leave_at):
                        async for item in outcomes:
                            record.items.append(item)
            record.result = "ok"
        except EngineError as exc:
            record.result = exc.code
        except BaseExceptionGroup:
            record.result = "group"
    record.ended_at = trio.current_time()
    if record.stream is not None:
        record.terminal = record.stream.terminal  # what the producer ended with, read or not


async def fire(engine: Any, record: Record) -> None:
    await trio.sleep_until(record.fires_at)
    if record.op.method == "scope":
        assert record.scope is not None
        record.scope.cancel()
    else:
        for request_id in record.item_ids():
            record.cancel_hit |= engine.cancel(request_id)


async def run_plan(plan: Plan, outcomes: Outcomes) -> None:
    baseline = tasks_living()
    records = [Record(op, i) for i, op in enumerate(plan.ops)]
    lms = {
        "default": SimulatedLM(
            first_token_delay=plan.first_token, token_delay=plan.token_delay, words_per_field=plan.words
        ),
        "bad": FailingLM(UpstreamServerError("boom", status=500), delay=GRID),
    }
    engine: Any = None
    with trio.fail_after(10_000):  # a hang shows up as TooSlowError on the virtual clock
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as engine_scope:
                async with open_engine(engine_config(plan), lms=lms) as engine:
                    done = trio.Event()
                    remaining = [len(records)]

                    async def call(record: Record) -> None:
                        await run_call(engine, record, outer)
                        remaining[0] -= 1
                        if not remaining[0]:
                            done.set()

                    for record in records:
                        outer.start_soon(call, record)
                    if plan.end == "none":
                        await done.wait()
                    else:
                        await trio.sleep_until(plan.end_at)
                        if plan.end == "drain":
                            await engine.drain()
                            # Drain waits its timeout at most: what it cancels ends at once.
                            assert trio.current_time() <= plan.end_at + plan.drain_timeout
                        else:
                            engine_scope.cancel()
                            await trio.sleep_forever()
            if plan.end == "engine_scope":  # left by cancellation: everything ended at once
                assert trio.current_time() == plan.end_at
    assert tasks_living() == baseline, "no task of the engine is left"
    check(plan, engine, records, outcomes)


def check(plan: Plan, engine: Any, records: list[Record], outcomes: Outcomes) -> None:
    stats = engine.statistics()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert engine._admission._slots.borrowed_tokens == 0, "every admission slot is back"
    assert engine._ledger.active == 0
    ended = plan.end != "none"
    for record in records:
        op = record.op
        assert record.result != "group", f"an exception group escaped {op.kind}"
        assert record.ended_at is not None
        own_scope_ended = record.result is None
        if own_scope_ended:
            assert op.method in ("deadline", "scope", "self_cancel"), record
            assert record.scope is not None
            assert record.scope.cancelled_caught, "the caller's scope caught its own cancellation"
            assert record.ended_at == record.fires_at
        slow_reader = op.kind == "stream" and op.read_delay > 0  # may read its buffered events on after
        if record.cancel_hit and op.kind in ("predict", "stream") and not slow_reader:
            assert record.ended_at == record.fires_at, "engine.cancel ends an active request at once"
        assert record.doomed_reads == 0, "a cancelled consumer was handed an event"
        if plan.end == "drain" and not slow_reader:  # nothing runs past the drain's timeout
            assert record.ended_at <= max(plan.end_at + plan.drain_timeout, op.start), record
        elif plan.end == "engine_scope" and not slow_reader:  # nor past the engine owner's cancellation
            assert record.ended_at <= max(plan.end_at, op.start), record
        terminals = [e for e in record.events if isinstance(e, FinalEvent | ErrorEvent)]
        assert len(terminals) <= 1, "a stream has at most one terminal event"
        if record.read_to_end:
            assert len(terminals) == 1
            assert record.events[-1] is terminals[0], "the terminal event is the last"

        expected: dict[str, str] = {}  # request id -> the outcome it must be booked under
        for request_id in record.item_ids():
            booked = outcomes.by_id.get(request_id, [])
            assert len(booked) <= 1, f"{request_id} was booked {len(booked)} times"
        if op.kind == "predict":
            expected[record.request_id] = outcome_of_call(record)
        elif op.kind == "stream":
            if terminals:
                expected[record.request_id] = outcome_of_event(terminals[0])
            elif record.result in OUTCOME_OF_CODE:  # refused on entry
                expected[record.request_id] = OUTCOME_OF_CODE[record.result]
            elif record.terminal is not None:  # left unread: the producer's own end (it saw the exit)
                expected[record.request_id] = outcome_of_event(record.terminal)
                if isinstance(record.terminal, ErrorEvent):
                    assert type(record.terminal.error) is not EngineError, "never a bare EngineError"
            elif own_scope_ended:
                expected[record.request_id] = OUTCOME_OF_METHOD[op.method]
        else:
            for item in record.items:
                item_id = f"{record.request_id}-{item.index}"
                expected[item_id] = "succeeded" if item.ok else OUTCOME_OF_CODE[item.error.code]
        for request_id, outcome in expected.items():
            booked = outcomes.by_id.get(request_id)
            if booked is None:  # refused before it was accepted: never booked as a request
                assert outcome in ("rejected", "shut_down"), (request_id, outcome)
                continue
            assert booked == [outcome], (request_id, booked, outcome, record)
        for request_id in record.item_ids():
            for outcome in outcomes.by_id.get(request_id, []):
                assert cause_allowed(outcome, record, ended), (request_id, outcome, record)


def outcome_of_call(record: Record) -> str:
    if record.result == "ok":
        return "succeeded"
    if record.result is None:
        return OUTCOME_OF_METHOD[record.op.method]
    return OUTCOME_OF_CODE[record.result]


def outcome_of_event(event: FinalEvent | ErrorEvent) -> str:
    return "succeeded" if isinstance(event, FinalEvent) else OUTCOME_OF_CODE[event.error.code]


def cause_allowed(outcome: str, record: Record, ended: bool) -> bool:
    """Whether ``outcome`` has a cause in how ``record`` was run."""
    method = record.op.method
    return {
        "succeeded": True,
        "failed": record.op.failing,
        "rejected": True,
        "timed_out": method == "deadline",
        "abandoned": method in ("scope", "leave", "self_cancel"),
        "cancelled": method == "engine_cancel",
        "shut_down": ended,
        "invalid": False,
    }[outcome]


def run_example(plan: Plan) -> None:
    trio_run._r.seed(plan.scheduler_seed)
    with request_outcomes() as outcomes:
        trio.run(run_plan, plan, outcomes, clock=MockClock(autojump_threshold=0))


def examples(request: pytest.FixtureRequest, default: int) -> settings:
    deep = bool(request.config.getoption("--sc-deep"))
    return settings(
        max_examples=default * 10 if deep else default,
        deadline=None,
        derandomize=not deep,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def test_every_schedule_ends_clean_with_one_matching_outcome_per_request(
    request: pytest.FixtureRequest,
) -> None:
    examples(request, DEFAULT_EXAMPLES)(given(plans)(run_example))()


# Over real sockets: cancellation reaches the upstream connection.
#
# The property is that a cancel closes the connection (the upstream's answer never completes), not how
# fast a scheduler runs: the upstream's answer takes 30 s, the close must come within CLOSE_MARGIN of the
# cancel, and the cancel fires only once the upstream holds the request (on a busy machine the engine can
# take longer than ``after`` to send it). How fast the close really is, is measured by
# ``python -m benchmarks.hotpath_stream --parts cancel`` (p99 of a few ms).


@attrs.frozen
class NetworkPlan:
    kind: str
    method: str  # deadline, scope, engine_cancel, leave, drain, engine_scope
    after: float


network_plans = st.builds(
    NetworkPlan,
    kind=st.sampled_from(["predict", "stream", "batch"]),
    method=st.sampled_from(["deadline", "scope", "engine_cancel", "leave", "drain", "engine_scope"]),
    after=st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.2]),
)


async def run_network_plan(plan: NetworkPlan) -> None:
    behavior = Behavior(latency=30.0, first_token_delay=0.0, token_delay=0.01, words_per_field=3000)
    async with open_fake_upstream(behavior) as upstream:
        lm = LMConfig(
            model="fake",
            retry=RetryPolicy(max_attempts=1),
            settings=OpenAISettings(api_base=upstream.url, api_key="k"),
        )
        config = EngineConfig(lms={"default": lm}, drain_timeout=0)
        fired = [math.inf]
        scopes: list[trio.CancelScope] = []
        leave = trio.CancelScope()  # the stream consumer's own scope, for "leave"
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as engine_scope:
                async with open_engine(config) as engine:
                    method = "scope" if plan.method == "leave" and plan.kind != "stream" else plan.method

                    async def call() -> None:
                        with trio.CancelScope() as scope:
                            scopes.append(scope)
                            try:
                                if plan.kind == "predict":
                                    await engine.predict("default", {"question": "q"}, request_id="r")
                                elif plan.kind == "batch":
                                    await engine.batch("default", [{"question": "q"}], request_id="r")
                                else:
                                    async with engine.stream(
                                        "default", {"question": "q"}, request_id="r"
                                    ) as ev:
                                        with leave:
                                            async for _event in ev:
                                                pass
                                        fired[0] = min(fired[0], trio.current_time())
                            except EngineError:
                                pass

                    outer.start_soon(call)
                    with trio.fail_after(60):  # a hang guard, not the property
                        await upstream.wait_for(lambda u: bool(u.records))
                    if method == "deadline":
                        scopes[0].deadline = fired[0] = trio.current_time() + plan.after
                    elif method == "leave":
                        leave.deadline = trio.current_time() + plan.after
                    await trio.sleep(plan.after)
                    fired[0] = min(fired[0], trio.current_time())
                    if method == "scope":
                        scopes[0].cancel()
                    elif method == "engine_cancel":
                        engine.cancel("r")
                        engine.cancel("r-0")
                    elif method == "drain":
                        await engine.drain()
                    elif method == "engine_scope":
                        engine_scope.cancel()
                    await trio.sleep(0.3)  # long enough for any request to be cut, far shorter than it lasts
        with trio.fail_after(60):  # a hang guard, not the property
            await upstream.wait_for(lambda u: u.records[0].ended)
        [record] = upstream.records
        assert record.completed_at is None, "the answer never completed"
        assert record.client_closed_at is not None
        assert record.client_closed_at - fired[0] < CLOSE_MARGIN, (plan, record.client_closed_at - fired[0])


def test_every_cancel_closes_the_upstream_connection(request: pytest.FixtureRequest) -> None:
    def example(plan: NetworkPlan) -> None:
        trio.run(run_network_plan, plan)

    examples(request, NETWORK_EXAMPLES)(given(network_plans)(example))()
