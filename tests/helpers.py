"""Small fakes shared by the tests."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from dspy_trio.engine.lm import ChunkSink, Completion, SimulatedLM
from dspy_trio.engine.lm._base import Message


class CountingLM(SimulatedLM):
    """The simulated LM, counting the calls that started and the ones that finished. With ``release``,
    each call waits for that event before it answers (set it once the test has seen what must happen
    while a call is in flight)."""

    def __init__(self, *, release: trio.Event | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("first_token_delay", 1.0)
        kwargs.setdefault("token_delay", 0.0)
        super().__init__(**kwargs)
        self.release = release
        self.started = 0
        self.finished = 0

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: ChunkSink | None
    ) -> Completion:
        self.started += 1
        if self.release is not None:
            await self.release.wait()
        completion = await super().complete(messages, params, sink)
        self.finished += 1
        return completion


def most_waiting_on_one_flight(engine: Any) -> int:
    """The most callers waiting now on one of ``engine``'s shared flights (LM calls or whole
    predictions, ``engine/_flight.py``): how a test knows identical requests have all joined one."""
    sharing = engine.sharing
    if sharing is None:
        return 0
    tables = [sharing._flights, *(layer._flights for layer in sharing.other_flights)]
    return max((flight.waiting for table in tables for flight in table.values()), default=0)


class FailingLM(SimulatedLM):
    """Raises ``error`` from every call, after ``delay`` seconds."""

    def __init__(self, error: BaseException, delay: float = 0.0) -> None:
        super().__init__()
        self.error = error
        self.delay = delay

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: ChunkSink | None
    ) -> Completion:
        await trio.sleep(self.delay)
        raise self.error


def tasks_living() -> int:
    return trio.lowlevel.current_statistics().tasks_living


def random_chunks(text: str, seed: int, longest: int) -> list[str]:
    """``text`` cut into pieces of 1 to ``longest`` characters, the same for the same seed."""
    rng = random.Random(seed)
    pieces, start = [], 0
    while start < len(text):
        end = start + rng.randint(1, longest)
        pieces.append(text[start:end])
        start = end
    return pieces


async def wait_until(predicate: Any, *, seconds: float = 5.0, poll: float = 0.01) -> None:
    """Poll ``predicate()`` until it is true (for state that has no event to wait on)."""
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(poll)


# How soon after a cancel the fake upstream must see the connection close, in the tests over real
# sockets. What they test is that a cancel closes the connection instead of leaving the answer running,
# so their upstreams answer in tens of seconds: the margin is far below that, and far above what a busy
# 2-core machine (load 8) adds in scheduling delays. How fast the close really is (p99 a few ms) is a
# benchmark's figure: python -m benchmarks.hotpath_stream --parts cancel.
CLOSE_MARGIN = 1.0
# How long a test waits for something that must happen before it calls it a hang: a guard, not a bound.
HANG_GUARD = 60.0
# A caller's deadline in the cancellation tests over real sockets: long enough for the request to reach
# the upstream on a busy machine, far shorter than the upstream takes to answer.
DEADLINE_AHEAD = 1.0


async def first_request_closed_by_client(upstream: Any, left_at: float, within: float = CLOSE_MARGIN) -> Any:
    """Wait for the fake upstream's first request to end; check that the client closed its connection
    (the answer never completed) within ``within`` seconds of ``left_at``. Returns the record."""
    with trio.fail_after(HANG_GUARD):
        await upstream.wait_for(lambda u: u.records and u.records[0].ended)
    record = upstream.records[0]
    assert record.completed_at is None
    assert record.client_closed_at is not None
    assert record.client_closed_at - left_at < within
    return record


class _Recording(dict[str, str]):
    """An environment that records every variable read from it."""

    def __init__(self, values: Mapping[str, str], read: set[str]) -> None:
        super().__init__(values)
        self.read = read

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def variables_the_service_reads() -> set[str]:
    """Every environment variable ``ServiceSettings.from_env`` (and so ``EngineConfig.from_env``) reads,
    with no LM configured and with each provider that has a key variable."""
    from dspy_trio.web.settings import ServiceSettings

    read: set[str] = set()
    for values in (
        {},
        {"LM_PROVIDER": "openai", "LM_API_BASE": "http://127.0.0.1:1/v1", "LM_MODEL": "m"},
        {"LM_PROVIDER": "anthropic", "LM_MODEL": "m"},
    ):
        ServiceSettings.from_env(_Recording(values, read))
    return read


async def cancel_once_upstream_has_it(
    upstream: Any, call: Callable[[], Awaitable[Any]], *, tokens: int = 0, deadline: bool = False
) -> float:
    """Run ``call()`` and cancel it once the fake upstream holds its request (and has sent ``tokens``
    stream tokens): 50 ms later by cancelling its scope, or, with ``deadline``, by a deadline set
    ``DEADLINE_AHEAD`` seconds ahead before the call starts (the engine reads a caller's deadline when it
    admits the call). Returns when the cancel fired. (Cancelling by the clock alone,
    ``move_on_after(0.3)``, on a busy machine sometimes fired before the engine had sent anything.)"""
    scope = trio.CancelScope()
    if deadline:
        scope.deadline = trio.current_time() + DEADLINE_AHEAD

    async def run() -> None:
        with scope:
            await call()

    def arrived() -> bool:
        return bool(upstream.records) and upstream.records[-1].tokens_sent >= tokens

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(arrived, seconds=HANG_GUARD, poll=0.005)  # tokens are not notified: polled
        if deadline:
            fired = scope.deadline
            assert trio.current_time() < fired, "the request reached the upstream after its deadline"
        else:
            await trio.sleep(0.05)
            fired = trio.current_time()
            scope.cancel()
    assert scope.cancelled_caught, "the call ended before it was cancelled"
    return fired
