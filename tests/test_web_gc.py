"""The serving process freezes its start-up heap (no stop-the-world pauses), yet a stopped server is
collectable and an application's choice to turn automatic collection off is kept."""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio.testing

from dspy_trio.engine import tune_gc_for_serving
from dspy_trio.web.server import Server, serve
from tests.web_helpers import running, settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


async def test_serve_freezes_the_start_up_heap_before_serving(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(functools.partial(serve, settings(), handle_signals=False))
        frozen, young = gc.get_freeze_count(), gc.get_threshold()[0]
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/ready")).status_code == 200
        server.shutdown()
    assert frozen > 0
    assert young >= 10_000  # young collections no longer re-walk the requests in flight every 700 objects


def test_tune_gc_for_serving_freezes_and_only_raises_the_young_threshold(unfrozen: None) -> None:
    gc.set_threshold(700, 10, 10)
    settings_now = tune_gc_for_serving()
    assert settings_now.frozen == gc.get_freeze_count() > 0
    assert settings_now.thresholds == gc.get_threshold() == (10_000, 10, 10)
    gc.set_threshold(50_000, 5, 5)
    assert tune_gc_for_serving(20_000).thresholds == (50_000, 5, 5)  # never lowered


async def test_open_server_leaves_the_gc_alone(unfrozen: None) -> None:
    thresholds = gc.get_threshold()
    async with running():
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == thresholds


def test_tune_gc_for_serving_keeps_automatic_collection_off_when_the_application_turned_it_off(
    unfrozen: None,
) -> None:
    """``gc.set_threshold(0)`` is Python's documented way to turn automatic collection off; the
    function promises to never lower the young threshold, but it must not silently turn collection
    back on either (``max(0, 10_000)`` would make the process collect every 10,000 allocations again)."""
    gc.set_threshold(0, 10, 10)
    settings_now = tune_gc_for_serving()
    assert gc.get_threshold()[0] == 0, f"automatic collection turned back on: {settings_now.thresholds}"


async def test_a_stopped_server_is_garbage_collected(unfrozen: None) -> None:
    """``serve`` returns after ``Server.shutdown()``; what it built (app, engine, state) is then garbage
    and must be collectable with ``freeze_heap`` (the default) as it is without it: a start-up heap
    frozen for the life of the process would keep the stopped server's cycles, and each ``serve`` in
    the same process would leak a whole app and engine."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(functools.partial(serve, settings(), handle_signals=False))
        state = weakref.ref(server.state)
        server.shutdown()
    del server
    gc.collect()
    assert state() is None, "the stopped server's state is still alive after a full collection"
