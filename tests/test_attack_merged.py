"""Attacks on the merge of edge, sc, redis and h11 (main at 3ff2a49): each test is one finding, and fails
on main. Real Hypercorn on 127.0.0.1 ephemeral ports, httpx and trio-websocket clients, the fake
upstream, a real redis-server for the cluster cases."""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio
import trio.testing

from dspy_trio.engine import EngineConfig, UpstreamError, UpstreamResponseError, open_engine
from dspy_trio.engine._cluster_config import ClusterConfig
from dspy_trio.engine.lm._transport import LeanClient, Timeouts

from .helpers import CountingLM, wait_until
from .redis_server import RedisServer, eventually, own_redis_server, prefix
from .transport_helpers import RawServer, open_raw_server, read_request, wait_closed
from .web_helpers import FAST, running, settings

__all__ = ["own_redis_server"]  # fixture


class CrashingUpkeepLM(CountingLM):
    """Its ``maintain`` (the engine's upkeep task) crashes when ``crash`` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crash = trio.Event()

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.crash.wait()
        raise RuntimeError("upkeep crashed")


async def test_an_engine_that_crashes_while_serving_stops_the_server() -> None:
    """The engine's upkeep task crashes after start-up: open_engine closes the LMs and the engine task
    ends with the error. The service must not go on as a zombie (``/health`` 200 and every request 503,
    forever): ``serve`` should end with the error so that a supervisor restarts the process."""
    lm = CrashingUpkeepLM(first_token_delay=0.0)
    ended = trio.Event()
    errors: list[BaseException] = []

    async def serve_it(task_status: trio.TaskStatus[Any]) -> None:
        try:
            async with running(lms={"default": lm}) as server:
                task_status.started(server)
                await trio.sleep_forever()
        except Exception as exc:  # the server's own end: recorded, checked below
            errors.append(exc)
        finally:
            ended.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_it)
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.post("/predict", json={"question": "q"})).status_code == 200
                lm.crash.set()
                with trio.move_on_after(3):  # real time: the server is expected to stop by itself
                    await ended.wait()
                if not ended.is_set():
                    health = (await client.get("/health")).status_code
                    answer = await client.post("/predict", json={"question": "q"})
                    nursery.cancel_scope.cancel()
                    raise AssertionError(
                        f"server still up after its engine crashed: /health {health}, "
                        f"/predict {answer.status_code} {answer.text[:120]}"
                    )
    assert [type(error) for error in errors] == [RuntimeError]
    assert "upkeep crashed" in str(errors[0])


async def test_a_batch_is_cancelled_by_the_id_the_server_gave_it() -> None:
    """``DELETE /v1/requests/{id}`` with a batch's ``X-Server-Request-ID`` (the only id the client is
    given for it) must cancel the batch; it answers 404 while the batch runs on, because the ledger knows
    only the items' ids (``{id}-{index}``)."""
    lm = CountingLM(first_token_delay=30)
    async with (
        running(lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        body = {"items": [{"question": "a"}, {"question": "b"}]}
        headers = {"Accept": "text/event-stream"}
        with trio.fail_after(10):
            async with client.stream(
                "POST", "/v1/programs/default/batch", json=body, headers=headers
            ) as stream:
                assert stream.status_code == 200
                server_id = stream.headers["x-server-request-id"]
                await wait_until(lambda: lm.started == 2)
                cancelled = await client.delete(f"/v1/requests/{server_id}")
                assert cancelled.status_code == 200, cancelled.text
                text = (await stream.aread()).decode()
        assert text.count('"code":"cancelled"') == 2, text


async def test_the_owner_can_cancel_its_request_while_the_server_drains() -> None:
    """During the drain (SIGTERM) an in-flight request runs for up to ``drain_timeout``; its owner asks to
    cancel it. ``DELETE`` answers 503 ``not_ready`` (``require_engine`` refuses everything while
    draining), so the request keeps its slot and the shutdown waits for it; it should be cancelled (200,
    outcome ``cancelled``)."""
    lm = CountingLM(first_token_delay=30)
    engine = attrs.evolve(settings().engine, drain_timeout=20.0)
    async with (
        running(settings(engine=engine), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/stream", json={"question": "q"}) as stream,
    ):
        server_id = stream.headers["x-server-request-id"]
        await wait_until(lambda: lm.started == 1)
        server.shutdown()
        await wait_until(lambda: server.state.draining)
        with trio.fail_after(5):
            cancelled = await client.delete(f"/v1/requests/{server_id}")
            assert cancelled.status_code == 200, cancelled.text
            text = (await stream.aread()).decode()
        assert '"code":"cancelled"' in text, text


async def test_the_lean_transport_bounds_an_sse_line_as_it_bounds_a_body() -> None:
    """A broken upstream streams one SSE line that never ends. ``post_json`` refuses a body over its
    cap; ``post_sse`` used to buffer the line without any bound (keeping the whole unterminated line and
    re-splitting all of it on every read, so memory grew without limit and the CPU cost was quadratic).
    With the event cap at 1 MB, a 3 MB line must be refused as a bad answer."""
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    async def endless_line(stream: trio.abc.Stream, server: RawServer) -> None:
        if not await read_request(stream, h11.Connection(h11.SERVER), server):
            return
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"5\r\ndata:\r\n")
        for _ in range(48):  # 3 MB, no newline
            await stream.send_all(chunk)
        await stream.send_all(b"0\r\n\r\n")
        await wait_closed(stream)

    received: list[int] = []

    async def on_event(event: str, data: str) -> None:
        received.append(len(data))

    async with open_raw_server(endless_line) as server:
        client = LeanClient(server.url, max_event_bytes=1 << 20)
        try:
            with trio.fail_after(30), pytest.raises(UpstreamResponseError):
                await client.post_sse("m", "chat/completions", {"stream": True}, on_event)
        finally:
            await client.aclose()
    assert received == []


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


class FailingUpkeepLM(CountingLM):
    """Its ``maintain`` fails before it starts: the engine cannot open."""

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise RuntimeError("cannot start upkeep")


async def test_an_engine_that_cannot_open_fails_open_server_on_entry_with_its_own_error() -> None:
    """``open_engine`` fails in ``before_serving``. Hypercorn's ``wait_for_startup`` returns anyway
    (``handle_lifespan`` sets ``startup`` in its ``finally``), binds and reports started, so
    ``open_server`` enters its block with ``state.engine is None`` (a server that answers 503 to
    everything), and the error arrives only at exit, as Hypercorn's ``LifespanFailureError`` holding the
    message as a string. Expected: entering fails, with the engine's own error."""
    entered: list[object] = []
    raised: BaseException | None = None
    try:
        with trio.fail_after(10):
            async with running(lms={"default": FailingUpkeepLM()}) as server:
                entered.append(server.state.engine)
    except BaseException as exc:
        raised = exc
    assert (entered, type(raised)) == ([], RuntimeError), (entered, repr(raised))


class ClosingLM(CountingLM):
    """Records its close; ``fail`` makes ``aclose`` raise, ``hang`` makes it block."""

    def __init__(self, *, fail: bool = False, hang: bool = False) -> None:
        super().__init__()
        self.fail, self.hang, self.closed = fail, hang, False

    async def aclose(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        if self.fail:
            raise RuntimeError("close failed")
        self.closed = True


@pytest.mark.parametrize("first", ["fail", "hang"])
async def test_one_lm_that_fails_to_close_does_not_leave_the_others_open(
    first: str, autojump_clock: trio.testing.MockClock
) -> None:
    """``close_lms`` (engine/_engine.py:397) closes the LMs one after another in one shielded 1 s scope:
    an LM whose ``aclose`` raises stops the loop, and one that hangs uses the whole budget, so the LMs
    after it keep their connections open. Every LM must be closed (each bounded on its own)."""
    broken = ClosingLM(fail=first == "fail", hang=first == "hang")
    healthy = ClosingLM()
    with contextlib.suppress(RuntimeError):
        async with open_engine(EngineConfig(), lms={"broken": broken, "default": healthy}):
            pass
    assert healthy.closed


async def test_metrics_stay_readable_while_the_server_drains() -> None:
    """During the drain (up to ``drain_timeout``, 10 s by default) ``/metrics`` answers 503 ``not_ready``
    (``routes_ops.metrics`` calls ``require_engine``), so the last scrapes of a stopping process — the
    ones that would show its ``shut_down`` and ``cancelled`` outcomes — are lost. Readiness is ``/ready``'s
    job; ``/metrics`` should answer while the engine exists."""
    lm = CountingLM(first_token_delay=30)
    engine = attrs.evolve(settings().engine, drain_timeout=20.0)
    async with (
        running(settings(engine=engine), lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/stream", json={"question": "q"}),
    ):
        await wait_until(lambda: lm.started == 1)
        server.shutdown()
        await wait_until(lambda: server.state.draining)
        scraped = await client.get("/metrics")
        assert scraped.status_code == 200, scraped.text


async def test_a_response_head_that_never_ends_times_out(autojump_clock: trio.testing.MockClock) -> None:
    """The upstream sends its status line, then one header byte every 4 s, never the blank line. The
    read timeout (5 s) bounds only the silence between reads, and h11 refuses a head only past 16 KiB,
    so the call waits about 16384 x 4 s = 18 hours of a never-finished head (with no request deadline,
    ``timeouts.attempt`` being off by default, forever). A head that has not ended within the read
    timeout should fail the call."""

    async def trickling_head(stream: trio.abc.Stream, server: RawServer) -> None:
        if not await read_request(stream, h11.Connection(h11.SERVER), server):
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nx-slow: ")
        while True:
            await trio.sleep(4)
            await stream.send_all(b"a")

    async with open_raw_server(trickling_head) as server:
        client = LeanClient(server.url, timeouts=Timeouts(read=5.0))
        try:
            with trio.move_on_after(60) as waited, pytest.raises(UpstreamError):
                await client.post_json("m", "chat/completions", {})
            assert not waited.cancelled_caught, "still reading the head after 60 s (read timeout 5 s)"
        finally:
            await client.aclose()
