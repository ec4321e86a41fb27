"""Two real ``dspy-trio serve`` processes sharing one ``redis-server`` enforce one tenant's rate limit and
another's budget together, against the fake upstream in its own process. Real time across processes:
nothing here asserts a duration, and every wait is bounded."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.cluster_processes import Process, fake_upstream, replica
from tests.redis_server import REDIS, RedisServer

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

RPM = 6
LIMITED, METERED = "key-of-the-limited-tenant", "key-of-the-metered-tenant"


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[list[str], str]]:
    redis = RedisServer()
    redis.start()
    upstream, upstream_url = fake_upstream(latency=0.05)
    config = Path(tempfile.mkstemp(prefix="cluster-tenants-", suffix=".toml")[1])
    config.write_text(
        f'[lms.default]\nprovider = "openai"\nmodel = "fake-model"\napi_base = "{upstream_url}/v1"\n'
        'api_key = "test-key"\nretry = { max_attempts = 1 }\n'
        "price = { input_per_mtok = 1000000, output_per_mtok = 1000000 }\n\n"  # a dollar a token
        f'[tenants.limited]\nkeys = ["{_digest(LIMITED)}"]\nrate_limit = {{ rpm = {RPM} }}\n\n'
        f'[tenants.metered]\nkeys = ["{_digest(METERED)}"]\nbudget = {{ usd = 1, window = 86400 }}\n'
    )
    env = {
        "DSPY_TRIO_CONFIG": str(config),
        "DSPY_TRIO_REDIS_URL": redis.url,
        "DSPY_TRIO_CLUSTER_SECRET": "a-secret-of-this-test-deployment",
        "DSPY_TRIO_DRAIN_TIMEOUT": "2",
    }
    started: list[tuple[Process, str]] = [replica(1, env), replica(1, env)]
    try:
        for process, _ in started:
            process.wait_for("serving on", 1)
        yield [url for _, url in started], upstream_url
    finally:
        for process, _ in started:
            process.stop()
        upstream.stop()
        redis.stop()
        config.unlink(missing_ok=True)


async def predict(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    return await client.post(
        f"{url}/v1/programs/default/predict",
        json={"inputs": {"question": "q"}},
        headers={"Authorization": f"Bearer {key}"},
    )


async def upstream_count(upstream_url: str) -> int:
    async with httpx.AsyncClient() as client:
        return len((await client.get(f"{upstream_url}/_fake/records")).json()["records"])


async def test_two_processes_enforce_one_tenants_rpm_together(replicas: tuple[list[str], str]) -> None:
    """24 requests of the tenant over both processes, 6 a minute: at most 6 reach the upstream, the rest
    are 429 tenant_rate_limited with Retry-After (without Redis each process would let 6 through)."""
    urls, upstream_url = replicas
    before = await upstream_count(upstream_url)
    statuses: list[int] = []
    codes: set[str] = set()
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(24):
            response = await predict(client, urls[i % 2], LIMITED)
            statuses.append(response.status_code)
            if response.status_code == 429:
                codes.add(response.json()["error"]["code"])
                assert 1 <= int(response.headers["retry-after"]) <= 60
    seen = await upstream_count(upstream_url) - before
    assert statuses.count(200) == seen
    assert RPM // 2 <= seen <= RPM, statuses
    assert set(statuses) == {200, 429}
    assert codes == {"tenant_rate_limited"}


async def test_two_processes_enforce_one_tenants_budget_together(replicas: tuple[list[str], str]) -> None:
    """One request in the first process spends more than the tenant's 1 USD; the second process then
    refuses it with 429 budget_exceeded (Retry-After: the end of the day), before any upstream call."""
    urls, upstream_url = replicas
    async with httpx.AsyncClient(timeout=30) as client:
        first = await predict(client, urls[0], METERED)
        assert first.status_code == 200
        assert first.json()["usage"]["prompt_tokens"] > 1
        limit = time.monotonic() + 10  # real time: the spend's write reaches Redis within a round-trip
        while True:
            before = await upstream_count(upstream_url)
            response = await predict(client, urls[1], METERED)
            if response.status_code == 429 or time.monotonic() > limit:
                break
            await trio.sleep(0.05)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "budget_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 86400  # the end of the UTC day
        assert await upstream_count(upstream_url) == before  # refused before any upstream call
        again = await predict(client, urls[0], METERED)
        assert again.status_code == 429
