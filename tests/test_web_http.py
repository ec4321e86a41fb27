"""The HTTP API over a real Hypercorn server with a real httpx client."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from openapi_spec_validator import validate

from dspy_trio.engine import (
    EngineConfig,
    LMConfig,
    OpenAISettings,
    RateLimitWaitError,
    SimulatedSettings,
    UpstreamRateLimitedError,
    UpstreamServerError,
)
from dspy_trio.engine._retry import RetryPolicy
from dspy_trio.engine.testing import Behavior, FakeUpstream

from .helpers import CountingLM, FailingLM, first_request_closed_by_client, wait_until
from .test_web_protocol import parse_responses, request
from .web_helpers import running, settings


async def post(url: str, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.post(path, json=body, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"]
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"]
    return dict(error)


async def test_health_ready_and_the_seed_predict() -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/health")).text == "OK"
        assert (await client.get("/ready")).json() == {"status": "ready"}
        response = await client.post(
            "/predict", json={"question": "What is Trio?"}, headers={"X-Request-ID": "abc-1"}
        )
        assert response.status_code == 200
        body = response.json()
        assert body["answer"]
        assert body["duration_ms"] >= 0
        assert response.headers["x-request-id"] == "abc-1"
        assert response.headers["server-timing"].startswith("total;dur=")
        assert "lm;dur=" in response.headers["server-timing"]


async def test_programs_listing_and_program_predict() -> None:
    engine = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))}
    )
    async with running(settings(engine=engine)) as server, httpx.AsyncClient(base_url=server.url) as client:
        listing = (await client.get("/v1/programs")).json()
        assert listing == {
            "programs": [
                {
                    "name": "default",
                    "kind": "Predict",
                    "lm": "default",
                    "inputs": [{"name": "question", "type": "str", "required": True}],
                    "outputs": ["answer"],
                }
            ]
        }
        response = await client.post("/v1/programs/default/predict", json={"inputs": {"question": "q"}})
        body = response.json()
        assert body["outputs"]["answer"]
        assert body["usage"]["completion_tokens"] > 0
        assert set(body["timings"]) == {"queued_ms", "lm_ms", "total_ms"}


async def test_every_bad_request_gets_its_status_and_a_json_error() -> None:
    async with running(settings(max_body_bytes=2000, max_input_chars=100)) as server:
        url = server.url
        assert_error(
            await post(url, "/v1/programs/nope/predict", {"inputs": {"question": "q"}}),
            404,
            "unknown_program",
        )
        error = assert_error(
            await post(url, "/v1/programs/default/predict", {"inputs": {"q": "x"}}), 422, "invalid_input"
        )
        assert error["param"] == "q"
        assert_error(
            await post(url, "/v1/programs/default/predict", {"inputs": {"question": 1}}), 422, "invalid_input"
        )
        assert_error(await post(url, "/predict", {}), 422, "invalid_body")
        assert_error(await post(url, "/predict", {"question": "q", "extra": 1}), 422, "invalid_body")
        assert_error(await post(url, "/predict", {"question": 5}), 422, "invalid_body")
        assert_error(await post(url, "/predict", {"question": "q", "timeout_secs": -1}), 422, "invalid_body")
        assert_error(
            await post(url, "/predict", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            "bad_request",
        )
        assert_error(await post(url, "/predict", {"question": "x" * 5000}), 413, "body_too_large")
        assert_error(await post(url, "/predict", {"question": "x" * 500}), 413, "input_too_large")
        assert_error(
            await post(url, "/predict", {"question": "q"}, headers={"X-Request-Timeout": "soon"}),
            422,
            "invalid_timeout",
        )
        async with httpx.AsyncClient(base_url=url) as client:
            assert_error(await client.get("/predict"), 405, "method_not_allowed")
            assert_error(await client.get("/nowhere"), 404, "not_found")
            assert (await client.get("/health")).text == "OK"


async def test_a_request_past_its_timeout_is_a_504() -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with running(lms={"default": lm}) as server:
        started = trio.current_time()
        response = await post(server.url, "/predict", {"question": "q", "timeout_secs": 0.3})
        assert_error(response, 504, "deadline_exceeded")
        assert trio.current_time() - started < 5
        response = await post(server.url, "/predict", {"question": "q"}, headers={"X-Request-Timeout": "0.2"})
        assert_error(response, 504, "deadline_exceeded")
        stats = server.state.engine.statistics()  # type: ignore[union-attr]
        assert stats.timed_out == 2


async def test_overload_is_refused_at_once_with_retry_after() -> None:
    engine = EngineConfig(lms={"default": LMConfig()}, max_in_flight=1, max_queued=0)
    lm = CountingLM(first_token_delay=30.0)
    async with (
        running(settings(engine=engine), lms={"default": lm}) as server,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(post, server.url, "/predict", {"question": "holds the slot", "timeout_secs": 5})
        await wait_until(lambda: server.state.engine.statistics().in_flight == 1)  # type: ignore[union-attr]
        started = trio.current_time()
        response = await post(server.url, "/predict", {"question": "refused"})
        assert trio.current_time() - started < 1
        assert_error(response, 429, "overloaded")
        assert int(response.headers["retry-after"]) >= 1
        stream = await post(server.url, "/v1/programs/default/stream", {"inputs": {"question": "q"}})
        assert_error(stream, 429, "overloaded")
        nursery.cancel_scope.cancel()


async def test_api_keys_are_required_except_for_health_and_ready() -> None:
    async with (
        running(settings(api_keys=("k1", "k2"))) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        assert_error(await client.post("/predict", json={"question": "q"}), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(
            await client.post("/predict", json={"question": "q"}, headers=wrong), 401, "invalid_api_key"
        )
        good = {"Authorization": "Bearer k2"}
        assert (await client.post("/predict", json={"question": "q"}, headers=good)).status_code == 200


async def test_cors_headers_only_for_configured_origins() -> None:
    async with (
        running(settings(cors_origins=("https://app.example",))) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        allowed = await client.get("/health", headers={"Origin": "https://app.example"})
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


async def test_upstream_errors_map_to_gateway_statuses() -> None:
    async with running(lms={"default": FailingLM(UpstreamServerError("down", status=503))}) as server:
        assert_error(await post(server.url, "/predict", {"question": "q"}), 502, "upstream_server_error")


async def test_client_disconnect_cancels_the_upstream_call(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behavior = Behavior(latency=30)
    lm = LMConfig(model="fake", settings=OpenAISettings(api_base=fake_upstream.url))
    async with running(settings(engine=EngineConfig(lms={"default": lm}))) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, server.url, "/predict", {"question": "q"})
            # Leave once the call is upstream (a fixed delay raced the first request on a loaded machine).
            await fake_upstream.wait_for(lambda u: bool(u.records))
            nursery.cancel_scope.cancel()
        left_at = trio.current_time()
        await first_request_closed_by_client(fake_upstream, left_at)
        await wait_until(lambda: server.state.engine.statistics().abandoned == 1)  # type: ignore[union-attr]


async def test_metrics_in_prometheus_text_and_the_seed_json() -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/predict", json={"question": "q"})
        await client.post("/v1/programs/default/predict", json={"inputs": {}})
        text = await client.get("/metrics")
        assert text.headers["content-type"].startswith("text/plain")
        assert (
            'dspy_trio_requests_total{model="simulated/lm",outcome="succeeded",program="default"} 1.0'
            in text.text
        )
        assert (
            'dspy_trio_requests_total{model="simulated/lm",outcome="invalid",program="default"} 1.0'
            in text.text
        )
        seed = (await client.get("/metrics", headers={"Accept": "application/json"})).json()
    assert seed["total_requests"] == 2
    assert seed["active_requests"] == 0
    assert (seed["total_errors"], seed["total_timeouts"], seed["error_rate"]) == (0, 0, 0.0)
    assert seed["average_duration_ms"] > 0


async def test_openapi_schema_is_served() -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        schema = (await client.get("/openapi.json")).json()
    assert "/predict" in schema["paths"]
    assert "/v1/programs/{name}/predict" in schema["paths"]
    assert "requestBody" in schema["paths"]["/v1/programs/{name}/predict"]["post"]
    validate(schema)  # a valid OpenAPI 3 document


async def test_drain_lets_short_requests_finish_and_ends_long_ones_with_503() -> None:
    base = EngineConfig(lms={"default": LMConfig()})
    fast, slow = CountingLM(first_token_delay=0.3), CountingLM(first_token_delay=30.0)
    results: dict[str, httpx.Response] = {}
    engine = EngineConfig(
        lms={"default": LMConfig(), "slow": LMConfig()},
        programs={
            "default": base.programs["default"],
            "slow": attrs.evolve(base.programs["default"], lm="slow"),
        },
        drain_timeout=1.0,
    )
    async with running(settings(engine=engine), lms={"default": fast, "slow": slow}) as server:

        async def call(name: str, program: str) -> None:
            body = {"inputs": {"question": "q"}}
            results[name] = await post(server.url, f"/v1/programs/{program}/predict", body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "short", "default")
            nursery.start_soon(call, "long", "slow")
            await wait_until(lambda: server.state.engine.statistics().in_flight == 2)  # type: ignore[union-attr]
            server.shutdown()
            await trio.sleep(0.05)
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.get("/ready")).status_code == 503
                assert_error(await client.post("/predict", json={"question": "late"}), 503, "not_ready")
    assert results["short"].status_code == 200
    assert_error(results["long"], 503, "engine_closed")


WEBSOCKET_HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def local_port(response: httpx.Response) -> int:
    """The client port of the connection that carried ``response`` (the same port: the same connection)."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


