"""Attack on the hotpath/models merge (GuardedLM, overload hook, TypeAdapter cache, stream_upstream).

Each test here fails on main at bd1e81c and pins a defect; see /work/reports/attack3.md."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from dspy_trio.engine import EngineConfig, LMConfig, open_engine
from dspy_trio.engine.lm import OpenAICompatibleLM
from dspy_trio.engine.testing import MockBackend, MockRequest, Reply, http_response


def _scripted_upstream(content: str) -> tuple[list[dict[str, Any]], MockBackend]:
    bodies: list[dict[str, Any]] = []

    def handler(request: MockRequest) -> Reply:
        bodies.append(request.json())
        answer = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        return [http_response(200, json={"choices": [answer]})]

    return bodies, MockBackend(handler)


async def test_the_engine_json_adapter_still_asks_an_openai_server_for_json(autojump_clock: Any) -> None:
    """The bare OpenAI backend declares ``supported_params`` (with ``response_format``), so DSPy's
    JSONAdapter asks the server for JSON (tests/test_http_transport.py pins it). Through the engine,
    DSPy sees the GuardedLM wrapper, which does not forward ``supported_params`` (BaseLM's: empty
    set): the engine with ``adapter="json"`` silently stops sending ``response_format``."""
    bodies, network = _scripted_upstream('{"answer": "ok"}')
    lm = OpenAICompatibleLM("openai/m", api_base="http://upstream.test/v1", network=network)
    config = EngineConfig(lms={"default": LMConfig()}, adapter="json")
    async with open_engine(config, lms={"default": lm}) as engine:
        assert engine.lms["default"].supported_params == lm.supported_params
        result = await engine.predict("default", {"question": "q"})
    assert result.outputs["answer"] == "ok"
    assert bodies[0].get("response_format") == {"type": "json_object"}


def _overloaded_service(**changes: Any) -> Any:
    from .web_helpers import settings

    engine = EngineConfig(lms={"default": LMConfig()}, max_in_flight=1, max_queued=0)
    return settings(engine=engine, **changes)


async def _hold_the_slot(server: Any, nursery: trio.Nursery) -> trio.CancelScope:
    from .helpers import wait_until

    holder = trio.CancelScope()

    async def hold() -> None:
        with holder:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                await client.post("/predict", json={"question": "holds the slot", "timeout_secs": 5})

    nursery.start_soon(hold)
    await wait_until(lambda: server.state.engine.statistics().in_flight == 1)
    return holder


async def test_a_cors_preflight_is_not_refused_or_counted_as_an_overloaded_prediction() -> None:
    """``refuse_when_overloaded`` (web/app.py) keys on ``request.endpoint``, which is the prediction's
    endpoint for the automatic OPTIONS of that route too. A browser's CORS preflight (no body, no
    credentials, no prediction) then gets a 429, so the browser reports a CORS failure instead of the
    real 429 of its POST, and the engine counts a ``rejected`` request that never existed."""
    from .helpers import CountingLM
    from .web_helpers import running

    origin = "http://app.test"
    service = _overloaded_service(cors_origins=(origin,))
    async with (
        running(service, lms={"default": CountingLM(first_token_delay=30.0)}) as server,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        holder = await _hold_the_slot(server, nursery)
        preflight = await client.options(
            "/v1/programs/default/predict",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
        holder.cancel()
    assert preflight.status_code < 300, preflight.text
    assert preflight.headers.get("access-control-allow-origin") == origin
    assert rejected == 0


async def test_an_unknown_program_is_a_404_even_when_the_engine_is_overloaded() -> None:
    """``Engine._accept`` looks the program up before the admission check, so ``dspy_trio.engine.predict`` on
    an
    unknown program raises UnknownProgramError (404) whatever the load. The HTTP hook checks admission
    with the raw URL name first: the same request over HTTP is a 429 with Retry-After (a client retries
    a typo forever) and is counted as a rejected request."""
    from .helpers import CountingLM
    from .web_helpers import running

    async with (
        running(_overloaded_service(), lms={"default": CountingLM(first_token_delay=30.0)}) as server,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        holder = await _hold_the_slot(server, nursery)
        response = await client.post(
            "/v1/programs/no-such-program/predict", json={"inputs": {"question": "q"}}
        )
        holder.cancel()
    assert response.status_code == 404, response.text


def _sse(*events: dict[str, Any] | str) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


async def test_stream_upstream_with_two_choices_does_not_accept_a_stream_cut_mid_choice(
    autojump_clock: Any,
) -> None:
    """``OpenAICompatibleLM._stream`` (engine/lm/openai.py, ``finished = finished or finish``) treats
    the stream as complete as soon as ANY choice has a finish_reason. With ``n=2``, a stream cut after
    choice 0 finished but while choice 1 was still being written (no [DONE], no finish for choice 1)
    is returned as a successful completion whose second answer is silently truncated, instead of the
    "stream ended before completion" error (which the guard retries)."""
    from dspy_trio.engine import UpstreamConnectionError

    body = _sse(
        {"choices": [{"index": 0, "delta": {"content": "full answer"}, "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {"content": "trunc"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    )  # the connection ends here: choice 1 never finished, no usage chunk, no [DONE]

    def handler(request: MockRequest) -> Reply:
        return [http_response(200, body, headers={"Content-Type": "text/event-stream"})]

    lm = OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", network=MockBackend(handler), stream_upstream=True
    )
    outcome: Any
    try:
        outcome = await lm.complete([{"role": "user", "content": "q"}], {"n": 2}, None)
    except UpstreamConnectionError as exc:
        outcome = exc
    assert isinstance(outcome, UpstreamConnectionError), f"accepted truncated choices: {outcome.texts!r}"


async def test_stream_upstream_retries_an_overload_the_server_reports_in_the_stream(
    autojump_clock: Any,
) -> None:
    """README: with ``stream_upstream`` "retries are unchanged" and the completion is the one a plain
    call returns. A server that reports an overload after the 200 (an SSE error event with
    ``code: 503``, as llama.cpp's server and OpenRouter do for streams) is turned into a
    non-retryable UpstreamResponseError by ``OpenAICompatibleLM._chunk`` (engine/lm/openai.py), so
    the predict fails where the same overload on the plain path (HTTP 503) is retried. Nothing had
    reached the caller, so the retry is safe."""
    from dspy_trio.engine import RetryPolicy

    calls: list[int] = []
    overloaded = _sse(
        {"error": {"message": "server overloaded, try later", "type": "server_error", "code": 503}}
    )
    answer = _sse(
        {"choices": [{"index": 0, "delta": {"content": "[[ ## answer ## ]]\nok"}, "finish_reason": "stop"}]},
        "[DONE]",
    )

    def handler(request: MockRequest) -> Reply:
        calls.append(1)
        content = overloaded if len(calls) == 1 else answer
        return [http_response(200, content, headers={"Content-Type": "text/event-stream"})]

    lm = OpenAICompatibleLM(
        "openai/m", api_base="http://upstream.test/v1", network=MockBackend(handler), stream_upstream=True
    )
    config = EngineConfig(lms={"default": LMConfig(retry=RetryPolicy(base_delay=0.0))})
    async with open_engine(config, lms={"default": lm}) as engine:
        result = await engine.predict("default", {"question": "q"})
    assert result.outputs["answer"] == "ok"
    assert len(calls) == 2
