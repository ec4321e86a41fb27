"""The request deadline value: parsed once, capped once, counted from arrival."""

from __future__ import annotations

import math

import pytest
import trio

from dspy_trio.web.deadline import RequestDeadline
from dspy_trio.web.errors import HTTPError
from dspy_trio.web.settings import ServiceSettings

SETTINGS = ServiceSettings(default_timeout=60, max_timeout=300)


def test_asked_wins_over_the_header_and_both_are_capped() -> None:
    assert RequestDeadline.start(SETTINGS, arrived=10.0, asked=5, header="7").at == 15.0
    assert RequestDeadline.start(SETTINGS, arrived=10.0, header="7").at == 17.0
    assert RequestDeadline.start(SETTINGS, arrived=10.0).timeout == 60
    assert RequestDeadline.start(SETTINGS, arrived=0.0, asked=3600).timeout == 300


@pytest.mark.parametrize("asked", [0, -1, math.inf, math.nan, True])
def test_bad_asked_timeouts_are_422(asked: float) -> None:
    with pytest.raises(HTTPError) as refused:
        RequestDeadline.start(SETTINGS, arrived=0.0, asked=asked)
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        422,
        "invalid_timeout",
        "timeout_secs",
    )


@pytest.mark.parametrize("header", ["soon", "0", "-2", "inf", "nan", ""])
def test_bad_header_timeouts_are_422(header: str) -> None:
    with pytest.raises(HTTPError) as refused:
        RequestDeadline.start(SETTINGS, arrived=0.0, header=header)
    assert refused.value.param == "X-Request-Timeout"


async def test_the_scope_ends_at_the_deadline_counted_from_arrival(
    autojump_clock: trio.testing.MockClock,
) -> None:
    arrived = trio.current_time()
    await trio.sleep(0.4)  # e.g. the body took this long to arrive
    deadline = RequestDeadline.start(SETTINGS, arrived=arrived, asked=1.0)
    with deadline.scope() as scope:
        assert trio.current_effective_deadline() == arrived + 1.0
        await trio.sleep(10)
    assert scope.cancelled_caught
    assert trio.current_time() == arrived + 1.0
    assert deadline.error().code == "deadline_exceeded"
    assert "1s" in deadline.error().message


def test_settings_read_the_new_limits_from_the_environment() -> None:
    env = {"DSPY_TRIO_KEEP_ALIVE_TIMEOUT": "2.5", "DSPY_TRIO_MAX_JSON_DEPTH": "8"}
    settings = ServiceSettings.from_env(env)
    assert (settings.keep_alive_timeout, settings.max_json_depth) == (2.5, 8)
