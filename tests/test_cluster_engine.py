"""Engines in one Trio run standing for processes of a cluster: cancel by id from another process,
owner checks, configuration, and the start-up warning for workers without Redis. Real redis-server; the
clock is real (Redis I/O), every wait bounded, no duration asserted."""

from __future__ import annotations

import logging

import attrs
import httpx
import pytest
import trio

from engine import EngineConfig, LMConfig, RateLimit, RequestCancelledError, open_engine
from engine._config import ClusterConfig
from engine.cluster import open_cluster
from tests.redis_server import RedisServer, eventually, prefix, redis_server
from web.server import open_server, serve
from web.settings import ServiceSettings

__all__ = ["redis_server"]  # fixture

SLOW = LMConfig(first_token_delay=0.05, token_delay=0.2, words_per_field=50)  # ~10 s: cancelled long before


def config(server: RedisServer, key_prefix: str) -> EngineConfig:
    return EngineConfig(
        lms={"default": SLOW}, cluster=ClusterConfig(redis_url=server.url, key_prefix=key_prefix)
    )


async def test_cancel_by_id_reaches_the_engine_of_another_process(redis_server: RedisServer) -> None:
    shared = prefix()
    async with open_engine(config(redis_server, shared)) as a, open_engine(config(redis_server, shared)) as b:
        outcome: list[BaseException] = []

        async def run() -> None:
            try:
                await a.predict("default", {"question": "q"}, request_id="req-1")
            except RequestCancelledError as exc:
                outcome.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await eventually(lambda: a.statistics().in_flight == 1)
                assert await b.cancel_anywhere("missing") is False
                await eventually(lambda: _registered(b, "req-1"))
                assert await b.cancel_anywhere("req-1") is True
        assert len(outcome) == 1
        assert a.statistics().cancelled == 1
        await eventually(lambda: _gone(b, "req-1"))  # unregistered when it ended


async def _registered(engine: object, request_id: str) -> bool:
    cluster = engine.cluster  # type: ignore[attr-defined]
    link = cluster.link
    return await link.call(lambda: link.client.exists([link.key("request", request_id)])) == 1


async def _gone(engine: object, request_id: str) -> bool:
    return not await _registered(engine, request_id)


async def test_a_cancel_for_another_owner_finds_nothing(redis_server: RedisServer) -> None:
    shared = prefix()
    cluster_config = ClusterConfig(redis_url=redis_server.url, key_prefix=shared)
    async with open_cluster(cluster_config) as owner, open_cluster(cluster_config) as other:
        heard: list[str] = []
        owner.attach(lambda request_id: heard.append(request_id) is None)
        owner.registry.started("r", owner="alice-key")
        await eventually(lambda: _exists(other, "r"))
        assert await other.cancel("r", owner="mallory-key") is False
        assert await other.cancel("r") is False
        assert await other.cancel("r", owner="alice-key") is True
        await eventually(lambda: heard == ["r"])
        raw = await other.link.call(lambda: other.link.client.get(other.link.key("request", "r")))
        assert "alice-key" not in raw  # only a hash of the owner is stored


async def _exists(cluster: object, request_id: str) -> bool:
    link = cluster.link  # type: ignore[attr-defined]
    return await link.call(lambda: link.client.exists([link.key("request", request_id)])) == 1


def test_cluster_config_from_toml_and_env(tmp_path: object) -> None:
    path = tmp_path / "c.toml"  # type: ignore[operator]
    path.write_text('[cluster]\nredis_url = "redis://h:1/2"\nkey_prefix = "p"\ncall_timeout = 0.2\n')
    from_toml = EngineConfig.from_toml(path)
    assert from_toml.cluster == ClusterConfig(redis_url="redis://h:1/2", key_prefix="p", call_timeout=0.2)
    from_env = EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path), "DSPY_TRIO_REDIS_URL": "redis://x:3/0"})
    assert from_env.cluster.redis_url == "redis://x:3/0"
    assert from_env.cluster.key_prefix == "p"
    assert EngineConfig.from_env({}).cluster.redis_url is None
    path.write_text('[cluster]\nredis = "x"\n')
    with pytest.raises(Exception, match="unknown key"):
        EngineConfig.from_toml(path)
    assert "redis://h" not in repr(from_toml)  # a URL may hold a password


@pytest.mark.filterwarnings("ignore:The config `workers` has no affect:Warning")  # Hypercorn's, at 2
@pytest.mark.parametrize(("redis_url", "warned"), [(None, True), ("redis://127.0.0.1:1/0", False)])
async def test_workers_with_rate_limits_and_no_redis_warn_at_start(
    caplog: pytest.LogCaptureFixture, redis_url: str | None, warned: bool
) -> None:
    caplog.set_level(logging.WARNING)
    engine = EngineConfig(
        lms={"default": attrs.evolve(SLOW, rate_limit=RateLimit(rpm=30))},
        cluster=ClusterConfig(redis_url=redis_url),
    )
    settings = attrs.evolve(ServiceSettings(port=0), engine=engine, ws_ping_interval=None)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve(settings, handle_signals=False, worker_count=2, task_status=task_status)
        )
        server.shutdown()
    assert any("may see up to 2 times its quota" in r.getMessage() for r in caplog.records) is warned


async def test_ready_tells_how_many_processes_share_the_quota(redis_server: RedisServer) -> None:
    """``/ready`` of a replica with Redis shows the processes sharing the quota and the degraded flag."""
    shared = prefix()
    engine = config(redis_server, shared)
    settings = attrs.evolve(ServiceSettings(port=0), engine=engine, ws_ping_interval=None)
    async with (
        open_engine(config(redis_server, shared)),
        open_server(settings) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):

        async def both_seen() -> bool:
            body = (await client.get("/ready")).json()
            return bool(body["cluster"] == {"processes": 2, "degraded": False})

        await eventually(both_seen)