async def test_while_draining_every_refusal_says_when_to_retry() -> None:
    """503 ``not_ready`` and ``/ready``'s 503 carry ``Retry-After: 1`` on every transport (HTTP routes and
    the WebSocket handshakes), and a keep-alive connection goes on serving after each."""
    engine = EngineConfig(lms={"default": LMConfig()}, drain_timeout=600.0)
    lms = {"default": CountingLM(first_token_delay=600.0)}
    async with running(settings(engine=engine), lms=lms) as server, trio.open_nursery() as nursery:
        body = {"inputs": {"question": "q"}}
        nursery.start_soon(post, server.url, "/v1/programs/default/predict", body)  # holds the drain open
        engine = server.state.engine
        assert engine is not None
        await wait_until(lambda: engine.statistics().in_flight == 1, seconds=math.inf)
        server.shutdown()
        await wait_until(lambda: server.state.draining, seconds=math.inf)
        ports = set()
        async with httpx.AsyncClient(base_url=server.url) as client:
            ready = await client.get("/ready")
            assert_error(ready, 503, "not_ready")
            assert ready.headers["retry-after"] == "1"
            ports.add(local_port(ready))
            for method, path, json_body in [
                ("POST", "/predict", {"question": "q"}),
                ("POST", "/stream", {"question": "q"}),
                ("POST", "/v1/programs/default/predict", body),
                ("POST", "/v1/programs/default/stream", body),
                ("POST", "/v1/programs/default/batch", {"items": [{"question": "q"}]}),
                ("GET", "/v1/programs", None),
            ]:
                response = await client.request(method, path, json=json_body)
                assert_error(response, 503, "not_ready")
                assert response.headers["retry-after"] == "1", path
                ports.add(local_port(response))
            assert len(ports) == 1  # one keep-alive connection served every refusal
        for path in ("/ws", "/v1/ws"):  # a WebSocket handshake is refused before the upgrade
            async with httpx.AsyncClient(base_url=server.url) as client:
                response = await client.get(path, headers=WEBSOCKET_HANDSHAKE)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "not_ready"
            assert response.headers["retry-after"] == "1", path
        nursery.cancel_scope.cancel()  # the client leaves: its request ends, and the drain with it


