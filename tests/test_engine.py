"""The engine on the virtual clock: outcomes, deadlines at every stage, admission and shutdown.

Every test that involves time runs on ``MockClock(autojump_threshold=0)`` and asserts exact virtual times.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from dspy_trio.engine import (
    ConfigError,
    EngineClosedError,
    EngineConfig,
    EngineError,
    InvalidInputError,
    LMConfig,
    OverloadedError,
    ProgramError,
    ProgramSpec,
    UnknownProgramError,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine.lm import SimulatedLM

from .helpers import CountingLM, FailingLM, tasks_living


def config(**changes: Any) -> EngineConfig:
    return EngineConfig(lms={"default": LMConfig()}, **changes)


async def test_predict_returns_outputs_usage_timings_and_id(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        result = await engine.predict("default", {"question": "What is Trio?"}, request_id="req-1")
    assert result.request_id == "req-1"
    assert result.program == "default"
    assert isinstance(result.outputs["answer"], str)
    assert result.outputs["answer"]
    assert result.usage.completion_tokens > 0
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.timings.queued == 0
    assert result.timings.lm == pytest.approx(1.0)
    assert result.timings.total == pytest.approx(1.0)


async def test_generated_request_ids_are_unique(autojump_clock: Any) -> None:
    async with open_engine(config(), lms={"default": CountingLM(first_token_delay=0)}) as engine:
        ids = {(await engine.predict("default", {"question": "q"})).request_id for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({}, "question", "missing input field 'question'"),
        ({"question": "q", "extra": "x"}, "extra", "unknown input field 'extra'"),
        ({"question": 3}, "question", "must be a string, got int"),
        ({"question": None}, "question", "must be a string, got NoneType"),
    ],
)
async def test_invalid_inputs_name_the_field_and_never_start(
    autojump_clock: Any, inputs: dict[str, Any], field: str, message: str
) -> None:
    lm = CountingLM()
    async with open_engine(config(), lms={"default": lm}) as engine:
        with pytest.raises(InvalidInputError, match=message) as info:
            await engine.predict("default", inputs)
        assert info.value.field == field
        assert engine.statistics().invalid == 1
    assert lm.started == 0


async def test_inputs_must_be_a_mapping(autojump_clock: Any) -> None:
    async with open_engine(config()) as engine:
        with pytest.raises(InvalidInputError, match="inputs must be an object"):
            await engine.predict("default", ["question"])  # type: ignore[arg-type]


async def test_unknown_program_lists_the_registered_ones(autojump_clock: Any) -> None:
    async with open_engine(config()) as engine:
        with pytest.raises(UnknownProgramError, match="unknown program 'nope'; registered programs: default"):
            await engine.predict("nope", {"question": "q"})


async def test_caller_deadline_passed_before_the_call_means_the_lm_is_never_called(
    autojump_clock: Any,
) -> None:
    lm = CountingLM()
    async with open_engine(config(), lms={"default": lm}) as engine:
        with trio.move_on_after(0):
            await engine.predict("default", {"question": "q"})
        assert engine.statistics().timed_out == 1
    assert lm.started == 0


async def test_caller_deadline_during_the_lm_call_cancels_at_that_exact_time(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(), lms={"default": lm}) as engine:
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError), trio.fail_after(2.5):
            await engine.predict("default", {"question": "q"})
        assert trio.current_time() - start == 2.5
        stats = engine.statistics()
        assert (stats.timed_out, stats.in_flight, stats.queued) == (1, 0, 0)
    assert (lm.started, lm.finished) == (1, 0)


async def test_caller_cancel_before_deadline_counts_as_abandoned(autojump_clock: Any) -> None:
    async with open_engine(config(), lms={"default": CountingLM(first_token_delay=10.0)}) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.predict, "default", {"question": "q"})
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        stats = engine.statistics()
        assert (stats.abandoned, stats.cancelled, stats.timed_out, stats.in_flight) == (1, 0, 0, 0)


async def test_queue_is_fifo_and_queue_wait_counts_in_timings(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=1.0)
    finished: list[tuple[int, float]] = []
    async with open_engine(config(max_in_flight=2), lms={"default": lm}) as engine:
        start = trio.current_time()

        async def one(i: int) -> None:
            result = await engine.predict("default", {"question": f"q{i}"})
            finished.append((i, trio.current_time() - start))
            assert result.timings.queued == (i // 2) * 1.0

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i)
                await trio.lowlevel.checkpoint()
    assert sorted(finished) == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0), (4, 3.0), (5, 3.0)]


async def test_full_queue_rejects_at_once_with_retry_after(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=2.0)
    async with open_engine(config(max_in_flight=2, max_queued=2), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(engine.predict, "default", {"question": f"q{i}"})
            await trio.sleep(0.5)
            assert (engine.statistics().in_flight, engine.statistics().queued) == (2, 2)
            start = trio.current_time()
            with pytest.raises(OverloadedError) as info:
                await engine.predict("default", {"question": "one too many"})
            assert trio.current_time() == start
            # Two waves ahead (2 queued + this one, 2 at a time) at the default 1 s estimate.
            assert info.value.retry_after == 2.0
        stats = engine.statistics()
        assert (stats.succeeded, stats.rejected, stats.errors_by_code) == (4, 1, {"overloaded": 1})
        assert stats.requests_total == 5
    assert lm.started == 4


async def test_retry_after_follows_the_measured_service_time(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=4.0)
    async with open_engine(config(max_in_flight=1, max_queued=0), lms={"default": lm}) as engine:
        for _ in range(30):
            await engine.predict("default", {"question": "q"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.predict, "default", {"question": "q"})
            await trio.sleep(0.1)
            with pytest.raises(OverloadedError) as info:
                await engine.predict("default", {"question": "q"})
            assert info.value.retry_after == pytest.approx(4.0, abs=0.01)


async def test_deadline_while_queued_frees_the_queue_place_and_never_starts(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=5.0)
    async with open_engine(config(max_in_flight=1, max_queued=1), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.predict, "default", {"question": "runs"})
            await trio.sleep(0.1)
            with trio.move_on_after(1):
                await engine.predict("default", {"question": "queued"})
            assert engine.statistics().queued == 0
            nursery.start_soon(engine.predict, "default", {"question": "takes the freed place"})
            await trio.sleep(0.1)
            assert engine.statistics().queued == 1
        stats = engine.statistics()
        assert (stats.succeeded, stats.timed_out) == (2, 1)
    assert lm.started == 2


async def test_cancel_at_every_stage_leaves_no_task_no_slot_no_queue_entry(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=3.0)
    async with open_engine(config(max_in_flight=1, max_queued=10), lms={"default": lm}) as engine:
        baseline = tasks_living()
        for cancel_at in (0, 0.5, 1, 2.999, 3.5, 4.5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.predict, "default", {"question": "first"})
                await trio.lowlevel.checkpoint()
                with trio.move_on_after(cancel_at):
                    await engine.predict("default", {"question": "second"})
                nursery.cancel_scope.cancel()
            stats = engine.statistics()
            assert (stats.in_flight, stats.queued) == (0, 0), cancel_at
            assert tasks_living() == baseline
        assert engine.statistics().requests_total == 12


async def test_upstream_errors_pass_through_typed(autojump_clock: Any) -> None:
    lm = FailingLM(UpstreamServerError("boom", model="m", status=503), delay=0.5)
    async with open_engine(config(), lms={"default": lm}) as engine:
        with pytest.raises(UpstreamServerError, match="boom"):
            await engine.predict("default", {"question": "q"})
        stats = engine.statistics()
        assert (stats.failed, stats.errors_by_code, stats.in_flight) == (1, {"upstream_server_error": 1}, 0)


async def test_unparseable_lm_output_is_a_program_error(autojump_clock: Any) -> None:
    class Garbage(CountingLM):
        def render(self, messages: Any) -> str:
            return "no markers here"

    async with open_engine(config(), lms={"default": Garbage(first_token_delay=0)}) as engine:
        with pytest.raises(ProgramError, match="did not fit the signature"):
            await engine.predict("default", {"question": "q"})


async def test_a_program_failure_names_no_internal_exception(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception that is not the engine's (here a RecursionError, as deeply nested data once raised)
    is a ProgramError whose message says the program failed; its name and text go to the log only."""
    lm = FailingLM(RecursionError("maximum recursion depth exceeded while decoding a JSON array"))
    async with open_engine(config(), lms={"default": lm}) as engine:
        with pytest.raises(ProgramError) as info:
            await engine.predict("default", {"question": "q"})
    assert "Recursion" not in info.value.message
    assert "JSON array" not in info.value.message
    assert "internal error" in info.value.message
    assert isinstance(info.value.__cause__, RecursionError)
    assert "RecursionError: maximum recursion depth" in caplog.text


