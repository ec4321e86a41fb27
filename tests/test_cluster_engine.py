"""Engines in one Trio run standing for processes of a cluster: cancel by id from another process,
owner checks, configuration, and the start-up warning for workers without Redis. Real redis-server; the
clock is real (Redis I/O), every wait bounded, no duration asserted."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import trustme

from dspy_trio.engine import (
    BreakerSettings,
    BudgetLimit,
    ClusterUnavailableError,
    ConfigError,
    Engine,
    EngineConfig,
    LMConfig,
    RateLimit,
    RequestCancelledError,
    SimulatedSettings,
    open_engine,
)
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine._owners import OwnerCheck
from dspy_trio.engine.cluster import open_cluster
from dspy_trio.engine.cluster._cancel import LocalCancel
from dspy_trio.web.server import open_server, serve
from dspy_trio.web.settings import ServiceSettings
from tests.redis_server import (
    REDIS,
    RedisServer,
    eventually,
    free_port,
    own_redis_server,
    prefix,
    redis_server,
)

from .helpers import CountingLM, wait_until
from .web_helpers import FAST, running, settings

__all__ = ["own_redis_server", "redis_server"]  # fixtures

SLOW = LMConfig(
    settings=SimulatedSettings(first_token_delay=0.05, token_delay=0.2, words_per_field=50)
)  # ~10 s: cancelled long before


def config(server: RedisServer, key_prefix: str) -> EngineConfig:
    return EngineConfig(
        lms={"default": SLOW}, cluster=ClusterConfig(redis_url=server.url, key_prefix=key_prefix)
    )


async def test_cancel_by_id_reaches_the_engine_of_another_process(redis_server: RedisServer) -> None:
    """A cancel sent the instant the request was accepted finds it (nothing to register first), and a
    request that is never cancelled writes nothing to Redis."""
    shared = prefix()
    async with open_engine(config(redis_server, shared)) as a, open_engine(config(redis_server, shared)) as b:
        outcome: list[BaseException] = []

        async def run() -> None:
            try:
                await a.predict("default", {"question": "q"}, request_id="req-1")
            except RequestCancelledError as exc:
                outcome.append(exc)

        with trio.fail_after(10):
            await eventually(lambda: _subscribed(a) and _subscribed(b))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await eventually(lambda: a.statistics().in_flight == 1)
                assert await b.cancel_anywhere("missing") is False
                assert await _request_keys(b) == []
                assert await b.cancel_anywhere("req-1") is True
        assert len(outcome) == 1
        assert a.statistics().cancelled == 1


def _subscribed(engine: Engine) -> bool:
    return engine.cluster is not None and engine.cluster.subscribed.is_set()


async def _request_keys(engine: Engine) -> list[str]:
    assert engine.cluster is not None
    link = engine.cluster.link
    return list(await link.call(lambda: link.client.keys(link.key("request", "*"))))


def _cancel_here(running: dict[str, str | None], heard: list[str]) -> LocalCancel:
    """A process's local cancel over ``running`` (request id -> owner), as the engine's ``_cancel_if``."""

    def cancel(request_id: str, allowed: OwnerCheck) -> bool:
        if request_id in running and allowed(running[request_id]):
            heard.append(request_id)
            return True
        return False

    return cancel


async def test_a_cancel_for_another_owner_finds_nothing(redis_server: RedisServer) -> None:
    shared = prefix()
    cluster_config = ClusterConfig(redis_url=redis_server.url, key_prefix=shared)
    async with open_cluster(cluster_config) as owner, open_cluster(cluster_config) as other:
        heard: list[str] = []
        owner.attach(_cancel_here({"r": "alice-key"}, heard))
        other.attach(_cancel_here({}, heard))
        await eventually(lambda: owner.subscribed.is_set() and other.subscribed.is_set())
        assert await other.cancel("r", owner="mallory-key") is False
        assert await other.cancel("missing", owner="alice-key") is False
        assert heard == []
        assert await other.cancel("r", owner="alice-key") is True
        assert heard == ["r"]
        assert await other.cancel("r") is True  # the application itself (no owner): any request


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


async def test_a_batch_is_cancelled_by_its_id_from_another_process(redis_server: RedisServer) -> None:
    """The id a batch's caller knows is the batch's own: a cancel for it from another process stops
    every item of it, for its owner only."""
    shared = prefix()
    async with open_engine(config(redis_server, shared)) as a, open_engine(config(redis_server, shared)) as b:
        outcomes: list[object] = []

        async def run() -> None:
            items = [{"question": "a"}, {"question": "b"}]
            outcomes.extend(await a.batch("default", items, request_id="job", owner="alice"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await eventually(lambda: a.statistics().in_flight == 2)
                await eventually(lambda: b.cluster is not None and b.cluster.subscribed.is_set())
                assert await b.cancel_anywhere("job", owner="mallory") is False
                assert await b.cancel_anywhere("job", owner="alice") is True
        assert [type(o.error) for o in outcomes] == [RequestCancelledError] * 2  # type: ignore[attr-defined]


async def test_the_owner_rule_is_the_same_through_redis(redis_server: RedisServer) -> None:
    """An ownerless request is not cancelled for an owner, in another process as in its own; the
    application itself (no owner) may cancel any request anywhere."""
    shared = prefix()
    async with open_engine(config(redis_server, shared)) as a, open_engine(config(redis_server, shared)) as b:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for request_id, owner in (("nobody's", None), ("alice's", "alice")):
                    nursery.start_soon(_run, a, request_id, owner)
                await eventually(lambda: a.statistics().in_flight == 2)
                await trio.sleep(0.2)  # real time: registrations (if any) are written
                assert a.cancel("nobody's", owner="alice") is False
                assert await b.cancel_anywhere("nobody's", owner="alice") is False
                assert await b.cancel_anywhere("alice's", owner="mallory") is False
                assert a.statistics().in_flight == 2
                assert await b.cancel_anywhere("alice's") is True
                assert await b.cancel_anywhere("nobody's") is True
        assert a.statistics().cancelled == 2


async def _run(engine: object, request_id: str, owner: str | None) -> None:
    with contextlib.suppress(RequestCancelledError):
        await engine.predict("default", {"question": "q"}, request_id=request_id, owner=owner)  # type: ignore[attr-defined]


async def _broadcast_of_a_cancel(server: RedisServer, config: ClusterConfig, owner: str) -> dict[str, Any]:
    """What anyone subscribed to Redis sees of a cancel on behalf of ``owner``."""
    async with open_cluster(config) as cluster:
        cluster.attach(lambda request_id, allowed: False)
        await eventually(cluster.subscribed.is_set)
        seen: list[dict[str, Any]] = []
        pubsub = cluster.link.client.pubsub(channels=[cluster.relay.broadcast_channel])
        async with pubsub, trio.open_nursery() as nursery:

            async def listen() -> None:
                async for message in pubsub:
                    if message.get("type") == "message":
                        seen.append(json.loads(message["data"]))
                        nursery.cancel_scope.cancel()

            nursery.start_soon(listen)
            await trio.sleep(0.2)  # real time: the raw subscription is made
            assert await cluster.cancel("r", owner=owner) is False
        return seen[0]


async def test_the_owner_travels_as_a_keyed_digest_never_a_plain_hash(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone who reads Redis sees ``HMAC(secret, key)``: a guessed API key cannot be checked against it
    without the deployment's secret (an unsalted SHA-256 could)."""
    secret = "s3cret-of-this-deployment"
    config = ClusterConfig(redis_url=redis_server.url, key_prefix=prefix(), secret=secret)
    caplog.set_level(logging.WARNING, "dspy_trio.engine.cluster")
    message = await _broadcast_of_a_cancel(redis_server, config, "alice-key")
    assert "alice-key" not in json.dumps(message)
    assert message["owner"] != hashlib.sha256(b"alice-key").hexdigest()
    assert message["owner"] == hmac.new(secret.encode(), b"alice-key", hashlib.sha256).hexdigest()
    assert not [r for r in caplog.records if "secret" in r.getMessage()]

    other = attrs.evolve(config, secret="another-deployment-secret")
    assert (await _broadcast_of_a_cancel(redis_server, other, "alice-key"))["owner"] != message["owner"]


