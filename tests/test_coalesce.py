"""Single-flight and the response cache through the engine: identical predictions pay the upstream
once; retries, rate limits and cool-downs happen once for the shared call; API keys never share under
``scope = "key"``; ``no_cache`` / ``no_store``; only answers the adapter parsed are stored; streams fan
out; a cached answer is marked as such; and over real sockets, the upstream connection closes when the
last waiter leaves."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from functools import partial
from typing import Any

import attrs
import pytest
import trio

from dspy_trio.engine import (
    EngineConfig,
    ErrorEvent,
    FieldDelta,
    FinalEvent,
    LMConfig,
    OpenAISettings,
    PredictionResult,
    ProgramError,
    ProgramSpec,
    RateLimit,
    RetryPolicy,
    StreamOptions,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine._cache_config import CacheConfig
from dspy_trio.engine.lm import Completion, DeltaSink, SimulatedLM
from dspy_trio.engine.lm._base import Message
from dspy_trio.engine.testing.fake_upstream import Behavior, FakeUpstream, Fault, open_fake_upstream

from .helpers import CLOSE_MARGIN, HANG_GUARD, CountingLM, wait_until

QUESTION = {"question": "What is Trio?"}


def config(cache: CacheConfig | None = None, **changes: Any) -> EngineConfig:
    lm = LMConfig(retry=RetryPolicy(max_attempts=1))
    return EngineConfig(lms={"default": lm}, cache=cache or CacheConfig(), max_in_flight=4096, **changes)


MEMORY = CacheConfig(backend="memory", ttl=60)


# --- single-flight -----------------------------------------------------------------------------------


async def test_a_thousand_identical_predictions_make_one_upstream_call(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        results = []

        async def predict(question: str) -> None:
            results.append(await engine.predict("default", {"question": question}))

        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(predict, "same")
        assert lm.started == 1
        assert len({str(r.outputs) for r in results}) == 1
        paid = [r for r in results if r.usage.total_tokens]
        assert len(paid) == 1
        assert paid[0].attempts == 1
        shared = [r for r in results if r.timings.shared_calls == 1]
        assert len(shared) == 999
        assert all(r.usage.saved_tokens == paid[0].usage.total_tokens and r.attempts == 0 for r in shared)
        s = engine.statistics()
        assert s.succeeded == 1000  # outcomes count requests, not calls
        assert s.sharing is not None
        assert (s.sharing.coalesced, s.sharing.upstream_calls_saved) == (999, 999)
        assert s.sharing.tokens_saved == 999 * paid[0].usage.total_tokens

        lm.started = 0
        async with trio.open_nursery() as nursery:
            for question in range(10):
                for _ in range(100):
                    nursery.start_soon(predict, f"question {question}")
        assert lm.started == 10


async def test_single_flight_off_makes_every_call(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(CacheConfig(single_flight=False)), lms={"default": lm}) as engine:
        assert engine.sharing is None
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(engine.predict, "default", QUESTION)
    assert lm.started == 20


async def test_a_waiter_that_leaves_does_not_end_the_call_for_the_others(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        results = []

        async def stays() -> None:
            results.append(await engine.predict("default", QUESTION))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stays)
            with trio.move_on_after(2):
                await engine.predict("default", QUESTION)
            assert trio.current_time() == 2.0
        assert trio.current_time() == 10.0
        assert lm.started == lm.finished == 1
        assert len(results) == 1
        s = engine.statistics()
        assert (s.succeeded, s.timed_out) == (1, 1)


async def test_the_retries_happen_once_for_the_shared_call(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior.latency = 0.2
    fake_upstream.add_faults(Fault("unavailable"))
    lm = LMConfig(
        model="m",
        settings=OpenAISettings(api_base=fake_upstream.url, api_key="k"),
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01),
    )
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(engine.predict, "default", QUESTION)
        assert len(fake_upstream.records) == 2  # the 503, and its one retry: not 20 of each
        upstream = engine.statistics().upstreams["default"]
        assert upstream.retries_by_cause == {"server_error": 1}
        assert engine.statistics().succeeded == 20


async def test_the_rate_limit_is_charged_once_for_the_shared_call(autojump_clock: Any) -> None:
    """One request a minute: 50 identical predictions all get the answer of the one call allowed."""
    lm = CountingLM(first_token_delay=1.0)
    limited = LMConfig(rate_limit=RateLimit(rpm=1), retry=RetryPolicy(max_attempts=1))
    async with open_engine(EngineConfig(lms={"default": limited}), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(engine.predict, "default", QUESTION)
        assert lm.started == 1
        assert trio.current_time() == 1.0
        assert engine.statistics().succeeded == 50


async def test_an_upstream_error_is_each_waiters_own_outcome(autojump_clock: Any) -> None:
    class Failing(SimulatedLM):
        calls = 0

        async def complete(
            self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any
        ) -> Completion:
            Failing.calls += 1
            await trio.sleep(1)
            raise UpstreamServerError("the upstream failed", model="m", status=500)

    async with open_engine(config(), lms={"default": Failing()}) as engine:
        errors: list[BaseException] = []

        async def predict() -> None:
            try:
                await engine.predict("default", QUESTION)
            except UpstreamServerError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(predict)
        assert Failing.calls == 1
        assert len(errors) == 10
        assert engine.statistics().failed == 10  # one outcome per waiter


# --- scope -----------------------------------------------------------------------------------------


async def test_two_api_keys_never_share_a_call_or_an_answer(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for owner in ("alice-key", "bob-key"):
                for _ in range(5):
                    nursery.start_soon(lambda owner=owner: engine.predict("default", QUESTION, owner=owner))
        assert lm.started == 2  # one call per key
        hit = await engine.predict("default", QUESTION, owner="alice-key")
        assert hit.timings.cached
        assert lm.started == 2
        other = await engine.predict("default", QUESTION, owner="carol-key")
        assert not other.timings.cached
        assert lm.started == 3


async def test_two_tenants_never_share_a_call_or_an_answer(autojump_clock: Any) -> None:
    """Each tenant pays for, and is limited by, its own calls: one never rides on another's."""
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for tenant in ("acme", "globex"):
                for _ in range(5):
                    nursery.start_soon(partial(engine.predict, "default", QUESTION, tenant=tenant))
        assert lm.started == 2  # one call per tenant
        assert (await engine.predict("default", QUESTION, tenant="acme")).timings.cached
        assert not (await engine.predict("default", QUESTION, tenant="initech")).timings.cached
        assert lm.started == 3
        usage = engine.statistics().tenants
        assert usage["acme"].prompt_tokens > 0
        assert usage["globex"].prompt_tokens > 0