async def test_closing_drains_in_flight_requests_within_the_drain_timeout(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=2.0)
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        async with open_engine(config(drain_timeout=5), lms={"default": lm}) as engine:

            async def call() -> None:
                results.append(await engine.predict("default", {"question": "q"}))

            nursery.start_soon(call)
            await trio.sleep(0.5)
            start = trio.current_time()
        assert trio.current_time() - start == 1.5
    assert len(results) == 1


async def test_closing_cancels_what_outlives_the_drain_with_engine_closed(autojump_clock: Any) -> None:
    lm = CountingLM(first_token_delay=60.0)
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        async with open_engine(config(drain_timeout=5), lms={"default": lm}) as engine:

            async def call() -> None:
                try:
                    await engine.predict("default", {"question": "q"})
                except EngineClosedError as exc:
                    errors.append(exc)

            nursery.start_soon(call)
            await trio.sleep(1)
            start = trio.current_time()
        assert trio.current_time() - start == 5
        with pytest.raises(EngineClosedError, match="shutting down"):
            await engine.predict("default", {"question": "after close"})
    assert len(errors) == 1
    stats = engine.statistics()
    assert (stats.shut_down, stats.failed, stats.rejected) == (1, 0, 1)
    assert stats.errors_by_code == {"engine_closed": 1}


