"""The rate-limited log (web/rate_limited_log.py): the first occurrence of a kind at once, then one line
per interval counting every occurrence, none lost when the log stops; other loggers' tracebacks brought
under the same rule by its filter."""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing

from dspy_trio.web.rate_limited_log import RateLimitedLog, RateLimitedTracebacks

_COUNT = re.compile(r"\((\d+) times in the last [0-9.]+ s\)$")


def occurrences(records: list[logging.LogRecord], needle: str) -> list[int]:
    """For each log line containing ``needle``, how many occurrences it stands for."""
    counts = []
    for record in records:
        message = record.getMessage()
        if needle in message:
            match = _COUNT.search(message)
            counts.append(int(match.group(1)) if match else 1)
    return counts


async def test_the_log_writes_the_first_at_once_then_one_line_per_interval_with_every_occurrence_counted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    problems = RateLimitedLog(logging.getLogger("test.ratelog"), interval=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(problems.run)
        for _ in range(90):  # one problem every 0.3 s, at 0 s to 26.7 s
            problems.record("boom", "boom happened")
            await trio.sleep(0.3)
        problems.record("other", "another kind")  # its own line at once
        nursery.cancel_scope.cancel()  # the tail is written, not lost
    lines = [(r.created, r.getMessage()) for r in caplog.records if r.name == "test.ratelog"]
    assert occurrences(caplog.records, "boom happened") == [1, 33, 33, 23]  # at 0, 10, 20 and 27 s
    assert occurrences(caplog.records, "another kind") == [1]
    assert len(lines) == 5


async def test_the_first_traceback_of_a_kind_is_logged_once_in_the_life_of_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    problems = RateLimitedLog(logging.getLogger("test.ratelog"), interval=1.0)
    for _ in range(3):
        problems.record("k", "failed", error=KeyError(1))
        await trio.sleep(2)
    traced = [r for r in caplog.records if r.name == "test.ratelog" and r.exc_info]
    assert len(traced) == 1
    assert len([r for r in caplog.records if r.name == "test.ratelog"]) == 3


def _log_failure(logger: logging.Logger, error: BaseException, message: str = "failed in %s") -> None:
    try:
        raise error
    except BaseException:
        logger.exception(message, "/somewhere")


async def test_other_loggers_tracebacks_are_one_per_type_then_a_line_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    problems = RateLimitedLog(logging.getLogger("test.ratelog"), interval=10.0)
    noisy = logging.getLogger("test.noisy")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(problems.run)
        with RateLimitedTracebacks(problems).installed(["test.noisy"]):
            for index in range(50):
                _log_failure(noisy, KeyError(index), f"failed in %s #{index}")  # new texts: no new kinds
                _log_failure(noisy, ExceptionGroup("g", [ValueError(index)]))
                _log_failure(noisy, BaseExceptionGroup("g", [trio.Cancelled._create(), ValueError(index)]))
                await trio.sleep(0.1)
        noisy.error("no traceback: %s", "passes")
        _log_failure(noisy, KeyError("after"))  # the filter is gone: as logged
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.name == "test.noisy"] == [
        "no traceback: passes",
        "failed in /somewhere",
    ]
    limited = [r for r in caplog.records if r.name == "test.ratelog"]
    assert len([r for r in limited if r.exc_info]) == 2  # one traceback per type
    assert occurrences(limited, "KeyError") == [1, 49]
    assert occurrences(limited, "ValueError") == [1, 99]  # a group's first leaf that is not a cancel
    assert limited[0].getMessage() == "failed in /somewhere #0: KeyError: 0"


async def test_tracebacks_logged_outside_the_trio_run_pass_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    problems = RateLimitedLog(logging.getLogger("test.ratelog"), interval=10.0)
    noisy = logging.getLogger("test.noisy")
    with RateLimitedTracebacks(problems).installed(["test.noisy"]):
        for _ in range(3):
            await trio.to_thread.run_sync(_log_failure, noisy, KeyError(1))
    assert len([r for r in caplog.records if r.name == "test.noisy" and r.exc_info]) == 3
    assert [r for r in caplog.records if r.name == "test.ratelog"] == []
