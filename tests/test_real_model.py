"""Checks against a real model nobody here wrote (opt-in: ``pytest -m real_model``).

Needs an OpenAI-compatible model server: ``DSPY_TRIO_REAL_MODEL_URL`` is its ``/v1`` root and
``DSPY_TRIO_REAL_MODEL_NAME`` its model name (default ``smollm2``). ``make local-model`` starts one
(llama.cpp's server with SmolLM2-135M-Instruct, see scripts/local-model.sh); ``make test-real-model`` runs
these checks against it. They go through the real service (Hypercorn on an ephemeral port, real HTTP) with
the set-up a small model needs: the JSON adapter, ``response_format`` json_object and an output-token cap.

Wall-clock times appear here only as *comparisons* against the same model called directly, measured in the
same test; a real model is too slow and too variable for anything else.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import dspy
import httpx
import pytest
import trio

from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings, ProgramSpec, RetryPolicy
from dspy_trio.engine.lm import HTTPSettings
from tests.web_helpers import running, settings

pytestmark = pytest.mark.real_model

URL = os.environ.get("DSPY_TRIO_REAL_MODEL_URL", "").rstrip("/")
MODEL = os.environ.get("DSPY_TRIO_REAL_MODEL_NAME", "smollm2")
SMALL_MODEL_PARAMS = {"temperature": 0.0, "max_tokens": 128, "response_format": {"type": "json_object"}}
LONG_TOKENS = 400
LONG_PROMPT = (
    "Write a very long essay, at least 3000 words, about the history of computing, decade by decade."
)


@pytest.fixture(autouse=True)
def _needs_a_model() -> None:
    if not URL:
        pytest.skip("DSPY_TRIO_REAL_MODEL_URL is not set (start one with `make local-model`)")


def service() -> Any:
    def lm(**params: Any) -> LMConfig:
        return LMConfig(
            model=MODEL,
            retry=RetryPolicy(max_attempts=1),
            params={**SMALL_MODEL_PARAMS, **params},
            settings=OpenAISettings(
                api_base=URL, api_key="none", http=HTTPSettings(read_timeout=120), stream_upstream=True
            ),
        )

    engine = EngineConfig(
        lms={"default": lm(), "long": lm(max_tokens=LONG_TOKENS)},
        programs={
            "default": ProgramSpec("question -> answer"),
            "essay": ProgramSpec("topic -> essay", lm="long"),
        },
        adapter="json",
    )
    return settings(engine=engine, default_timeout=120, max_timeout=300)


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    event, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield event, "\n".join(data)
            event, data = "message", []


async def direct(client: httpx.AsyncClient, content: str, **params: Any) -> dict[str, Any]:
    response = await client.post(
        f"{URL}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}], **params},
        timeout=300,
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def test_predict_answers_through_the_service() -> None:
    async with running(service()) as server, httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        response = await client.post(
            "/v1/programs/default/predict", json={"inputs": {"question": "What is the capital of France?"}}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["outputs"]["answer"], str)
        assert body["outputs"]["answer"].strip()
        assert body["usage"]["completion_tokens"] > 0


async def test_stream_ends_with_the_final_answer() -> None:
    async with running(service()) as server, httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        events = []
        body = {"inputs": {"question": "Name a primary colour."}}
        async with client.stream("POST", "/v1/programs/default/stream", json=body) as response:
            assert response.status_code == 200
            events = [(name, data) async for name, data in sse_events(response)]
        names = [name for name, _ in events]
        assert names[-1] == "final", events
        final = json.loads(events[-1][1])
        assert final["outputs"]["answer"].strip()


async def test_stream_usage_is_not_zero() -> None:
    """llama.cpp sends no usage chunk on streams: the service must count or estimate the tokens."""
    async with running(service()) as server, httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        body = {"inputs": {"question": "Name a primary colour."}}
        async with client.stream("POST", "/v1/programs/default/stream", json=body) as response:
            events = [(name, data) async for name, data in sse_events(response)]
        final = json.loads(events[-1][1])
        assert final["usage"]["completion_tokens"] > 0, final


async def test_seed_stream_delivers_the_answer() -> None:
    """The seed's /stream must carry the answer's text before [DONE], even when it came without deltas."""
    async with running(service()) as server, httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        async with client.stream("POST", "/stream", json={"question": "Name a primary colour."}) as response:
            assert response.status_code == 200
            data = [data async for _, data in sse_events(response)]
        assert data[-1] == "[DONE]"
        assert "".join(data[:-1]).strip(), data


async def time_direct_probe(client: httpx.AsyncClient) -> float:
    """Seconds the model takes to answer a one-token request: long while its slot is busy."""
    started = time.monotonic()
    await direct(client, "Say hi.", max_tokens=1)
    return time.monotonic() - started


async def wait_until_idle(client: httpx.AsyncClient) -> None:
    """An earlier request may have left the model generating: wait (bounded) until it answers at once."""
    for _ in range(100):
        if await time_direct_probe(client) < 1.0:
            return
    pytest.fail("the model never became idle")


def essay_messages() -> list[dict[str, Any]]:
    """What the service sends the model for the essay program (DSPy's JSON adapter)."""
    signature = dspy.ensure_signature("topic -> essay")
    messages: list[dict[str, Any]] = dspy.JSONAdapter().format(
        signature, demos=[], inputs={"topic": LONG_PROMPT}
    )
    return messages


async def slot_wait_after_leaving(model: httpx.AsyncClient, leave: Any) -> float:
    """Seconds a one-token request waits right after ``leave()`` abandoned a long generation."""
    await wait_until_idle(model)
    await leave()
    return await time_direct_probe(model)


LEAVE_AFTER = 2.0  # seconds: the model is generating by then


async def leave_direct_stream(model: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": essay_messages(), "stream": True, **SMALL_MODEL_PARAMS}
    body["max_tokens"] = LONG_TOKENS
    with trio.move_on_after(LEAVE_AFTER):
        async with model.stream("POST", f"{URL}/chat/completions", json=body, timeout=300) as response:
            async for _ in response.aiter_lines():
                pass


async def test_a_cancelled_stream_frees_the_model_slot() -> None:
    """Leaving a stream through the service frees the model's slot as fast as leaving the same stream
    sent directly to the model does (llama.cpp stops generating when it notices the closed stream)."""
    async with httpx.AsyncClient() as model:
        direct_wait = await slot_wait_after_leaving(model, lambda: leave_direct_stream(model))
        async with (
            running(service()) as server,
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
        ):

            async def leave_our_stream() -> None:
                body = {"inputs": {"topic": LONG_PROMPT}}
                with trio.move_on_after(LEAVE_AFTER):
                    async with client.stream("POST", "/v1/programs/essay/stream", json=body) as response:
                        async for _ in sse_events(response):
                            pass

            ours_wait = await slot_wait_after_leaving(model, leave_our_stream)
    print(f"slot busy after leaving a stream: through dspy-trio {ours_wait:.2f}s, direct {direct_wait:.2f}s")
    assert ours_wait <= direct_wait * 1.5 + 1.0


async def test_a_cancelled_predict_frees_the_model_slot() -> None:
    """A predict whose client leaves must free the model's slot as a closed stream does (llama.cpp finishes
    a non-streamed request after its client left): with ``stream_upstream`` the predict is a stream
    upstream, and leaving it closes that stream."""
    async with httpx.AsyncClient() as model:
        direct_wait = await slot_wait_after_leaving(model, lambda: leave_direct_stream(model))
        async with (
            running(service()) as server,
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
        ):

            async def leave_our_predict() -> None:
                with trio.move_on_after(LEAVE_AFTER):
                    await client.post("/v1/programs/essay/predict", json={"inputs": {"topic": LONG_PROMPT}})

            ours_wait = await slot_wait_after_leaving(model, leave_our_predict)
    print(f"slot busy after leaving: our predict {ours_wait:.2f}s, a direct stream {direct_wait:.2f}s")
    assert ours_wait <= direct_wait * 1.5 + 1.0
