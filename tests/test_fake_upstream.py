"""The fake upstream itself: concurrency, records, the control endpoints and the hostile answers."""

from __future__ import annotations

import httpx
import pytest
import trio

from dspy_trio.engine.lm import OpenAICompatibleLM
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault, open_fake_upstream


async def test_sustains_1000_concurrent_slow_requests() -> None:
    # The first request is still waiting when the thousandth arrives, however busy the machine: they are
    # all released at once when the thousandth is in.
    async with open_fake_upstream(Behavior(latency=600.0)) as upstream:
        lm = OpenAICompatibleLM("fake", api_base=upstream.url)
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            await lm.acall(messages=[{"role": "user", "content": f"q{i}"}])
            done += 1

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
            with trio.fail_after(120):  # a hang guard
                await upstream.wait_for(lambda u: u.active_requests == 1000)
            upstream.release_waiting()
        # The client can have every answer before the upstream has booked the last ones as complete.
        with trio.fail_after(60):  # a hang guard
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
        response = await client.post("/_fake/faults", json={"faults": [{"kind": "hang"}] * 3})
        assert response.json() == {"queued": 3}
        response = await client.post("/_fake/faults", json={"faults": [], "clear": True})
        assert response.json() == {"queued": 0}
        records = (await client.get("/_fake/records")).json()["records"]
    assert [(r["status"], r["fault"]) for r in records] == [(503, "unavailable")]


async def test_repr_summarises_state(fake_upstream: FakeUpstream) -> None:
    assert repr(fake_upstream) == (
        f"<FakeUpstream {fake_upstream.url} [requests: 0, 0 active | connections: 0 open | faults queued: 0]>"
    )


async def test_hostile_answers_are_what_they_say(fake_upstream: FakeUpstream) -> None:
    """The hostile faults, read raw: each answer is exactly the misbehaviour it is named after."""
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    headers = {"Authorization": "Bearer sk-secret-0123456789"}
    root = fake_upstream.url
    fake_upstream.add_faults(
        Fault("bomb", size=10_000_000),
        Fault("nested", size=5000),
        Fault("html", status=502),
        Fault("bad_utf8"),
        Fault("echo_key"),
        Fault("bomb", size=1_000_000, encoding="br"),
    )
    async with httpx.AsyncClient() as client:
        bomb = await client.post(
            f"{root}/chat/completions", json=body, headers={"Accept-Encoding": "identity"}
        )
        assert bomb.headers["content-encoding"] == "gzip"
        assert len(bomb.content) >= 10_000_000  # httpx inflates it all: the bomb works
        assert fake_upstream.records[-1].body_bytes < 100_000
        nested = await client.post(f"{root}/chat/completions", json=body)
        assert nested.content == b"[" * 5000 + b"]" * 5000
        html = await client.post(f"{root}/chat/completions", json=body, headers=headers)
        assert html.status_code == 502
        assert html.headers["content-type"] == "text/html"
        assert "sk-secret-0123456789" in html.text
        bad = await client.post(f"{root}/chat/completions", json=body)
        with pytest.raises(UnicodeDecodeError):
            bad.content.decode()
        echo = await client.post(f"{root}/chat/completions", json=body, headers=headers)
        assert echo.status_code == 401
        assert "Bearer sk-secret-0123456789" in echo.json()["error"]["message"]
        brotli = await client.post(f"{root}/chat/completions", json=body)
        assert brotli.headers["content-encoding"] == "br"  # labelled br, whatever the bytes are


async def test_endless_answers_go_on_until_the_client_leaves(fake_upstream: FakeUpstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True}
    fake_upstream.add_faults(Fault("endless_event"), Fault("endless_stream"))
    async with httpx.AsyncClient() as client:
        for _ in range(2):
            received = b""
            async with client.stream("POST", f"{fake_upstream.url}/chat/completions", json=body) as stream:
                async for chunk in stream.aiter_raw():
                    received += chunk
                    if len(received) > 2_000_000:
                        break
            await fake_upstream.wait_for(lambda u: u.records[-1].ended)
            assert fake_upstream.records[-1].client_closed_at is not None
            events = received.split(b"\n\n")
            if fake_upstream.records[-1].fault == "endless_event":
                assert len(events) == 1  # data lines, and never a blank line
            else:
                assert len(events) > 1000
