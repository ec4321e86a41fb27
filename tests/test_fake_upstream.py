"""The fake upstream itself: concurrency, records and the control endpoints."""

from __future__ import annotations

import httpx
import trio

from engine.lm import OpenAICompatibleLM
from engine.testing import Behavior, FakeUpstream, open_fake_upstream


async def test_sustains_1000_concurrent_slow_requests() -> None:
    # Long enough that the first request is still waiting when the thousandth arrives, on a busy machine.
    async with open_fake_upstream(Behavior(latency=3.0)) as upstream:
        lm = OpenAICompatibleLM("fake", api_base=upstream.url)
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            await lm.acall(messages=[{"role": "user", "content": f"q{i}"}])
            done += 1

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
            with trio.fail_after(60):
                await upstream.wait_for(lambda u: u.active_requests == 1000)
        # The client can have every answer before the upstream has booked the last ones as complete.
        with trio.fail_after(10):
            await upstream.wait_for(lambda u: all(r.ended for r in u.records))
        await lm.aclose()
    assert done == 1000
    assert all(r.completed_at is not None and r.status == 200 for r in upstream.records)


async def test_control_endpoints_queue_faults_and_show_records(fake_upstream: FakeUpstream) -> None:
    root = fake_upstream.url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root) as client:
        response = await client.post(
            "/_fake/faults", json={"faults": [{"kind": "unavailable", "retry_after": 1}]}
        )
        assert response.json() == {"queued": 1}
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        response = await client.post("/_fake/behavior", json={"latency": 0.01})
        assert response.json()["latency"] == 0.01
        response = await client.post("/_fake/faults", json={"faults": [{"kind": "nope"}]})
        assert response.status_code == 400
        records = (await client.get("/_fake/records")).json()["records"]
    assert [(r["status"], r["fault"]) for r in records] == [(503, "unavailable")]


async def test_repr_summarises_state(fake_upstream: FakeUpstream) -> None:
    assert repr(fake_upstream) == (
        f"<FakeUpstream {fake_upstream.url} [requests: 0, 0 active | connections: 0 open | faults queued: 0]>"
    )