async def test_an_unset_secret_still_cancels_across_processes_and_says_what_it_costs(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "dspy_trio.engine.cluster")
    config = ClusterConfig(redis_url=redis_server.url, key_prefix=prefix())
    message = await _broadcast_of_a_cancel(redis_server, config, "alice-key")
    assert message["owner"] != hashlib.sha256(b"alice-key").hexdigest()
    warnings = [r.getMessage() for r in caplog.records if "secret" in r.getMessage()]
    assert len(warnings) == 1
    assert "DSPY_TRIO_CLUSTER_SECRET" in warnings[0]
    assert "guessed API key" in warnings[0]


def test_the_cluster_secret_from_toml_and_env_is_checked_and_never_shown(tmp_path: object) -> None:
    path = tmp_path / "c.toml"  # type: ignore[operator]
    path.write_text('[cluster]\nsecret = "0123456789abcdef-toml"\n')
    assert EngineConfig.from_toml(path).cluster.secret == "0123456789abcdef-toml"
    from_env = EngineConfig.from_env(
        {"DSPY_TRIO_CONFIG": str(path), "DSPY_TRIO_CLUSTER_SECRET": "0123456789abcdef-env"}
    )
    assert from_env.cluster.secret == "0123456789abcdef-env"
    assert "0123456789abcdef" not in repr(from_env)
    for bad in ("short", " 0123456789abcdef-padded "):
        path.write_text(f"[cluster]\nsecret = {bad!r}\n".replace("'", '"'))
        with pytest.raises(ConfigError, match=r"cluster\.secret") as info:
            EngineConfig.from_toml(path)
        assert bad.strip() not in str(info.value)