async def test_exceptions_from_the_block_are_not_wrapped_in_groups(autojump_clock: Any) -> None:
    with pytest.raises(KeyError):
        async with open_engine(config()):
            raise KeyError("mine")


async def test_repr_is_a_useful_summary(autojump_clock: Any) -> None:
    async with open_engine(config(), lms={"default": CountingLM(first_token_delay=0)}) as engine:
        await engine.predict("default", {"question": "q"})
        assert repr(engine) == (
            "<Engine [Requests: 0 in flight, 0 queued | "
            "1 ok, 0 failed, 0 timed out, 0 abandoned, 0 cancelled, 0 shut down, 0 rejected]>"
        )


async def test_an_overloaded_engine_refuses_before_validating_the_inputs(autojump_clock: Any) -> None:
    """The refusal skips validation (the costly part of accepting): inputs that would be invalid are
    refused as an overload, counted once as rejected with its error code."""
    lm = CountingLM(first_token_delay=2.0)
    async with open_engine(config(max_in_flight=1, max_queued=0), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.predict, "default", {"question": "q"})
            await trio.sleep(0.5)
            with pytest.raises(OverloadedError):
                await engine.predict("default", {"not_a_field": 1})
            stats = engine.statistics()
            assert (stats.rejected, stats.invalid, stats.errors_by_code) == (1, 0, {"overloaded": 1})
        with pytest.raises(InvalidInputError):  # with room again, the inputs are validated as before
            await engine.predict("default", {"not_a_field": 1})
        stats = engine.statistics()
        assert (stats.succeeded, stats.rejected, stats.invalid, stats.requests_total) == (1, 1, 1, 3)


@pytest.mark.parametrize("seed", range(8))
async def test_a_stream_entered_past_its_deadline_while_draining_is_timed_out_or_shut_down(
    autojump_clock: Any, seed: int
) -> None:
    """A stream entered in a scope whose deadline is already due, as ``drain()`` cancels everything: the
    engine's cancel and the caller's deadline both end it, and neither is "the consumer left"."""
    import contextlib

    import trio._core._run as trio_run

    trio_run._r.seed(seed)
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(drain_timeout=0), lms={"default": lm}) as engine:
        async with trio.open_nursery() as nursery:

            async def consumer() -> None:
                with trio.CancelScope(deadline=trio.current_time()), contextlib.suppress(EngineError):
                    async with engine.stream("default", {"question": "q"}) as events:
                        _ = [event async for event in events]

            nursery.start_soon(consumer)
            await trio.lowlevel.checkpoint()
            nursery.start_soon(engine.drain)
        stats = engine.statistics()
    assert stats.abandoned == 0
    assert stats.timed_out + stats.shut_down + stats.rejected == 1
    assert lm.started == 0


