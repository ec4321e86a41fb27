"""OpenAI's API over real sockets, as users call it: the official ``openai`` SDK (sync and async, streamed
and not, every error type), DSPy's own ``dspy.LM`` pointed at the service, and raw requests for what a
careless or hostile client sends."""

from __future__ import annotations

import inspect
import json
import math
import socket
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import dspy
import httpx
import openai
import pytest
import trio

from dspy_trio.engine import EngineConfig, LMConfig, ProgramSpec, SimulatedSettings, UpstreamServerError
from dspy_trio.engine.lm import Completion, DeltaSink, OpenAICompatibleLM, SimulatedLM
from dspy_trio.engine.lm._base import Message
from dspy_trio.engine.testing import Behavior, FakeUpstream, open_fake_upstream
from dspy_trio.web.server import Server

from .helpers import HANG_GUARD, first_request_closed_by_client, wait_until
from .web_helpers import FAST, running, settings


class Conversation(dspy.Signature):
    """Answer in the conversation."""

    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


PROGRAMS = {
    "qa": ProgramSpec("question -> answer"),
    "talk": ProgramSpec(Conversation),
    "card": ProgramSpec("topic, style -> title, count: int"),
}
ENGINE = EngineConfig(lms={"default": FAST}, programs=PROGRAMS)
USER = [{"role": "user", "content": "What is Trio?"}]


@asynccontextmanager
async def service(**changes: Any) -> AsyncIterator[tuple[Server, openai.AsyncOpenAI]]:
    changes.setdefault("engine", ENGINE)
    lms = changes.pop("lms", None)
    async with running(settings(api_keys=("k",), **changes), lms=lms) as server:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        try:
            yield server, client
        finally:
            await client.close()


async def test_the_async_sdk_gets_the_same_answer_streamed_or_not() -> None:
    async with service() as (_, client):
        whole = await client.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="qa",
                messages=USER,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
    assert whole.object == "chat.completion"
    assert whole.model == "qa"
    assert whole.id.startswith("chatcmpl-")
    assert abs(whole.created - trio.current_time()) >= 0  # an int the SDK parsed
    [choice] = whole.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert whole.usage is not None
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # the simulated LM answers the same prompt the same
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage


async def test_the_sync_sdk_in_a_thread() -> None:
    async with service() as (server, _):

        def use() -> tuple[str, str]:
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as client:
                whole = client.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
                stream = client.chat.completions.create(model="qa", messages=USER, stream=True)  # type: ignore[arg-type]
                text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
                assert [model.id for model in client.models.list()] == ["qa", "talk", "card"]
                assert client.models.retrieve("talk").owned_by == "dspy-trio"
                with pytest.raises(openai.NotFoundError):
                    client.models.retrieve("nope")
                return whole.choices[0].message.content or "", text

        whole, streamed = await trio.to_thread.run_sync(use)
    assert whole == streamed


async def test_several_outputs_are_one_json_object_and_a_schema_is_checked() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "count": {"type": "integer"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "card", "schema": schema}}
    topic = [{"role": "user", "content": '{"topic": "trio", "style": "terse"}'}]
    async with service() as (_, client):
        whole = await client.chat.completions.create(model="card", messages=topic)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model="card",
            messages=topic,  # type: ignore[arg-type]
            stream=True,
            response_format=response_format,  # type: ignore[arg-type]
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        unmet = {**schema, "properties": {"count": {"type": "integer", "minimum": 100}}}
        with pytest.raises(openai.InternalServerError) as caught:  # 502: the outputs break the schema
            await client.chat.completions.create(
                model="card",
                messages=topic,  # type: ignore[arg-type]
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": unmet}},
            )
    outputs = json.loads(whole.choices[0].message.content or "")
    assert outputs == {"title": outputs["title"], "count": 42}
    assert json.loads(streamed) == outputs
    assert caught.value.status_code == 502
    assert caught.value.code == "output_schema_mismatch"


async def test_a_conversation_goes_to_the_history_input() -> None:
    async with service() as (_, client):
        first = await client.chat.completions.create(model="talk", messages=USER)  # type: ignore[arg-type]
        turns = [*USER, first.choices[0].message, {"role": "user", "content": "And Quart?"}]
        second = await client.chat.completions.create(model="talk", messages=turns)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="qa", messages=turns)  # type: ignore[arg-type]
        dropped = await client.chat.completions.create(
            model="qa",
            messages=turns,  # type: ignore[arg-type]
            extra_body={"ignore_history": True},
        )
    assert second.choices[0].message.content != first.choices[0].message.content  # another prompt
    assert caught.value.code == "history_not_supported"
    assert dropped.choices[0].message.content


