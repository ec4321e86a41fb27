"""Attacks on the front door's overload refusal (web/door.py) under the keep-alive guard
(web/keepalive.py), and on the numbered calls of a predictor's stream (engine/_streaming.py
``_PredictorSink.new_call``).

The gate tests send one overloaded request to the served app with the gate (the front door, web/door.py,
answering its refusals itself) and to the same app without it (the door handing every refusal to the
app), over real Hypercorn sockets, and compare what comes back: the gate claims to answer exactly what
the app would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dspy
import h11
import pytest
import trio
import trio.testing

from dspy_trio import web
from dspy_trio.engine import (
    EngineConfig,
    FieldDelta,
    FinalEvent,
    LMConfig,
    ProgramSpec,
    SimulatedSettings,
    StreamOptions,
    open_engine,
)
from dspy_trio.engine.lm import SimulatedLM
from dspy_trio.engine.lm._base import Completion
from dspy_trio.web.server import Server

from .helpers import CountingLM
from .test_web_gate import _hold_the_slot, _overloaded
from .test_web_keepalive import _port, _read_response
from .web_helpers import running

# Headers that differ between any two answers (fresh ids, clocks).
VARYING = {"date", "server-timing", "x-server-request-id", "x-request-id"}
BODY = b'{"question":"q"}'


@asynccontextmanager
async def _overloaded_server(
    gated: bool, *, holder_headers: dict[str, str] | None = None, **changes: Any
) -> AsyncIterator[Server]:
    """A served app whose engine's only slot is held, so every prediction is refused with 429; with
    ``gated`` False the app runs without the overload gate (only the keep-alive guard), as before it."""
    lm = CountingLM(first_token_delay=300.0)
    with pytest.MonkeyPatch.context() as patch:
        if not gated:
            patch.setattr(web.door.FrontDoor, "answers_refusals", False)
        async with (
            running(_overloaded(**changes), lms={"default": lm}) as server,
            trio.open_nursery() as nursery,
        ):
            holder = await _hold_the_slot(server, nursery, **(holder_headers or {}))
            try:
                yield server
            finally:
                holder.cancel()


def _request_head(path: str, *fields: tuple[str, str]) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "x"), ("Content-Type", "application/json"), *fields]
    return conn, conn.send(h11.Request(method="POST", target=path, headers=headers)) or b""


async def _response(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, dict[str, str], bytes]:
    """One response, its varying headers left out."""
    status, headers, body = await _read_response(stream, conn)
    return status, {k: v for k, v in headers.items() if k not in VARYING}, body


async def _exchange(server: Server, path: str, *fields: tuple[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST ``BODY`` with the head and the body in separate segments; the response, varying headers out."""
    conn, head = _request_head(path, ("Content-Length", str(len(BODY))), *fields)
    stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
    async with stream:
        await stream.send_all(head)
        await trio.sleep(0.05)
        await stream.send_all(
            (conn.send(h11.Data(data=BODY)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        )
        with trio.fail_after(10):
            return await _response(stream, conn)


async def test_with_cors_configured_the_gates_429_to_a_request_without_origin_lacks_vary_origin() -> None:
    """With ``cors_origins`` set, the app (quart-cors) answers every response, a 429 without an
    ``Origin`` included, with ``Vary: Origin`` (the answer depends on the Origin, so a shared cache must
    key on it). The gate only hands requests *with* an Origin to the app and answers the others itself
    without ``Vary: Origin``: not the app's answer."""
    cors: dict[str, Any] = {"cors_origins": ("https://app.example",)}
    async with _overloaded_server(True, **cors) as server:
        gated = await _exchange(server, "/predict")
    async with _overloaded_server(False, **cors) as server:
        bare = await _exchange(server, "/predict")
    assert bare[0] == gated[0] == 429
    assert bare[1].get("vary") == "Origin"
    assert gated == bare


async def _closed_by_server_after_body(stream: trio.SocketStream, conn: h11.Connection) -> bool:
    """Read the rest of the response, then whether the server closes the connection."""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


async def _time_to_answer_without_body(
    gated: bool, length: int = len(BODY)
) -> tuple[float, int, dict[str, str]]:
    """A client sends the head of an overloaded POST (``Content-Length: length``) and never the body:
    the virtual seconds until the answer starts."""
    async with _overloaded_server(gated, keep_alive_timeout=2.0, max_body_bytes=1024) as server:
        conn, head = _request_head("/predict", ("Content-Length", str(length)))
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            sent = trio.current_time()
            await stream.send_all(head)
            with trio.fail_after(60):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    assert isinstance(event, h11.Response)
                    answered = trio.current_time() - sent
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    assert await _closed_by_server_after_body(stream, conn)
                    return answered, event.status_code, headers


async def test_a_body_that_never_comes_holds_the_gates_429_for_twice_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Slowloris on an overloaded route: without the gate the 429 (``Connection: close``) goes out
    after ``keep_alive_timeout`` (the keep-alive guard's bounded wait for the body). With the gate it
    goes out after twice that: the gate waits ``keep_alive_timeout`` for the body itself, then sends its
    answer through the guard, which sees the body still missing and waits ``drain_timeout`` (also
    ``keep_alive_timeout``) again. A refused request holds its connection twice as long as the app's."""
    bare = await _time_to_answer_without_body(gated=False)
    gated = await _time_to_answer_without_body(gated=True)
    assert bare[0] == 2.0
    assert bare[1] == gated[1] == 429
    assert gated[2]["connection"] == bare[2]["connection"] == "close"
    assert gated[0] == pytest.approx(bare[0])  # was 4.0: twice the keep-alive timeout


async def test_a_declared_too_large_body_that_never_comes_delays_the_gates_429(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An overloaded POST declaring a body over ``max_body_bytes`` (here 1 MiB + 1 > 1,024) that does
    not come: the keep-alive guard knows from the head that the body is not worth waiting for, so the
    app's 429 (with ``Connection: close``) goes out at once. The gate ignores the declared length and
    waits up to ``keep_alive_timeout`` for more than ``max_body_bytes`` to arrive before it answers."""
    bare = await _time_to_answer_without_body(gated=False, length=1 << 20)
    gated = await _time_to_answer_without_body(gated=True, length=1 << 20)
    assert bare[1] == gated[1] == 429
    assert gated[2]["connection"] == bare[2]["connection"] == "close"
    assert bare[0] == 0.0
    assert gated[0] == bare[0]  # 2.0 today


class _AskTwiceAtOnce(dspy.Module):  # type: ignore[misc]
    """A module calling its one predictor twice concurrently (e.g. two drafts, keep the better)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        answers: dict[str, str] = {}

        async def ask(key: str, text: str) -> None:
            answers[key] = (await self.step.acall(question=text)).answer

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "first", f"{question} alpha")
            nursery.start_soon(ask, "second", f"{question} beta gamma")
        return dspy.Prediction(first=answers["first"], second=answers["second"])


ask_twice_at_once = _AskTwiceAtOnce()


async def test_two_overlapping_calls_of_one_predictor_each_stream_their_own_numbered_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """FieldDelta.call: "a predictor called twice streams numbered calls, each scanned afresh". When the
    two calls overlap (a module that runs them in a nursery), ``new_call`` runs for both before any
    text arrives, so both calls' text goes into the one (second) scanner, interleaved token by token: it
    never sees a whole ``[[ ## answer ## ]]`` header and the stream carries no delta at all, though both
    calls streamed their full answers."""
    config = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0.01, token_delay=0.01))},
        programs={"at_once": ProgramSpec(f"{__name__}:ask_twice_at_once")},
    )
    async with open_engine(config) as engine, engine.stream("at_once", {"question": "q"}) as events:
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    answers = [e for e in received if isinstance(e, FieldDelta) and e.field == "answer"]
    by_call: dict[int, str] = {}
    for delta in answers:
        by_call[delta.call] = by_call.get(delta.call, "") + delta.text
    outputs = final.result.outputs
    assert sorted(text.strip() for text in by_call.values()) == sorted([outputs["first"], outputs["second"]])