async def test_one_ownership_rule_for_cancel_by_id(autojump_clock: Any) -> None:
    """An owner given to cancel must be the request's own; an ownerless request is nobody's to cancel
    but the application's (no owner given)."""
    lm = CountingLM(first_token_delay=10.0)
    async with open_engine(config(), lms={"default": lm}) as engine, trio.open_nursery() as nursery:
        for request_id, owner in (("mine", "alice"), ("nobody's", None)):
            nursery.start_soon(
                lambda r=request_id, o=owner: _ignore(
                    engine.predict("default", {"question": "q"}, request_id=r, owner=o)
                )
            )
        await trio.sleep(1)
        assert engine.cancel("mine", owner="mallory") is False
        assert await engine.cancel_anywhere("mine", owner="mallory") is False
        assert engine.cancel("nobody's", owner="alice") is False
        assert await engine.cancel_anywhere("nobody's", owner="alice") is False
        assert engine.statistics().in_flight == 2
        assert await engine.cancel_anywhere("mine", owner="alice") is True
        assert engine.cancel("nobody's") is True
    assert engine.statistics().cancelled == 2


async def _ignore(call: Any) -> None:
    with pytest.raises(EngineError):
        await call


class ClosingLM(CountingLM):
    """Records its close; ``fail`` makes ``aclose`` raise, ``hang`` makes it block."""

    def __init__(self, *, fail: bool = False, hang: bool = False) -> None:
        super().__init__()
        self.fail, self.hang, self.closed = fail, hang, False

    async def aclose(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        if self.fail:
            raise RuntimeError("close failed")
        self.closed = True


@pytest.mark.parametrize("first", ["fail", "hang"])
async def test_one_lm_that_fails_to_close_does_not_leave_the_others_open(
    first: str, autojump_clock: trio.testing.MockClock
) -> None:
    """``close_lms`` closes every LM, each bounded on its own: an LM whose ``aclose`` raises, or one
    that hangs, does not keep the LMs after it from closing their connections."""
    broken = ClosingLM(fail=first == "fail", hang=first == "hang")
    healthy = ClosingLM()
    with contextlib.suppress(RuntimeError):
        async with open_engine(EngineConfig(), lms={"broken": broken, "default": healthy}):
            pass
    assert healthy.closed


class RecordingLM(SimulatedLM):
    """A simulated LM that records whether it was closed."""

    closed = False

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


async def test_cancelling_an_open_engine_still_closes_its_lms(autojump_clock: Any) -> None:
    """With the caller's scope cancelled, open_engine still closes every LM: its cleanup must not start
    with an unshielded ``await engine.drain()``, whose first checkpoint would raise Cancelled and skip
    closing the LMs' connections."""
    lm = RecordingLM()
    with trio.move_on_after(1):
        async with open_engine(EngineConfig(), lms={"default": lm}):
            await trio.sleep_forever()
    assert lm.closed


async def test_a_crashed_upkeep_task_still_closes_the_lms(autojump_clock: Any) -> None:
    class Crashing(RecordingLM):
        async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            await trio.sleep(1)
            raise RuntimeError("reaper failed")

    lm = Crashing()
    with pytest.raises(RuntimeError):
        async with open_engine(EngineConfig(), lms={"default": lm}):
            await trio.sleep_forever()
    assert lm.closed


async def test_an_engine_that_fails_to_open_closes_the_lms_it_was_given() -> None:
    """open_engine documents that the engine closes the ``lms=`` it is given, also when a ConfigError
    from ProgramRegistry.build (or from build_lm of a later LM) stops it from opening."""
    lm = RecordingLM()
    config = EngineConfig(programs={"bad": ProgramSpec("no_such_module_for_this_test:thing")})
    with pytest.raises(ConfigError):
        async with open_engine(config, lms={"default": lm}):
            pass
    assert lm.closed
