"""The error tree carries what the engine decides from an error: outcome, retry cause, pushback."""

from __future__ import annotations

import copy
import pickle

import pytest

from dspy_trio import engine
from dspy_trio.engine import (
    DeadlineExceededError,
    EngineClosedError,
    EngineError,
    InvalidInputError,
    OverloadedError,
    ProgramError,
    RateLimitWaitError,
    RequestCancelledError,
    UnknownProgramError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from dspy_trio.engine._request import outcome_of


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (OverloadedError("full", retry_after=1), "rejected"),
        (RateLimitWaitError("rpm", retry_after=3), "rejected"),
        (RequestCancelledError("by id"), "cancelled"),
        (DeadlineExceededError("late"), "timed_out"),
        (InvalidInputError("bad"), "invalid"),
        (ProgramError("parse"), "failed"),
        (UpstreamServerError("503"), "failed"),
    ],
)
def test_the_outcome_is_a_property_of_the_error_class(error: EngineError, outcome: str) -> None:
    assert error.outcome == outcome
    assert outcome_of(error) == outcome


@pytest.mark.parametrize(
    ("cls", "retryable", "cause", "pushback"),
    [
        (UpstreamRateLimitedError, True, "rate_limited", True),
        (UpstreamServerError, True, "server_error", False),
        (UpstreamConnectionError, True, "connection", False),
        (UpstreamTimeoutError, True, "timeout", True),
        (UpstreamResponseError, False, None, False),
        (UpstreamError, False, None, False),
    ],
)
def test_retry_policy_reads_the_class_not_an_isinstance_ladder(
    cls: type[UpstreamError], retryable: bool, cause: str | None, pushback: bool
) -> None:
    assert (cls.retryable, cls.retry_cause, cls.pushback) == (retryable, cause, pushback)


def test_every_upstream_error_may_carry_retry_after() -> None:
    assert UpstreamServerError("503", status=503, retry_after=1.5).retry_after == 1.5
    assert UpstreamServerError("500").retry_after is None


def test_waiting_past_the_deadline_is_an_overload_with_retry_after_not_a_deadline() -> None:
    error = RateLimitWaitError("wait", retry_after=2.0)
    assert isinstance(error, OverloadedError)
    assert not isinstance(error, DeadlineExceededError | UpstreamError)


def test_no_docstring_mentions_a_timeout_parameter_the_engine_does_not_have() -> None:
    for name in engine.__all__:
        doc = getattr(engine, name).__doc__ or ""
        assert "timeout=" not in doc, name
    assert EngineClosedError.outcome in ("failed", "shut_down")


def test_usage_says_when_it_was_estimated() -> None:
    from dspy_trio.engine import Usage

    exact = Usage.from_tracker_totals({"m": {"prompt_tokens": 3, "completion_tokens": 2}})
    guessed = Usage.from_tracker_totals(
        {"m": {"prompt_tokens": 3, "completion_tokens": 2, "estimated": True}}
    )
    assert (exact.estimated, guessed.estimated) == (False, True)
    assert guessed.total_tokens == 5


@pytest.mark.parametrize(
    "error",
    [
        OverloadedError("queue full", retry_after=1.5),
        RateLimitWaitError("rpm", retry_after=2.0),
        UnknownProgramError("nope", ["default"]),
    ],
    ids=["OverloadedError", "RateLimitWaitError", "UnknownProgramError"],
)
def test_engine_errors_survive_pickle_and_copy(error: Exception) -> None:
    """Errors cross thread/process boundaries (trio.to_thread, test runners, multiprocessing): pickle and
    copy rebuild them whole, though their __init__s take more than ``cls(message)`` (keyword-only
    retry_after, positional known), which is all Exception.__reduce__ passes."""
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is type(error)
        assert vars(clone) == vars(error)