async def test_every_error_is_the_sdks_own_type() -> None:
    engine = EngineConfig(
        lms={
            "default": FAST,
            "slow": LMConfig(settings=SimulatedSettings(first_token_delay=600.0, token_delay=0.0)),
        },
        programs={**PROGRAMS, "slow": ProgramSpec("question -> answer", lm="slow")},
        max_in_flight=1,
        max_queued=0,
    )
    async with service(engine=engine) as (server, client):
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
        bad_key = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad_key.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
        await bad_key.close()
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="qa", messages=USER, n=2)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as missing:
            await client.chat.completions.create(
                model="card",
                messages=[{"role": "user", "content": '{"nope": 1}'}],
            )
        with pytest.raises(openai.InternalServerError) as late:  # 504: past the body's timeout
            await client.chat.completions.create(
                model="slow",
                messages=USER,  # type: ignore[arg-type]
                extra_body={"timeout": 0.2},
            )
        async with trio.open_nursery() as nursery:  # the only slot, held: the next one is refused
            nursery.start_soon(_call, client, "slow")
            engine_now = server.state.engine
            assert engine_now is not None
            await wait_until(lambda: engine_now.statistics().in_flight == 1, seconds=HANG_GUARD)
            with pytest.raises(openai.RateLimitError) as overloaded:
                await client.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
            with pytest.raises(openai.RateLimitError) as overloaded_stream:
                await client.chat.completions.create(model="qa", messages=USER, stream=True)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    assert (unknown.value.status_code, unknown.value.code, unknown.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    assert (refused.value.status_code, refused.value.code) == (401, "invalid_api_key")
    assert (bad.value.code, bad.value.param) == ("unsupported_parameter", "n")
    assert missing.value.code == "invalid_input"
    assert "'nope'" in missing.value.message
    assert (late.value.status_code, late.value.code) == (504, "deadline_exceeded")
    for error in (overloaded.value, overloaded_stream.value):
        assert error.status_code == 429
        assert error.code == "overloaded"
        assert int(error.response.headers["retry-after"]) >= 1


async def _call(client: openai.AsyncOpenAI, model: str) -> None:
    await client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]