async def test_an_acl_user_with_the_documented_commands_is_enough(redis_server: RedisServer) -> None:
    """README: an ACL user limited to the deployment's keys and channels and to these commands runs a
    cluster (quota, cool-down, cancel, heartbeats, tenants' budgets, breakers, single-flight) without a
    failure; a wrong password is refused."""
    shared = prefix()
    user, password = f"user-{shared}", "a-long-password-for-this-test"
    rules = [
        "on",
        f">{password}",
        f"~{shared}:*",
        f"&{shared}:*",
        "+hello",
        "+ping",
        "+client|setname",
        "+select",
        "+get",
        "+set",
        "+del",
        "+decrby",
        "+exists",
        "+eval",
        "+evalsha",
        "+script|load",
        "+script|exists",  # a pipeline of scripts (single-flight's announcements) checks them first
        "+time",
        "+multi",
        "+exec",
        "+zadd",
        "+zremrangebyscore",
        "+zcard",
        "+zrem",
        "+pexpire",
        "+publish",
        "+subscribe",
        "+hset",
        "+hget",
        "+hgetall",
        "+incr",
        "+pttl",
        "+type",
    ]
    command = ["redis-cli", "-p", str(redis_server.port), "ACL", "SETUSER", user, *rules]
    assert (await trio.run_process(command, capture_stdout=True)).stdout.strip() == b"OK"
    url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    config = EngineConfig(
        lms={"default": attrs.evolve(SLOW, rate_limit=RateLimit(rpm=30, tpm=100000))},
        cluster=ClusterConfig(redis_url=url, key_prefix=shared, secret="0123456789abcdef-acl"),
    )
    async with open_engine(config) as a, open_engine(config) as b:
        await eventually(lambda: _subscribed(a) and _subscribed(b))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run, a, "r", "alice")
                await eventually(lambda: a.statistics().in_flight == 1)
                assert await b.cancel_anywhere("r", owner="alice") is True
        assert b.cluster is not None
        b.cluster.cooldown("default").extend_to(trio.current_time() + 0.1)
        budget = b.cluster.budget("acme", BudgetLimit(usd=5))  # a tenant's budget: HSET, HGETALL
        budget.spend(1.0)
        # A breaker's every Redis use: the kept opening read at its start, kept when it opens, a probe's
        # place claimed and given back, the opening forgotten when it closes (scripts and DECRBY).
        b.cluster.breaker("acl-lm", BreakerSettings(), longest_open=5.0)
        peers = b.cluster._breakers["acl-lm"]
        peers.opened(trio.current_time() + 5.0, "an-opening")
        assert await peers.claim_probe("an-opening", 1, 5.0)
        peers.release_probe("an-opening")
        peers.closed("an-opening")
        await trio.sleep(0.3)  # real time: a heartbeat, the cool-down's broadcast, the writes
        assert (await budget.spent()).usd == 1.0
        for cluster in (a.cluster, b.cluster):
            assert cluster is not None
            statistics = cluster.statistics()
            assert (statistics.degraded, statistics.failures, statistics.writes_dropped) == (False, 0, 0)
    wrong = ClusterConfig(redis_url=url.replace(password, "wrong-password-0000"), key_prefix=shared)
    async with open_cluster(wrong) as refused:
        assert refused.statistics().degraded


