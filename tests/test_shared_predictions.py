"""Identical predictions of pure programs (DSPy's Predict and ChainOfThought) share the whole prediction:
a waiter of one in flight and a hit of a stored one skip the program's adapter; every waiter keeps its
own deadline and cancel and the shared program ends exactly when its last waiter leaves (a property on
a virtual clock); nothing is shared across API keys under ``scope = "key"``, nor between programs whose
demos or config differ; only complete parsed predictions are stored; programs of several calls keep
sharing call by call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import dspy
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from dspy_trio.engine import (
    EngineConfig,
    FieldDelta,
    FinalEvent,
    LMConfig,
    ProgramError,
    ProgramSpec,
    RetryPolicy,
    _dspy,
    open_engine,
)
from dspy_trio.engine._cache_config import CacheConfig
from dspy_trio.engine.lm import Completion, SimulatedLM
from dspy_trio.engine.lm._base import Message

from .helpers import CountingLM, tasks_living
from .test_flight import Plan, expected_story, plans

QUESTION = {"question": "What is Trio?"}
MEMORY = CacheConfig(backend="memory", ttl=60)
ANSWER = "[[ ## answer ## ]]\nTrio runs structured concurrency\n\n[[ ## completed ## ]]"


def config(cache: CacheConfig | None = None, **programs: ProgramSpec) -> EngineConfig:
    lm = LMConfig(retry=RetryPolicy(max_attempts=1))
    specs = programs or {"default": ProgramSpec("question -> answer")}
    return EngineConfig(lms={"default": lm}, programs=specs, cache=cache or CacheConfig(), max_in_flight=4096)


@contextlib.contextmanager
def counting_adapter_work() -> Iterator[dict[str, int]]:
    """Count the engine's ChatAdapter's formats and parses (what a shared prediction skips)."""
    counts = {"format": 0, "parse": 0}
    chat = _dspy.ChatAdapter
    original_format, original_parse = chat.format, chat.parse

    def format(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["format"] += 1
        return original_format(self, *args, **kwargs)

    def parse(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["parse"] += 1
        return original_parse(self, *args, **kwargs)

    chat.format, chat.parse = format, parse
    try:
        yield counts
    finally:
        chat.format, chat.parse = original_format, original_parse


@attrs.define
class Call:
    started: float
    ended: float | None = None
    how: str | None = None


class Upstream(SimulatedLM):
    """Answers ``ANSWER`` after ``duration`` seconds, recording when each call started and ended."""

    def __init__(self, duration: float) -> None:
        super().__init__()
        self.duration = duration
        self.calls: list[Call] = []

    async def complete(self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any) -> Completion:
        call = Call(trio.current_time())
        self.calls.append(call)
        try:
            await trio.sleep(self.duration)
        except trio.Cancelled:
            call.ended, call.how = trio.current_time(), "cancelled"
            raise
        call.ended, call.how = trio.current_time(), "completed"
        return Completion([ANSWER], {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})


# --- the property: waiters joining and leaving a prediction in flight ---------------------------------


async def play(duration: float, waiters: list[Plan]) -> tuple[Upstream, list[str], int, dict[str, int]]:
    upstream = Upstream(duration)
    outcomes = ["?"] * len(waiters)
    with counting_adapter_work() as work:
        async with open_engine(config(), lms={"default": upstream}) as engine:
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
                    result = await engine.predict("default", QUESTION)
                    assert outcomes[index] == "?", "a second outcome"
                    right = result.outputs == {"answer": "Trio runs structured concurrency"}
                    outcomes[index] = "answer" if right else "wrong answer"
                if scope.cancelled_caught:
                    assert outcomes[index] == "?", "a second outcome"
                    outcomes[index] = plan.how

            async def cancel_at(scope: trio.CancelScope, when: float) -> None:
                await trio.sleep_until(when)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                for index, plan in enumerate(waiters):
                    nursery.start_soon(waiter, index, plan, nursery)
            left = tasks_living() - baseline
            assert engine.statistics().sharing.in_flight == 0  # type: ignore[union-attr]
    return upstream, outcomes, left, work


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans())
def test_a_shared_prediction_ends_exactly_when_its_last_waiter_leaves(plan: tuple[float, list[Plan]]) -> None:
    """Predictions join and leave (a cancel, their own deadline) at random: the program's upstream call
    is cancelled at the instant the last waiter leaves, never before; otherwise every waiter still
    there gets the prediction; each has exactly one outcome; no task is left; and the adapter formats
    and parses once per upstream call, never per waiter."""
    duration, waiters = plan
    calls, outcomes = expected_story(duration, waiters)

    async def test() -> None:
        upstream, seen, left, work = await play(duration, waiters)
        assert [(c.started, c.ended, c.how) for c in upstream.calls] == calls
        assert seen == outcomes
        assert left == 0
        assert work["format"] == len(calls)
        assert work["parse"] == sum(how == "completed" for _, _, how in calls)

    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


# --- what a waiter and a hit skip ----------------------------------------------------------------------


async def test_a_waiter_and_a_hit_skip_the_adapter(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    with counting_adapter_work() as work:
        async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(engine.predict, "default", QUESTION)
            assert (lm.started, work["format"], work["parse"]) == (1, 1, 1)
            hit = await engine.predict("default", QUESTION)
            assert hit.timings.cached
            assert (lm.started, work["format"], work["parse"]) == (1, 1, 1)
            fresh = await engine.predict("default", QUESTION, no_cache=True)  # runs its program
            assert not fresh.timings.cached
            assert (lm.started, work["format"], work["parse"]) == (2, 2, 2)
            assert fresh.outputs == hit.outputs


async def test_chain_of_thought_predictions_are_shared_whole(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    programs = {"cot": ProgramSpec("question -> answer", module="chain_of_thought")}
    with counting_adapter_work() as work:
        async with open_engine(config(MEMORY, **programs), lms={"default": lm}) as engine:
            results = []

            async def predict() -> None:
                results.append(await engine.predict("cot", QUESTION))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(predict)
            assert (lm.started, work["format"]) == (1, 1)
            assert all(r.outputs == results[0].outputs and "reasoning" in r.outputs for r in results)
            assert sorted(r.timings.shared_calls for r in results) == [0] + [1] * 9


async def test_every_waiter_gets_outputs_of_its_own(autojump_clock: Any) -> None:
    """A caller that changes its outputs changes no one else's, nor the stored prediction."""
    lm = CountingLM(first_token_delay=1.0)
    programs = {"listing": ProgramSpec("question -> answers: list[str]")}
    async with open_engine(config(MEMORY, **programs), lms={"default": lm}) as engine:
        results = []

        async def predict() -> None:
            result = await engine.predict("listing", QUESTION)
            results.append(result)
            result.outputs["answers"].append("changed")  # type: ignore[index]

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(predict)
        hit = await engine.predict("listing", QUESTION)
        assert hit.timings.cached
        assert "changed" not in hit.outputs["answers"]
        assert all(r.outputs["answers"].count("changed") == 1 for r in results)


