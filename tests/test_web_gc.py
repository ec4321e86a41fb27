"""The serving process freezes its start-up heap (issue #13: no stop-the-world pauses)."""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.web_helpers import running, settings
from web.server import Server, serve


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


async def test_serve_freezes_the_start_up_heap_before_serving(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(functools.partial(serve, settings(), handle_signals=False))
        frozen = gc.get_freeze_count()
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/ready")).status_code == 200
        server.shutdown()
    assert frozen > 0


async def test_open_server_leaves_the_gc_alone(unfrozen: None) -> None:
    async with running():
        assert gc.get_freeze_count() == 0