async def test_calls_with_other_request_parameters_are_not_identical(autojump_clock: Any) -> None:
    """A request's own LM parameters (OpenAI's ``temperature``, ``max_tokens``, ...) are part of its
    calls' identity: a request asking for another temperature never gets an answer sampled at this one."""
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for temperature in (0.0, 0.0, 1.0, None):
                params = {"temperature": temperature} if temperature is not None else None
                nursery.start_soon(partial(engine.predict, "default", QUESTION, lm_params=params))
        assert lm.started == 3
        again = await engine.predict("default", QUESTION, lm_params={"temperature": 1.0})
        assert again.timings.cached
        assert lm.started == 3


class CutLM(CountingLM):
    """Every answer stops at its token limit (``finish_reason: length``)."""

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        return attrs.evolve(await super().complete(messages, params, sink), finish_reasons=["length"])


async def test_a_shared_or_cached_answer_that_was_cut_short_still_says_so(autojump_clock: Any) -> None:
    lm = CutLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            results: list[PredictionResult] = []
            for _ in range(3):
                nursery.start_soon(lambda: _append(results, engine.predict("default", QUESTION)))
        cached = await engine.predict("default", QUESTION)
    assert lm.started == 1
    assert cached.timings.cached
    assert [result.truncated for result in [*results, cached]] == [True] * 4