# --- what is never shared -----------------------------------------------------------------------------


async def test_two_api_keys_never_share_a_prediction(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for owner in ("alice-key", "bob-key"):
                for _ in range(5):
                    nursery.start_soon(lambda owner=owner: engine.predict("default", QUESTION, owner=owner))
        assert lm.started == 2
        assert (await engine.predict("default", QUESTION, owner="bob-key")).timings.cached
        assert not (await engine.predict("default", QUESTION, owner="carol-key")).timings.cached
        assert lm.started == 3


def _with_demo(answer: str) -> dspy.Predict:
    program = dspy.Predict("question -> answer")
    program.demos = [dspy.Example(question="What is 2+2?", answer=answer)]
    return program


async def test_programs_with_the_same_inputs_but_other_demos_or_config_never_share(
    autojump_clock: Any,
) -> None:
    """Same signature, same inputs: a program with demos, one with other demos, and one with another
    config make their own upstream calls, at once and in the cache; so does a program whose demos
    change between two requests."""
    lm = CountingLM(first_token_delay=1.0)
    hot = dspy.Predict("question -> answer")
    hot.config = {"temperature": 0.9}
    changing = _with_demo("4")
    programs = {
        "plain": ProgramSpec("question -> answer"),
        "four": ProgramSpec(_with_demo("4")),
        "five": ProgramSpec(_with_demo("5")),
        "hot": ProgramSpec(hot),
        "changing": ProgramSpec(changing),
    }
    async with open_engine(config(MEMORY, **programs), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for name in ("plain", "four", "five", "hot"):
                for _ in range(3):
                    nursery.start_soon(engine.predict, name, QUESTION)
        assert lm.started == 4
        for name in ("plain", "four", "five", "hot"):
            assert (await engine.predict(name, QUESTION)).timings.cached
        await engine.predict("changing", QUESTION)  # the same demos as "four": shared with it
        assert lm.started == 4
        changing.demos = [dspy.Example(question="What is 2+2?", answer="four")]
        assert not (await engine.predict("changing", QUESTION)).timings.cached
        changing.demos[0] = dspy.Example(question="What is 3+3?", answer="six")
        assert not (await engine.predict("changing", QUESTION)).timings.cached
        changing.config = {"temperature": 0.5}
        assert not (await engine.predict("changing", QUESTION)).timings.cached
        assert lm.started == 7


async def test_a_program_with_callbacks_or_its_own_lm_runs_for_every_request(autojump_clock: Any) -> None:
    """Not pure: a callback is a side effect of each call, and an LM of its own is not the engine's."""
    lm = CountingLM(first_token_delay=1.0)

    class Noting(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        seen = 0

        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            Noting.seen += 1

    noted = dspy.Predict("question -> answer", callbacks=[Noting()])
    with counting_adapter_work() as work:
        async with open_engine(config(MEMORY, noted=ProgramSpec(noted)), lms={"default": lm}) as engine:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(engine.predict, "noted", QUESTION)
            assert Noting.seen == 3
            assert lm.started == 1  # still one upstream call: shared call by call
            assert work["format"] == 3


# --- what is stored ------------------------------------------------------------------------------------


async def test_no_store_flights_store_nothing_and_errors_are_each_waiters_copy(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: engine.predict("default", QUESTION, no_store=True))
        assert lm.started == 1
        assert engine.statistics().sharing.cache_entries == 0  # type: ignore[union-attr]
        assert not (await engine.predict("default", QUESTION)).timings.cached
        assert (await engine.predict("default", QUESTION)).timings.cached


async def test_a_reply_only_the_json_fallback_parsed_is_shared_but_not_stored(autojump_clock: Any) -> None:
    class JSONOnly(SimulatedLM):
        calls = 0

        async def complete(
            self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any
        ) -> Completion:
            JSONOnly.calls += 1
            await trio.sleep(1)
            return Completion(['{"answer": "Trio"}'], {"prompt_tokens": 1, "completion_tokens": 1})

    async with open_engine(config(MEMORY), lms={"default": JSONOnly()}) as engine:
        results = []

        async def predict() -> None:
            results.append(await engine.predict("default", QUESTION))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(predict)
        assert [r.outputs for r in results] == [{"answer": "Trio"}] * 4
        calls = JSONOnly.calls
        assert engine.statistics().sharing.cache_entries == 0  # type: ignore[union-attr]
        await engine.predict("default", QUESTION)
        assert JSONOnly.calls > calls


async def test_a_parse_failure_reaches_every_waiter_naming_both_adapters(autojump_clock: Any) -> None:
    class Unparsable(SimulatedLM):
        async def complete(
            self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any
        ) -> Completion:
            await trio.sleep(1)
            return Completion(["no fields at all"], {"prompt_tokens": 1, "completion_tokens": 1})

    async with open_engine(config(MEMORY), lms={"default": Unparsable()}) as engine:
        errors: list[ProgramError] = []

        async def predict() -> None:
            with pytest.raises(ProgramError) as caught:
                await engine.predict("default", QUESTION)
            errors.append(caught.value)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(predict)
        assert len({id(e) for e in errors}) == 3
        assert all("ChatAdapter then JSONAdapter" in e.message for e in errors)
        assert engine.statistics().failed == 3


# --- streams -------------------------------------------------------------------------------------------


async def test_a_stream_reads_a_stored_prediction_and_stores_its_own(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=0.1, token_delay=0.01)
    async with open_engine(config(MEMORY), lms={"default": lm}) as engine:
        async with engine.stream("default", QUESTION) as events:
            first = [event async for event in events]
        predicted = await engine.predict("default", QUESTION)  # stored by the stream
        assert predicted.timings.cached
        async with engine.stream("default", QUESTION) as events:
            again = [event async for event in events]
        assert lm.started == 1
        text = "".join(e.text for e in again if isinstance(e, FieldDelta))
        assert text == "".join(e.text for e in first if isinstance(e, FieldDelta))
        final = again[-1]
        assert isinstance(final, FinalEvent)
        assert final.result.timings.cached
        assert final.result.outputs == predicted.outputs


# --- programs of several calls --------------------------------------------------------------------------


class TwoSteps(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("question -> answer")
        self.second = dspy.Predict("question, answer -> verdict")

    async def aforward(self, question: str, second: str = "same") -> dspy.Prediction:
        first = await self.first.acall(question=question)
        return await self.second.acall(question=f"{question} {second}", answer=first.answer)


async def test_a_program_of_several_calls_shares_call_by_call(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(two=ProgramSpec(TwoSteps())), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for second in ("a", "b", "a"):
                nursery.start_soon(engine.predict, "two", {"question": "q", "second": second})
        assert lm.started == 3  # the first calls shared (1), the second ones by their own inputs (2)


async def test_a_shared_prediction_keeps_who_answered_what_it_cost_and_whether_it_was_cut(
    autojump_clock: Any,
) -> None:
    """Requests given a shared or stored prediction name the LM that answered it, pay no tokens for it,
    and say so when its answer stopped at its token limit; requests of other LM parameters or another
    tenant never share it."""
    from dspy_trio.engine import EngineConfig, LMConfig, Price, open_engine
    from dspy_trio.engine._cache_config import CacheConfig

    from .test_coalesce import CutLM

    lm = CutLM(first_token_delay=1.0)
    dollar = Price(input_per_mtok=1e6, output_per_mtok=1e6)
    config = EngineConfig(
        lms={"default": LMConfig(price=dollar)}, cache=CacheConfig(backend="memory", ttl=60)
    )
    question = {"question": "What is Trio?"}
    async with open_engine(config, lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            results: list[Any] = []
            for tenant in ("acme", "acme", "acme", "globex"):
                nursery.start_soon(
                    lambda tenant=tenant: _into(results, engine.predict("default", question, tenant=tenant))
                )
            nursery.start_soon(
                lambda: _into(
                    results,
                    engine.predict("default", question, tenant="acme", lm_params={"temperature": 0.5}),
                )
            )
        hit = await engine.predict("default", question, tenant="acme")
        tenants = engine.statistics().tenants
    assert lm.started == 3  # acme's three as one, globex's own, the other temperature's own
    assert hit.timings.cached
    assert all(result.lms == ("default",) and result.truncated for result in [*results, hit])
    paid = sum(result.usage.total_tokens for result in results if result.usage.total_tokens)
    assert tenants["acme"].cost_usd + tenants["globex"].cost_usd == pytest.approx(paid)
    assert tenants["acme"].requests == {"succeeded": 5}


async def _into(results: list[Any], call: Any) -> None:
    results.append(await call)


# --- identity and isolation under attack ---------------------------------------------------------------


class Answering(SimulatedLM):
    """Answers ``text`` after ``delay`` seconds, counting its calls."""

    def __init__(self, text: str, delay: float = 1.0) -> None:
        super().__init__()
        self.text, self.delay, self.started = text, delay, 0

    async def complete(self, messages: Sequence[Message], params: Mapping[str, Any], sink: Any) -> Completion:
        self.started += 1
        await trio.sleep(self.delay)
        return Completion([self.text], {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})


async def test_a_demo_or_instructions_changed_in_place_is_another_prediction(autojump_clock: Any) -> None:
    """DSPy's Examples and signatures are mutable: a demo edited in place, or the instructions set on the
    signature class, change the prompt, so a prediction stored before must not answer after."""
    lm = CountingLM(first_token_delay=1.0)
    changing = _with_demo("4")
    async with open_engine(config(MEMORY, changing=ProgramSpec(changing)), lms={"default": lm}) as engine:
        await engine.predict("changing", QUESTION)
        assert (await engine.predict("changing", QUESTION)).timings.cached
        changing.demos[0]["answer"] = "four"  # the same Example object, another answer
        assert not (await engine.predict("changing", QUESTION)).timings.cached
        changing.demos[0].question = "What is 2 + 2?"
        assert not (await engine.predict("changing", QUESTION)).timings.cached
        changing.signature.instructions = "Answer in one word."
        assert not (await engine.predict("changing", QUESTION)).timings.cached
        assert lm.started == 4


async def test_outputs_nested_in_a_tuple_are_each_waiters_own(autojump_clock: Any) -> None:
    """A tuple holding a list is not immutable: a caller appending to it changes no one else's outputs,
    nor the stored prediction."""
    lm = Answering('[[ ## pair ## ]]\n[["a", "b"], 1]\n\n[[ ## completed ## ]]')
    programs = {"pairs": ProgramSpec("question -> pair: tuple[list[str], int]")}
    async with open_engine(config(MEMORY, **programs), lms={"default": lm}) as engine:
        results = []

        async def predict() -> None:
            result = await engine.predict("pairs", QUESTION)
            results.append(result)
            result.outputs["pair"][0].append("changed")

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(predict)
        assert lm.started == 1
        hit = await engine.predict("pairs", QUESTION)
        assert hit.timings.cached
        assert hit.outputs["pair"] == (["a", "b"], 1)
        assert all(r.outputs["pair"][0] == ["a", "b", "changed"] for r in results)


async def test_inputs_whose_repr_elides_their_content_never_share(autojump_clock: Any) -> None:
    """Two images of the same size have the same repr (DSPy elides the data); so may any value the key
    cannot write out in full (a value of another type is not shared whole: its LM calls, keyed by the
    prompts they send, still are)."""
    lm = CountingLM(first_token_delay=1.0)
    programs = {"look": ProgramSpec("image: dspy.Image -> answer")}
    first = dspy.Image(url="data:image/png;base64," + "A" * 400)
    second = dspy.Image(url="data:image/png;base64," + "B" * 400)
    assert repr(first) == repr(second)
    async with open_engine(config(MEMORY, **programs), lms={"default": lm}) as engine:
        await engine.predict("look", {"image": first})
        assert (await engine.predict("look", {"image": first})).timings.cached
        assert not (await engine.predict("look", {"image": second})).timings.cached
        assert lm.started == 2


async def test_inputs_equal_in_python_but_not_in_the_prompt_never_share(autojump_clock: Any) -> None:
    """1, 1.0 and True compare equal, as do two dicts in another order: each is its own prediction
    when its prompt differs."""
    lm = CountingLM(first_token_delay=1.0)
    programs = {"count": ProgramSpec("question, n: int | float | bool | str | dict[str, int] -> answer")}
    async with open_engine(config(MEMORY, **programs), lms={"default": lm}) as engine:
        for n in (1, 1.0, True, "1", {"a": 1, "b": 2}, {"b": 2, "a": 1}, "é", "e\u0301"):
            result = await engine.predict("count", {"question": "How many?", "n": n})
            assert not result.timings.cached, n
        assert lm.started == 8


@pytest.mark.parametrize("how", ["deadline", "cancel"])
@pytest.mark.parametrize("leaves", [0.5, 1.0 - 1e-9, 1.0, 1.0 + 1e-9])
@pytest.mark.parametrize("late", [1.0 - 1e-9, 1.0, 1.0 + 1e-9])
async def test_the_payer_leaving_as_the_answer_arrives_leaves_exactly_one_payer(
    autojump_clock: Any, how: str, leaves: float, late: float
) -> None:
    """The first waiter (the payer) leaves at about the instant the prediction arrives, and another
    joins then: every request ends with one outcome, the tokens of each completed upstream call are
    paid by exactly one request, and the tenant is booked once for them."""
    upstream = Upstream(1.0)
    outcomes: dict[str, Any] = {}
    async with open_engine(config(), lms={"default": upstream}) as engine:

        async def predict(name: str, joins: float, until: float | None) -> None:
            await trio.sleep_until(joins)
            with trio.CancelScope() as scope:
                if until is not None and how == "deadline":
                    scope.deadline = until
                elif until is not None:
                    nursery.start_soon(cancel_at, scope, until)
                outcomes[name] = await engine.predict("default", QUESTION)
                return
            outcomes[name] = "left"

        async def cancel_at(scope: trio.CancelScope, when: float) -> None:
            await trio.sleep_until(when)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(predict, "payer", 0.0, leaves)
            nursery.start_soon(predict, "stays", 0.1, None)
            nursery.start_soon(predict, "late", late, None)
        statistics = engine.statistics()
    assert set(outcomes) == {"payer", "stays", "late"}
    completed = sum(call.how == "completed" for call in upstream.calls)
    paid = [r.usage.prompt_tokens for r in outcomes.values() if r != "left"]
    assert sum(paid) == 3 * completed, (outcomes, upstream.calls)
    assert all(tokens in (0, 3) for tokens in paid)
    assert sum(t.prompt_tokens for t in statistics.tenants.values()) == 3 * completed
    assert statistics.succeeded == len(paid)