_finished_at: list[float] = []


class _AskAndNote(dspy.Module):  # type: ignore[misc]
    """One predictor call; notes the (virtual) time the program's LM text has all been produced."""

    def __init__(self) -> None:
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        prediction = await self.step.acall(question=question)
        _finished_at.append(trio.current_time())
        return prediction


ask_and_note = _AskAndNote()


async def test_under_drop_a_consumer_that_has_not_read_the_status_event_blocks_the_producer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Backpressure ``drop``: "the producer never waits; the oldest text delta in the buffer is dropped
    to make room". With ``buffer_size=1`` the stream's first event, the ``running`` StatusEvent (never
    dropped), fills the buffer; the first delta then finds no delta to drop and parks on ``_not_full``
    (``consumer_timeout`` does not apply to ``drop``), so the program, and its upstream read, wait for
    the consumer: exactly the ``block`` policy. A consumer that reads 100 s later should find the
    program finished long before, with the deltas it could not hold counted as dropped."""
    _finished_at.clear()
    config = EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0.01, token_delay=0.01))},
        programs={"noted": ProgramSpec(f"{__name__}:ask_and_note")},
    )
    options = StreamOptions(backpressure="drop", buffer_size=1)
    async with (
        open_engine(config) as engine,
        engine.stream("noted", {"question": "q"}, options=options) as events,
    ):
        started = trio.current_time()
        await trio.sleep(100)  # a consumer that is genuinely slow
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent)
    assert _finished_at
    assert _finished_at[0] - started < 10  # 100.x today: the producer waited
    assert final.dropped > 0


class _ChatThenJSON(SimulatedLM):
    """Answers its first call without ChatAdapter's markers (unparsable), its second, the JSONAdapter
    fallback DSPy's ChatAdapter makes, with a JSON object; streams both, a few characters at a time."""

    def __init__(self) -> None:
        super().__init__(first_token_delay=0.0, token_delay=0.0)
        self.calls = 0

    async def complete(self, messages: Any, params: Any, sink: Any) -> Completion:
        self.calls += 1
        text = "I forgot the markers." if self.calls == 1 else '{"answer": "from the json call"}'
        if sink is not None:
            for start in range(0, len(text), 4):
                await sink.send(text[start : start + 4])
        return Completion([text])