async def _append(results: list[Any], call: Awaitable[Any]) -> None:
    results.append(await call)


async def test_a_global_scope_shares_across_keys(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(attrs.evolve(MEMORY, scope="global")), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for owner in ("alice-key", "bob-key", None):
                nursery.start_soon(lambda owner=owner: engine.predict("default", QUESTION, owner=owner))
        assert lm.started == 1
        assert (await engine.predict("default", QUESTION, owner="dave-key")).timings.cached
        assert lm.started == 1


# --- the response cache ------------------------------------------------------------------------------


async def test_a_cached_answer_needs_no_upstream_call_and_says_so(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        first = await engine.predict("default", QUESTION)
        started = trio.current_time()
        second = await engine.predict("default", QUESTION)
        assert trio.current_time() == started  # no upstream wait at all
        assert lm.started == 1
        assert second.outputs == first.outputs
        assert (first.timings.cached, second.timings.cached) == (False, True)
        assert (second.timings.lm_calls, second.timings.cached_calls) == (1, 1)
        assert second.usage.total_tokens == 0
        assert second.usage.saved_tokens == first.usage.total_tokens
        assert second.attempts == 0
        s = engine.statistics().sharing
        assert s is not None
        assert (s.cache_hits, s.cache_misses, s.cache_entries) == (1, 1, 1)


async def test_answers_expire_after_the_ttl(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(attrs.evolve(MEMORY, ttl=10)), lms={"default": lm}) as engine:
        await engine.predict("default", QUESTION)  # stored at t=1, until t=11
        await trio.sleep(9.8)
        assert (await engine.predict("default", QUESTION)).timings.cached
        await trio.sleep(0.3)  # t=11.1: past the ttl
        assert not (await engine.predict("default", QUESTION)).timings.cached
        assert lm.started == 2


async def test_no_cache_neither_joins_nor_reads_and_no_store_stores_nothing(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        await engine.predict("default", QUESTION, no_store=True)
        assert engine.statistics().sharing.cache_entries == 0  # type: ignore[union-attr]
        assert lm.started == 1
        await engine.predict("default", QUESTION)  # a miss: stored now
        assert lm.started == 2
        async with trio.open_nursery() as nursery:  # fresh calls each, though identical and cached
            for _ in range(3):
                nursery.start_soon(lambda: engine.predict("default", QUESTION, no_cache=True))
        assert lm.started == 5
        s = engine.statistics().sharing
        assert s is not None
        assert s.cache_bypasses == 3


async def test_answers_the_adapter_could_not_parse_are_never_stored(autojump_clock: Any) -> None:
    class Unparsable(SimulatedLM):
        calls = 0

        async def complete(
            self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any
        ) -> Completion:
            Unparsable.calls += 1
            return Completion(["no fields at all"], {"prompt_tokens": 1, "completion_tokens": 1})

    async with open_engine(config(MEMORY), lms={"default": Unparsable()}) as engine:
        for _ in range(2):
            with pytest.raises(ProgramError):
                await engine.predict("default", QUESTION)
        assert Unparsable.calls == 4  # ChatAdapter, then its JSON fallback; twice: nothing was stored
        assert engine.statistics().sharing.cache_entries == 0  # type: ignore[union-attr]


async def test_a_cancelled_call_or_an_error_is_never_stored(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=5.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        with trio.move_on_after(1):
            await engine.predict("default", QUESTION)
        assert engine.statistics().sharing.cache_entries == 0  # type: ignore[union-attr]
        assert not (await engine.predict("default", QUESTION)).timings.cached


async def test_the_memory_cache_keeps_within_its_entries(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(attrs.evolve(MEMORY, max_entries=2)), lms={"default": lm}) as engine:
        for question in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recently used
            await engine.predict("default", {"question": question})
        assert lm.started == 3
        assert (await engine.predict("default", {"question": "a"})).timings.cached
        assert not (await engine.predict("default", {"question": "b"})).timings.cached
        s = engine.statistics().sharing
        assert s is not None
        assert s.cache_entries == 2
        assert s.cache_evictions == 2


async def test_an_answer_over_max_entry_bytes_is_not_stored(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0, words_per_field=200)
    small = attrs.evolve(MEMORY, max_entry_bytes=100)
    async with open_engine(config(small), lms={"default": lm}) as engine:
        await engine.predict("default", QUESTION)
        assert not (await engine.predict("default", QUESTION)).timings.cached
        assert engine.statistics().sharing.cache_entries == 0  # type: ignore[union-attr]


async def test_dspy_rollout_ids_are_distinct_calls(autojump_clock: Any) -> None:
    """DSPy asks for distinct samples with distinct ``rollout_id``s (BestOfN, Refine): never one answer."""
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        shared = engine.lms["default"]
        messages = [{"role": "user", "content": "x"}]
        for rollout in (1, 2, 1):
            await shared.copy(rollout_id=rollout, temperature=1.0).acall(messages=messages)
        assert lm.started == 3  # not stored outside a request (no adapter verdict), never shared


async def test_a_programs_rollouts_are_distinct_calls_through_its_fallback_chain(autojump_clock: Any) -> None:
    """A program's LM is its fallback chain (even of one LM): the chain passes the copy's
    ``rollout_id`` down to the shared LM, so distinct rollouts are distinct calls, the same one is one."""
    lm = CountingLM(first_token_delay=1.0)
    programs = {"default": ProgramSpec("tests.sample_programs.qa:Rollouts")}
    async with open_engine(config(MEMORY, programs=programs), lms={"default": lm}) as engine:
        result = await engine.predict("default", QUESTION)
    assert lm.started == 2  # rollouts 1 and 2; the second 1 is the first's answer
    first, _, third = result.outputs["answer"].split(" | ")
    assert first == third


# --- streams -----------------------------------------------------------------------------------------


async def _collect(engine: Any, **options: Any) -> list[Any]:
    async with engine.stream("default", QUESTION, **options) as events:
        return [event async for event in events]


def _text(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, FieldDelta))


async def test_identical_streams_share_one_upstream_stream_and_late_ones_get_it_all(
    autojump_clock: Any,
) -> None:
    lm = CountingLM(first_token_delay=0.1, token_delay=0.1, words_per_field=30)
    async with open_engine(config(), lms={"default": lm}) as engine:
        alone = await _collect(engine)
        lm.started = 0
        streams: list[list[Any]] = []

        async def stream(after: float) -> None:
            await trio.sleep(after)
            streams.append(await _collect(engine))

        async with trio.open_nursery() as nursery:
            for after in (0, 0.05, 1.0, 2.0):  # the last two join once deltas have gone by
                nursery.start_soon(stream, after)
        assert lm.started == 1
        for events in streams:
            assert _text(events) == _text(alone)
            assert isinstance(events[-1], FinalEvent)
            assert events[-1].result.outputs == alone[-1].result.outputs


async def test_a_stream_that_never_reads_under_drop_does_not_slow_the_upstream(autojump_clock: Any) -> None:
    """Two identical streams share the upstream stream; one reads nothing until the end under ``drop``:
    the other still gets every delta exactly as fast as alone."""
    lm = CountingLM(first_token_delay=0.01, token_delay=0.01, words_per_field=200)
    async with open_engine(config(), lms={"default": lm}) as engine:
        started = trio.current_time()
        alone = await _collect(engine)
        alone_took = trio.current_time() - started
        lm.started = lm.finished = 0
        drop = StreamOptions(backpressure="drop", buffer_size=2)
        reader: dict[str, Any] = {}

        async def read() -> None:
            reader["events"] = await _collect(engine)
            reader["took"] = trio.current_time() - started

        async with (
            trio.open_nursery() as nursery,
            engine.stream("default", QUESTION, options=drop) as stalled,
        ):
            started = trio.current_time()
            nursery.start_soon(read)
            await trio.sleep(alone_took + 1)  # reads nothing while the upstream streams
            events = [event async for event in stalled]
        assert reader["took"] == pytest.approx(alone_took)
        assert _text(reader["events"]) == _text(alone)
        assert lm.started == 1
        assert lm.finished == 1
        assert isinstance(events[-1], FinalEvent)
        assert events[-1].dropped > 0
        assert events[-1].result.outputs["answer"]


async def test_a_cached_answer_streams_as_deltas_and_a_final_event(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.1, token_delay=0.01)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        first = await _collect(engine)
        again = await _collect(engine)
        assert lm.started == 1
        assert _text(again) == _text(first)
        final = again[-1]
        assert isinstance(final, FinalEvent)
        assert final.result.timings.cached


async def test_a_stream_waiter_that_leaves_early_leaves_the_others_their_stream(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.1, token_delay=0.1, words_per_field=30)
    async with open_engine(config(), lms={"default": lm}) as engine:
        kept: list[Any] = []

        async def keep() -> None:
            kept.extend(await _collect(engine))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep)
            async with engine.stream("default", QUESTION) as events:
                async for event in events:
                    if isinstance(event, FieldDelta):
                        break  # the consumer leaves after its first delta
        assert isinstance(kept[-1], FinalEvent)
        assert lm.started == lm.finished == 1
        assert not any(isinstance(e, ErrorEvent) for e in kept)


def task_names() -> list[str]:
    """Every living task's name."""
    names: list[str] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        names.append(task.name)
        todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return names


# --- over real sockets --------------------------------------------------------------------------------


async def test_the_upstream_connection_closes_when_the_last_waiter_leaves() -> None:
    """Three identical predictions share one upstream request; the first two leaving change nothing,
    the third closes the upstream connection (within the margin), and nothing is left running."""
    async with open_fake_upstream(Behavior(latency=60)) as upstream:
        lm = LMConfig(model="m", settings=OpenAISettings(api_base=upstream.url, api_key="k"))
        async with open_engine(EngineConfig(lms={"default": lm})) as engine:
            scopes = [trio.CancelScope() for _ in range(3)]

            async def predict(scope: trio.CancelScope) -> None:
                with scope:
                    await engine.predict("default", QUESTION)

            async with trio.open_nursery() as nursery:
                for scope in scopes:
                    nursery.start_soon(predict, scope)
                await wait_until(lambda: len(upstream.records) == 1, seconds=HANG_GUARD)
                for scope in scopes[:2]:
                    scope.cancel()
                await trio.sleep(0.2)
                assert upstream.records[0].client_closed_at is None, "closed while a waiter was left"
                scopes[2].cancel()
                left_at = trio.current_time()
            # The last waiter returned only once the shared call had ended: its connection is closed.
            record = upstream.records[0]
            with trio.fail_after(HANG_GUARD):
                await upstream.wait_for(lambda u: u.records[0].ended)
            assert record.completed_at is None
            assert record.client_closed_at is not None
            assert record.client_closed_at - left_at < CLOSE_MARGIN
            assert len(upstream.records) == 1
            assert not [name for name in task_names() if "Sharing._run" in name], "a flight task is left"
            assert engine.statistics().abandoned == 3


async def test_a_sink_that_raises_leaves_only_its_own_waiter(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.1, token_delay=0.1, words_per_field=10)
    async with open_engine(config(), lms={"default": lm}) as engine:
        shared = engine.lms["default"]

        class Broken:
            async def send(self, text: str) -> None:
                raise RuntimeError("this consumer broke")

        async def broken() -> None:
            with pytest.raises(RuntimeError):
                await shared.complete(
                    [{"role": "user", "content": "x"}],
                    {},
                    Broken(),  # type: ignore[arg-type]
                )

        results: list[Completion] = []

        async def fine() -> None:
            sink: DeltaSink | None = None
            results.append(await shared.complete([{"role": "user", "content": "x"}], {}, sink))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(broken)
            nursery.start_soon(fine)
        assert len(results) == 1
        assert results[0].texts