async def test_a_rediss_url_talks_tls_to_redis(tmp_path: Path) -> None:
    """README: TLS to Redis with a ``rediss://`` URL (here with a test CA named in the URL)."""
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    issued = ca.issue_cert("127.0.0.1")
    issued.private_key_pem.write_to_path(tmp_path / "key.pem")
    issued.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    tls_port = free_port()
    options = ("--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "cert.pem"))
    options += ("--tls-key-file", str(tmp_path / "key.pem"), "--tls-ca-cert-file", str(tmp_path / "ca.pem"))
    server = RedisServer((*options, "--tls-auth-clients", "no"))
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
        config = ClusterConfig(redis_url=url, key_prefix=prefix(), secret="0123456789abcdef-tls")
        async with open_cluster(config) as cluster:
            assert not cluster.statistics().degraded
            quota = cluster.quota("up", 30, None)
            await quota.acquire(0)
            assert (await quota.usage())[0] == 1
        plain = ClusterConfig(
            redis_url=f"redis://127.0.0.1:{tls_port}/0", key_prefix=prefix(), call_timeout=0.3
        )
        async with open_cluster(plain) as refused:
            assert refused.statistics().degraded  # the TLS port does not speak plain Redis
    finally:
        server.stop()


@pytest.mark.parametrize(
    "secrets", [(None, "0123456789abcdef-one"), ("0123456789abcdef-one", "another-0123456789")]
)
async def test_a_cancel_between_processes_whose_secrets_differ_is_not_a_silent_not_found(
    redis_server: RedisServer, secrets: tuple[str | None, str | None]
) -> None:
    """A rolling deploy that sets the secret, or one replica with a typo in it: a cancel by id for the
    owner that started the request must either reach it or fail loudly (``ClusterUnavailableError``
    naming the secret), never answer "no such request" for a request that is running."""
    shared = prefix()
    runs, cancels = (
        ClusterConfig(redis_url=redis_server.url, key_prefix=shared, secret=secret) for secret in secrets
    )
    async with open_cluster(runs) as running, open_cluster(cancels) as cancelling:
        heard: list[str] = []
        running.attach(_cancel_here({"r": "alice-key"}, heard))
        cancelling.attach(_cancel_here({}, heard))
        await eventually(lambda: running.subscribed.is_set() and cancelling.subscribed.is_set())
        found: bool | str
        try:
            found = await cancelling.cancel("r", owner="alice-key")
        except ClusterUnavailableError as exc:
            found = str(exc)
        if isinstance(found, str):
            assert "secret" in found
        else:
            assert found is True
            assert heard == ["r"]


async def test_a_cancel_that_cannot_reach_redis_is_not_answered_as_unknown(
    own_redis_server: RedisServer,
) -> None:
    """Two replicas share Redis. Key A streams on replica 1; Redis then dies, and key A asks replica 2
    to cancel. Replica 2 cannot know where the request runs: a 404 ``unknown_request`` would tell the
    client the request does not exist while it runs on. Expected: a 503 (retryable)."""
    lm = CountingLM(first_token_delay=30)
    cluster = ClusterConfig(redis_url=own_redis_server.url, key_prefix=prefix(), call_timeout=0.2)
    service = settings(
        api_keys=("key-a", "key-b"), engine=EngineConfig(lms={"default": FAST}, cluster=cluster)
    )
    key_a = {"Authorization": "Bearer key-a"}
    async with (
        running(service, lms={"default": lm}) as one,
        running(service, lms={"default": CountingLM()}) as two,
        httpx.AsyncClient() as client,
        client.stream("POST", one.url + "/stream", json={"question": "q"}, headers=key_a) as stream,
    ):
        server_id = stream.headers["x-server-request-id"]
        await wait_until(lambda: lm.started == 1)
        engine = two.state.engine
        assert engine is not None
        cluster = engine.cluster
        assert cluster is not None
        await eventually(cluster.subscribed.is_set)
        own_redis_server.stop()
        answer = await client.delete(f"{two.url}/v1/requests/{server_id}", headers=key_a)
        assert lm.finished == 0  # it still runs on replica 1
        assert answer.status_code == 503, answer.text