class FailsMidStream(SimulatedLM):
    """Streams all of its answer but its end, then fails with a 503 once ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__(first_token_delay=0.0, token_delay=0.0)
        self.fail = trio.Event()

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        assert sink is not None
        for token in self.tokens(self.render(messages))[:-3]:  # not "[[ ## completed ## ]]"
            await sink.send(token)
        await self.fail.wait()
        raise UpstreamServerError("503 mid-stream", status=503)


async def test_an_error_mid_stream_is_raised_by_the_sdk() -> None:
    """The upstream fails once the client has read some of the answer (a deadline of 0.3 s, as before,
    sometimes passed on a busy machine before the first token was sent)."""
    lm = FailsMidStream()
    async with service(lms={"default": lm}) as (_, client):
        stream = await client.chat.completions.create(
            model="qa",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
        )
        received: list[str] = []

        async def read() -> None:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
                if "".join(received):
                    lm.fail.set()

        with pytest.raises(openai.APIError) as caught, trio.fail_after(HANG_GUARD):
            await read()
    assert "".join(received)  # some tokens came first
    assert caught.value.code == "upstream_server_error"


@asynccontextmanager
async def behind_upstream(
    behavior: Behavior | None = None,
) -> AsyncIterator[tuple[FakeUpstream, Server, openai.AsyncOpenAI]]:
    async with open_fake_upstream(behavior) as upstream:
        lm = OpenAICompatibleLM("openai/m", api_base=upstream.url, temperature=0.9)
        async with service(lms={"default": lm}) as (server, client):
            yield upstream, server, client


async def test_parameters_reach_every_lm_call_and_a_cut_answer_finishes_with_length() -> None:
    async with behind_upstream() as (upstream, _, client):
        whole = await client.chat.completions.create(
            model="qa",
            messages=USER,  # type: ignore[arg-type]
            temperature=0.25,
            max_completion_tokens=10,
            stop=["\n\n\n"],
            seed=11,
        )
        plain = await client.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
    sent, default = (record.body for record in upstream.records)
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["seed"]) == (0.25, 10, ["\n\n\n"], 11)
    assert (default["temperature"], default["max_tokens"], default.get("seed")) == (0.9, 1024, None)
    assert whole.choices[0].finish_reason == "length"
    assert plain.choices[0].finish_reason == "stop"


async def test_a_client_that_leaves_a_stream_cancels_the_program_and_closes_the_upstream() -> None:
    async with behind_upstream(Behavior(token_delay=0.5)) as (upstream, server, client):
        stream = await client.chat.completions.create(model="qa", messages=USER, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        left = trio.current_time()
        await stream.close()
        await first_request_closed_by_client(upstream, left)
        engine = server.state.engine
        assert engine is not None
        await wait_until(lambda: engine.statistics().abandoned == 1, seconds=HANG_GUARD)


async def test_a_completion_is_cancelled_by_its_id() -> None:
    async with behind_upstream(Behavior(latency=600.0)) as (upstream, server, client):
        answers: list[Any] = []

        async def ask() -> None:
            try:
                await client.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
            except openai.APIStatusError as error:
                answers.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await upstream.wait_for(lambda u: len(u.records) == 1)
            [request] = server.state.engine._ledger._active.values()  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": "Bearer k"}) as raw:
                cancelled = await raw.delete(f"/v1/requests/{request.request_id}")
        assert cancelled.status_code == 200
    [error] = answers
    assert (error.status_code, error.code) == (499, "cancelled")


def _close_litellm_clients() -> None:
    """Close the HTTP clients litellm keeps for the process (DSPy's JSON mode calls through litellm,
    whose OpenAI client and its kept-alive socket ``LM.close()`` does not reach: left open, the socket
    is only reclaimed, with a ResourceWarning, when the interpreter exits)."""
    import litellm

    cache = litellm.in_memory_llm_clients_cache
    for client in list(cache.cache_dict.values()):
        close = getattr(client, "close", None)
        if callable(close) and not inspect.iscoroutinefunction(close):
            close()
    cache.flush_cache()


def test_dspy_lm_pointed_at_the_service() -> None:
    """DSPy's own client: the LM alone, and a DSPy program whose LM is a served program (same output
    field, JSON mode, the earlier system message dropped)."""

    async def main() -> tuple[list[Any], Any]:
        async with service() as (server, _):

            def use() -> tuple[list[Any], Any]:
                options = {"api_base": f"{server.url}/v1", "api_key": "k", "cache": False, "num_retries": 0}
                plain = dspy.LM("openai/qa", **options)
                lm = dspy.LM(
                    "openai/qa",
                    **options,
                    response_format={"type": "json_object"},
                    extra_body={"ignore_history": True},
                )
                try:
                    texts = plain("What is Trio?")
                    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
                        return texts, dspy.Predict("question -> answer")(question="What is Trio?")
                finally:
                    plain.close()
                    lm.close()
                    _close_litellm_clients()

            return await trio.to_thread.run_sync(use)

    texts, prediction = trio.run(main)
    assert isinstance(texts[0], str)
    assert texts[0]
    assert prediction.answer


# --- what a careless or hostile client sends ------------------------------------------------------------

KEY = {"Authorization": "Bearer k", "Content-Type": "application/json"}


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "qa", "messages": USER, **fields}).encode()


HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("huge message", _body(messages=[{"role": "user", "content": "x" * 200_000}]), 413, "input_too_large"),
    ("too big a body", _body(messages=[{"role": "user", "content": "x" * 2_000_000}]), 413, "body_too_large"),
    (
        "nested content",
        b'{"model": "qa", "messages": ' + b"[" * 100 + b"]" * 100 + b"}",
        400,
        "too_deeply_nested",
    ),
    (
        "nested in a text",
        _body(model="card", messages=[{"role": "user", "content": "[" * 5000}]),
        400,
        "invalid_value",
    ),
    ("number part", _body(messages=[{"role": "user", "content": [1, 2]}]), 400, "invalid_value"),
    ("dict content", _body(messages=[{"role": "user", "content": {"a": 1}}]), 400, "invalid_value"),
    (
        "image",
        _body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "invalid_value",
    ),
    ("unknown role", _body(messages=[{"role": "root", "content": "hi"}]), 400, "invalid_value"),
    (
        "10,000 messages",
        _body(messages=[{"role": "user", "content": "hi"}] * 10_000),
        400,
        "history_not_supported",
    ),
    (
        "part of a list type",
        _body(messages=[{"role": "user", "content": [{"type": ["text"]}]}]),
        400,
        "invalid_value",
    ),
    (
        "part of an object type",
        _body(messages=[{"role": "user", "content": [{"type": {}}]}]),
        400,
        "invalid_value",
    ),
    (
        "a reference to nothing",
        _body(
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#/x"}}}
        ),
        400,
        "invalid_value",
    ),
    ("temperature as a string", _body(temperature="0.5"), 400, "invalid_body"),
    ("max_tokens past 32 bits", _body(max_tokens=2**63), 400, "invalid_body"),
    ("not an object", b"[]", 400, "invalid_body"),
    ("no messages", b'{"model": "qa"}', 400, "invalid_body"),
    ("messages not objects", _body(messages=["hi"]), 400, "invalid_body"),
    ("lone surrogate", _body(messages=[{"role": "user", "content": "\ud800"}]), 422, ""),
    ("bad timeout", _body(timeout="soon"), 400, "invalid_body"),
    ("not json", b"{nope", 400, "bad_request"),
    ("unknown model", _body(model="nope"), 404, "model_not_found"),
]


async def test_hostile_bodies_get_a_named_4xx_and_the_connection_serves_on() -> None:
    async with service() as (server, _), httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD) as raw:
        for name, body, status, code in HOSTILE:
            started = trio.current_time()
            response = await raw.post("/v1/chat/completions", content=body, headers=KEY)
            if (
                status == 422
            ):  # a lone surrogate: JSON allows it, json.dumps writes it, the inputs check refuses
                status, code = 400, "invalid_unicode"
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
                name,
                response.text[:300],
            )
            assert response.json()["error"]["message"], name
            assert trio.current_time() - started < 10, name  # never a long parse
            after = await raw.get("/health")
            if response.headers.get("connection") != "close":
                port = after.extensions["network_stream"].get_extra_info("client_addr")[1]
                assert port == response.extensions["network_stream"].get_extra_info("client_addr")[1], name
        many = _body(model="talk", messages=[{"role": "user", "content": "hi"}] * 10_000)
        too_long = await raw.post("/v1/chat/completions", content=many, headers=KEY)
        some = _body(model="talk", messages=[{"role": "user", "content": "hi"}] * 1_000)
        answered = await raw.post("/v1/chat/completions", content=some, headers=KEY)
        dropped = await raw.post(
            "/v1/chat/completions",
            content=_body(messages=[{"role": "user", "content": "hi"}] * 10_000, ignore_history=True),
            headers=KEY,
        )
    # 9,999 earlier turns for the history: their field names count towards the inputs' text, as in a prompt
    assert (too_long.status_code, too_long.json()["error"]["code"]) == (413, "input_too_large")
    assert answered.status_code == 200, answered.text[:300]  # 999 earlier turns
    assert dropped.status_code == 200


async def test_a_schema_never_makes_the_server_fetch_a_url() -> None:
    """jsonschema's default retrieval fetched a ``$ref``'s URL when the outputs were checked, with urllib
    in the event loop's thread (a request forgery from the server's network that froze every request of
    the process while it waited, then a 500): the reference is refused before the program runs. The
    listener is a plain socket in a thread, so a fetch is seen even while the loop is blocked."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    fetched: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            fetched.append(connection.recv(1000))
            connection.close()

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    schema = {"type": "object", "properties": {"answer": {"$ref": f"http://127.0.0.1:{port}/s.json"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    try:
        async with service() as (server, _), httpx.AsyncClient(base_url=server.url) as raw:
            answer = await raw.post(
                "/v1/chat/completions", content=_body(response_format=response_format), headers=KEY
            )
            engine = server.state.engine
            assert engine is not None
            stats = engine.statistics()
    finally:
        stop.set()
        await trio.to_thread.run_sync(watcher.join)
        listener.close()
    assert fetched == []
    assert (answer.status_code, answer.json()["error"]["param"]) == (400, "response_format.json_schema")
    assert "does not resolve within the schema" in answer.json()["error"]["message"]
    assert stats.succeeded + stats.failed == 0  # refused before the program ran


async def test_a_body_that_never_arrives_is_a_408() -> None:
    async with service() as (server, _):
        stream = await trio.open_tcp_stream("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\nX-Request-Timeout: 0.3\r\n\r\n"
        )
        await stream.send_all(head.encode() + b'{"model": "qa"')
        with trio.fail_after(HANG_GUARD):
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(65536)
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408")
    assert math.isfinite(len(answer))


async def test_metrics_count_the_answers_by_route() -> None:
    async with service() as (server, client):
        await client.chat.completions.create(model="qa", messages=USER)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=server.url) as raw:
            await raw.post("/v1/chat/completions", json={})  # no key: the door's 401
            text = (await raw.get("/metrics", headers={"Authorization": "Bearer k"})).text
    assert 'dspy_trio_http_responses_total{route="chat_completions",status="200"} 1.0' in text
    assert 'dspy_trio_http_responses_total{route="chat_completions",status="404"} 1.0' in text
    assert 'dspy_trio_http_responses_total{route="chat_completions",status="401"} 1.0' in text
    assert 'dspy_trio_requests_total{model="simulated/lm",outcome="succeeded",program="qa"} 1.0' in text