async def test_a_chat_programs_json_fallback_call_streams_the_answer_it_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A ``chat`` program whose LM reply lacks the ``[[ ## answer ## ]]`` markers: DSPy's ChatAdapter
    falls back to JSONAdapter and calls the same predictor again (``call=1``). The final answer comes
    from that call ("the outputs are rebuilt from the deltas of the predictor's last call"), but the
    router scans every call of the program with the ChatFieldScanner chosen once for the program's
    adapter, so the JSON reply yields no delta at all: the stream never shows the answer it ends with."""
    lm = _ChatThenJSON()
    async with (
        open_engine(EngineConfig(lms={"default": LMConfig()}), lms={"default": lm}) as engine,
        engine.stream("default", {"question": "q"}) as events,
    ):
        received = [event async for event in events]
    final = received[-1]
    assert isinstance(final, FinalEvent), final
    assert lm.calls == 2
    assert final.result.outputs["answer"] == "from the json call"
    answers = [e for e in received if isinstance(e, FieldDelta) and e.field == "answer"]
    last = max((e.call for e in answers), default=None)
    assert last == 1
    assert "".join(e.text for e in answers if e.call == last) == "from the json call"


def _sse_data(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize("target", ["/v1/programs/default/predict%0A", "/v1/programs/default/stream%0A"])
async def test_a_path_ending_in_an_encoded_newline_gets_the_apps_404_not_the_gates_429(target: str) -> None:
    """The gate matches program routes with ``re.match(r"^/v1/programs/([^/]+)/(?:predict|stream)$")``
    on the decoded path: ``$`` also matches before a trailing newline, so ``.../predict%0A`` (decoded
    ``.../predict\\n``) is taken for a prediction of ``default`` and refused with 429 (and counted as a
    rejected request of the program), while the app has no such route and answers 404."""
    async with _overloaded_server(True) as server:
        gated = await _exchange(server, target)
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
    async with _overloaded_server(False) as server:
        bare = await _exchange(server, target)
    assert bare[0] == 404
    assert gated == bare
    assert rejected == 0


async def test_with_two_authorization_headers_the_gate_reads_the_last_the_app_the_first() -> None:
    """API keys configured; a request with two ``Authorization`` headers, an invalid key first and the
    valid one second. The app reads the first (werkzeug's ``Headers.get``) and answers 401. The gate's
    ``_ScopeHeaders`` keeps the last value of a repeated header (a dict built in order), finds the
    request authorized, and answers 429 (counting a refusal) where the app answers 401."""
    keys: dict[str, Any] = {"api_keys": ("k",)}
    holder = {"Authorization": "Bearer k"}
    fields = (("Authorization", "Bearer wrong"), ("Authorization", "Bearer k"))
    async with _overloaded_server(True, holder_headers=holder, **keys) as server:
        gated = await _exchange(server, "/predict", *fields)
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
    async with _overloaded_server(False, holder_headers=holder, **keys) as server:
        bare = await _exchange(server, "/predict", *fields)
    assert bare[0] == 401
    assert gated == bare
    assert rejected == 0
