"""The rate-limited log (web/rate_limited_log.py): the first occurrence of a kind at once, then one line
per interval counting every occurrence, none lost when the log stops."""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing

from dspy_trio.web.rate_limited_log import RateLimitedLog

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