def test_error_bodies_are_json_serialisable() -> None:
    assert json.loads(json.dumps({"error": {"message": "m", "type": "t", "code": "c", "param": None}}))


async def test_delete_cancels_an_in_flight_request_by_its_server_id_for_its_owner_only() -> None:
    """Ids that route are the server's (unique, in ``X-Server-Request-ID``); a client's ``X-Request-ID`` is
    only a label, and another API key gets 404 for an id it did not start (ids cannot be probed)."""
    lm = CountingLM(first_token_delay=30.0)
    keys = {"A": {"Authorization": "Bearer key-a"}, "B": {"Authorization": "Bearer key-b"}}
    service = settings(api_keys=("key-a", "key-b"))
    async with (
        running(service, lms={"default": lm}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        body = {"inputs": {"question": "q"}}
        headers = {**keys["A"], "X-Request-ID": "job-7"}
        async with client.stream("POST", "/v1/programs/default/stream", json=body, headers=headers) as stream:
            assert stream.headers["x-request-id"] == "job-7"  # the label, echoed
            server_id = stream.headers["x-server-request-id"]
            assert server_id != "job-7"
            assert len(server_id) == 32
            await wait_until(lambda: server.state.engine.statistics().in_flight == 1)  # type: ignore[union-attr]
            assert_error(await client.delete("/v1/requests/job-7", headers=keys["A"]), 404, "unknown_request")
            assert_error(
                await client.delete(f"/v1/requests/{server_id}", headers=keys["B"]), 404, "unknown_request"
            )
            assert server.state.engine.statistics().in_flight == 1  # type: ignore[union-attr]
            cancelled = await client.delete(f"/v1/requests/{server_id}", headers=keys["A"])
            assert cancelled.json() == {"cancelled": server_id}
            text = (await stream.aread()).decode()
        assert "event: error" in text
        assert '"code":"cancelled"' in text
        assert_error(
            await client.delete(f"/v1/requests/{server_id}", headers=keys["A"]), 404, "unknown_request"
        )


async def test_two_requests_with_the_same_label_get_different_server_ids() -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        first, second = [
            await client.post("/predict", json={"question": "q"}, headers={"X-Request-ID": "same"})
            for _ in range(2)
        ]
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == "same"
    assert first.json()["request_id"] != second.json()["request_id"]
    assert first.json()["request_id"] == first.headers["x-server-request-id"]


async def test_requests_refused_by_the_web_layer_are_logged_like_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_trio.web.requests")
    async with (
        running(settings(api_keys=("k",), max_body_bytes=100)) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        await client.post("/predict", json={"question": "q"}, headers={"X-Request-ID": "mine"})
        key = {"Authorization": "Bearer k"}
        await client.post("/predict", json={"question": "q" * 200}, headers=key)
        await client.post("/predict", json={"nope": 1}, headers=key)
        await client.get("/nowhere", headers=key)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dspy_trio.web.requests"]
    assert [(line["status"], line["error"], line["outcome"]) for line in lines] == [
        (401, "invalid_api_key", "rejected"),
        (413, "body_too_large", "invalid"),
        (422, "invalid_body", "invalid"),
        (404, "not_found", "invalid"),
    ]
    assert lines[0]["label"] == "mine"
    assert len(lines[0]["request_id"]) == 32


async def test_overload_is_refused_before_the_body_is_parsed_and_the_connection_stays_usable() -> None:
    """A body that is not even JSON gets the 429 (not a 400): the refusal came before parsing. The
    refused request is counted once, and the kept-alive connection serves the next request."""
    engine = EngineConfig(lms={"default": LMConfig()}, max_in_flight=1, max_queued=0)
    lm = CountingLM(first_token_delay=30.0)
    async with (
        running(settings(engine=engine), lms={"default": lm}) as server,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        holder = trio.CancelScope()

        async def hold() -> None:
            with holder:
                await post(server.url, "/predict", {"question": "holds the slot", "timeout_secs": 5})

        nursery.start_soon(hold)
        await wait_until(lambda: server.state.engine.statistics().in_flight == 1)  # type: ignore[union-attr]
        for path in ("/predict", "/v1/programs/default/predict", "/v1/programs/default/stream"):
            response = await client.post(
                path, content=b"{not json", headers={"Content-Type": "application/json"}
            )
            assert_error(response, 429, "overloaded")
            assert "retry-after" in response.headers
        stats = server.state.engine.statistics()  # type: ignore[union-attr]
        assert (stats.rejected, stats.invalid, stats.errors_by_code) == (3, 0, {"overloaded": 3})
        holder.cancel()
        await wait_until(lambda: server.state.engine.statistics().in_flight == 0)  # type: ignore[union-attr]
        response = await client.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 400  # with room again, the body is parsed as before
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/predict", "/nowhere"])
async def test_a_websocket_handshake_to_a_route_without_one_gets_a_json_4xx(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(path, headers=handshake)
    assert response.status_code in (400, 404, 405), response.status_code
    assert response.json()["error"]["message"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("path", ["/ws", "/v1/ws"])
async def test_a_plain_get_of_a_websocket_route_says_it_needs_a_websocket_handshake(path: str) -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(path)
    assert response.status_code in (400, 426)
    assert "websocket" in response.json()["error"]["message"].lower()


async def test_a_body_that_never_ends_is_answered_by_the_requests_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(settings(keep_alive_timeout=1.0)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        head = request(
            "POST",
            "/predict",
            "Host: x",
            "Content-Type: application/json",
            "X-Request-Timeout: 2",
            "Content-Length: 16",
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head + b'{"ques')  # the rest never comes
            sent = trio.current_time()
            with trio.fail_after(600):  # virtual seconds: a hang guard
                received = await stream.receive_some(65536)
                answered = trio.current_time() - sent
                while data := await stream.receive_some(65536):  # the answer closes the connection
                    received += data
    [(status, _, body)] = parse_responses(received)
    assert status in (408, 504)
    assert json.loads(body)["error"]["code"]
    assert answered <= 2 + 1  # the deadline, and at most the keep-alive drain after it (was 61)


@pytest.mark.parametrize("header", [None, "soon"], ids=["no_header", "invalid_header"])
async def test_a_body_that_never_ends_waits_the_default_timeout_when_the_head_names_none(
    header: str | None, autojump_clock: trio.testing.MockClock
) -> None:
    """The head's deadline bounds the wait for the body: ``X-Request-Timeout``, else ``default_timeout``
    (an invalid header cannot stretch it); the 408 closes the connection at once, with no drain."""
    async with running(settings(default_timeout=7.0, keep_alive_timeout=1.0)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        extra = () if header is None else (f"X-Request-Timeout: {header}",)
        head = request(
            "POST", "/predict", "Host: x", "Content-Type: application/json", "Content-Length: 16", *extra
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head + b'{"ques')
            sent = trio.current_time()
            with trio.fail_after(600):  # virtual seconds: a hang guard
                received = await stream.receive_some(65536)
                answered = trio.current_time() - sent
                while data := await stream.receive_some(65536):
                    received += data
    [(status, headers, body)] = parse_responses(received)
    assert (status, json.loads(body)["error"]["code"]) == (408, "body_timeout")
    assert headers["connection"] == "close"
    assert answered == pytest.approx(7.0)


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


class FailingUpkeepLM(CountingLM):
    """Its ``maintain`` fails before it starts: the engine cannot open."""

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise RuntimeError("cannot start upkeep")


async def test_an_engine_that_cannot_open_fails_open_server_on_entry_with_its_own_error() -> None:
    """``open_engine`` fails in ``before_serving``. Hypercorn's ``wait_for_startup`` returns anyway
    (``handle_lifespan`` sets ``startup`` in its ``finally``), binds and reports started; ``open_server``
    still fails on entry, with the engine's own error, instead of entering its block with
    ``state.engine is None`` (a server answering 503 to everything) and raising Hypercorn's
    ``LifespanFailureError`` only at exit."""
    entered: list[object] = []
    raised: BaseException | None = None
    try:
        with trio.fail_after(10):
            async with running(lms={"default": FailingUpkeepLM()}) as server:
                entered.append(server.state.engine)
    except BaseException as exc:
        raised = exc
    assert (entered, type(raised)) == ([], RuntimeError), (entered, repr(raised))


async def test_metrics_stay_readable_while_the_server_drains() -> None:
    """During the drain (up to ``drain_timeout``) ``/metrics`` answers 200: the last scrapes of a
    stopping process are the ones that show its ``shut_down`` and ``cancelled`` outcomes. Readiness is
    ``/ready``'s job; ``/metrics`` answers while the engine exists."""
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


@pytest.mark.parametrize(
    "error",
    [
        RateLimitWaitError("cool-down", retry_after=math.inf),
        UpstreamRateLimitedError("429", model="m", retry_after=math.inf),
    ],
    ids=["RateLimitWaitError", "UpstreamRateLimitedError"],
)
def test_an_upstreams_infinite_retry_after_does_not_crash_the_web_error_response(error: Any) -> None:
    """The upstream's ``Retry-After: inf`` reaches the errors the web layer formats (the 429's own
    retry_after, or the RateLimitWaitError of a cool-down): engine_error_response (web/errors.py) answers
    429 with a numeric Retry-After, where ``math.ceil(inf)`` would raise OverflowError."""
    from dspy_trio.web.errors import engine_error_response

    status, _, headers = engine_error_response(error)
    assert status == 429
    assert headers["Retry-After"].isdigit()


async def test_an_infinite_retry_after_over_real_hypercorn_is_a_429_and_an_error_event() -> None:
    """The same over a real Hypercorn socket: the LM's 429 carries retry_after = inf (as parsed from
    ``Retry-After: inf``). /predict answers 429 with a numeric Retry-After, and a stream ends with an
    ``error`` event (an OverflowError while formatting would make /predict a 500 and leave the stream
    with no final or error event)."""

    lm_config = LMConfig(
        retry=RetryPolicy(max_attempts=1), settings=SimulatedSettings(first_token_delay=0.0, token_delay=0.0)
    )
    service = settings(engine=EngineConfig(lms={"default": lm_config}))
    failing = FailingLM(UpstreamRateLimitedError("429", model="m", retry_after=math.inf))
    stream_text: list[str] = []
    async with (
        running(service, lms={"default": failing}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        response = await client.post("/predict", json={"question": "q"})
        with trio.move_on_after(3):
            # The 429 started a cool-down (capped by retry.max_retry_after): a stream whose deadline
            # ends before it is refused at once with an error event instead of waiting.
            body = {"inputs": {"question": "q"}, "timeout_secs": 2}
            async with client.stream("POST", "/v1/programs/default/stream", json=body) as stream:
                async for text in stream.aiter_text():
                    stream_text.append(text)
    streamed = "".join(stream_text)
    outcome = (response.status_code, "event: error" in streamed)
    assert outcome == (429, True), f"/predict: {response.text}; stream body: {streamed!r}"
    assert response.headers["Retry-After"].isdigit()


async def test_an_error_in_the_block_of_open_server_escapes_as_itself() -> None:
    """web/server.py open_server: an exception raised inside ``async with open_server(...)`` reaches the
    caller as itself, not as an ExceptionGroup (cancelling the nursery running Hypercorn instead of
    shutting it down trips trio's "Nursery misnesting detected!" in Hypercorn's lifespan task)."""

    class Boom(Exception):
        pass

    async def serve_then_fail() -> None:
        async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/health")).status_code == 200
            raise Boom

    with pytest.raises(Boom):
        await serve_then_fail()
