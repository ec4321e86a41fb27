"""The lean transport (the default one) over the in-memory network of engine/lm/_transport/_memory.py:
keep-alive reuse, peers that close, a cancel at any byte of the answer, the caps on answers, exact
timeouts on the virtual clock, and the HTTP backends on it, with no socket at all."""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_trio.engine import (
    UpstreamConnectionError,
    UpstreamResponseError,
    UpstreamTimeoutError,
)
from dspy_trio.engine.lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM
from dspy_trio.engine.lm._transport import (
    EOF,
    LeanClient,
    MockBackend,
    MockRequest,
    Origin,
    RemoteProtocolError,
    Timeouts,
    http_response,
)

from .scripted_upstream import Scripted, openai_lm

URL = "http://upstream.test/v1/"
BODY = {"model": "m", "messages": [{"role": "user", "content": "What is Trio?"}]}
OK = http_response(200, json={"ok": True})


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in this file may reach for the network."""

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(trio, "open_tcp_stream", refuse)


def ok(request: MockRequest) -> list[bytes]:
    return [OK]


def pool(client: LeanClient) -> tuple[int, int]:
    """(active, idle) connections of the client's pool."""
    stats = client.pool.statistics()
    return stats.active, stats.idle


def sse_answer(*events: bytes) -> bytes:
    body = b"".join(events)
    return http_response(200, body, headers=[("content-type", "text/event-stream")])


async def test_keep_alive_reuses_one_connection() -> None:
    backend = MockBackend(ok)
    client = LeanClient(URL, network=backend)
    for _ in range(3):
        assert (await client.post_json("m", "chat/completions", BODY)).json() == {"ok": True}
    assert len(backend.streams) == 1
    assert [(r.connection, r.target, r.json()) for r in backend.requests] == [
        (0, "/v1/chat/completions", BODY)
    ] * 3
    assert pool(client) == (0, 1)
    client.close()
    assert backend.streams[0].closed


async def test_a_request_split_over_sends_and_an_answer_split_into_bytes_are_each_one() -> None:
    """The peer reads HTTP, not send calls; the transport reads a response delivered one byte per
    receive as a whole."""
    backend = MockBackend(lambda request: [bytes([byte]) for byte in OK])
    client = LeanClient(URL, network=backend)
    assert (await client.post_json("m", "x", {"a": 1})).json() == {"ok": True}
    stream = backend.streams[0]
    await stream.send_all(b"POST /v1/y HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\n{")
    assert len(stream.requests) == 1
    await stream.send_all(b"}")
    assert [r.body for r in stream.requests] == [b'{"a":1}', b"{}"]


async def test_a_peer_that_closes_an_idle_connection_is_seen_and_a_new_one_opened() -> None:
    """The peer answers and then closes the kept-alive connection (no ``Connection: close``): the next
    request sees the EOF before using it, closes it, and goes out on a new connection."""
    backend = MockBackend(lambda request: [OK, EOF])
    client = LeanClient(URL, network=backend)
    await client.post_json("m", "x", {})
    assert client.pool._idle[0].peer_gone()
    await client.post_json("m", "x", {})
    assert [r.connection for r in backend.requests] == [0, 1]
    assert backend.streams[0].closed
    assert client.pool.statistics().opened == 2


@pytest.mark.parametrize(
    "answer",
    [
        http_response(200, json={}, headers=[("connection", "close")]),
        http_response(200, json={}, version="1.0"),
        http_response(200, json={}, length=False),  # the body ends with the connection
    ],
    ids=["connection-close", "http-1.0", "until-eof"],
)
async def test_an_answer_that_ends_the_connection_is_not_reused(answer: bytes) -> None:
    backend = MockBackend(lambda request: [answer, EOF])
    client = LeanClient(URL, network=backend)
    assert (await client.post_json("m", "x", {})).json() == {}
    assert pool(client) == (0, 0)
    assert backend.streams[0].closed
    await client.post_json("m", "x", {})
    assert len(backend.streams) == 2


async def test_a_peer_that_closes_mid_answer_is_a_connection_error_and_nothing_leaks() -> None:
    backend = MockBackend.replying([OK[:-5], EOF], [OK])
    client = LeanClient(URL, network=backend)
    with pytest.raises(UpstreamConnectionError, match=r"broke HTTP/1\.1") as info:
        await client.post_json("m", "x", {})
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert pool(client) == (0, 0)
    assert backend.streams[0].closed
    assert (await client.post_json("m", "x", {})).json() == {"ok": True}
    assert len(backend.streams) == 2


async def test_a_peer_that_closes_before_answering_is_a_protocol_error() -> None:
    client = LeanClient(URL, network=MockBackend.replying([EOF]))
    with pytest.raises(RemoteProtocolError):
        await client.request_json("x", b"{}")
    assert pool(client) == (0, 0)


async def test_a_refused_connection_is_a_connection_error() -> None:
    client = LeanClient(URL, network=MockBackend(ok, connections=0))
    with pytest.raises(UpstreamConnectionError, match=r"could not connect to the upstream$"):
        await client.post_json("m", "x", {})
    assert pool(client) == (0, 0)


async def test_the_read_timeout_is_exact_and_closes_the_connection(autojump_clock: Any) -> None:
    backend = MockBackend.replying([])  # the peer never answers
    client = LeanClient(URL, network=backend, timeouts=Timeouts(read=7.0))
    with pytest.raises(UpstreamTimeoutError):
        await client.post_json("m", "x", {})
    assert trio.current_time() == 7.0
    assert backend.streams[0].closed_at == 7.0
    assert pool(client) == (0, 0)


async def test_a_paused_answer_arrives_on_time_and_a_pause_past_the_read_timeout_times_out(
    autojump_clock: Any,
) -> None:
    """A number in a reply is a pause of the peer: the read timeout bounds each silence in the body,
    not the whole answer."""
    backend = MockBackend.replying([2.0, OK[:-5], 4.0, OK[-5:]], [OK[:-5], 8.0, OK[-5:]])
    client = LeanClient(URL, network=backend, timeouts=Timeouts(read=5.0))
    assert (await client.post_json("m", "x", {})).json() == {"ok": True}
    assert trio.current_time() == 6.0
    with pytest.raises(UpstreamTimeoutError):
        await client.post_json("m", "x", {})
    assert trio.current_time() == 11.0
    assert backend.streams[0].closed_at == 11.0


async def test_a_head_trickled_past_the_read_timeout_times_out(autojump_clock: Any) -> None:
    """Every silence is short, but the head as a whole must arrive within the read timeout too."""
    trickle: list[bytes | float] = []
    for byte in OK[:40]:
        trickle += [1.0, bytes([byte])]
    client = LeanClient(URL, network=MockBackend.replying(trickle), timeouts=Timeouts(read=5.0))
    with pytest.raises(UpstreamTimeoutError):
        await client.post_json("m", "x", {})
    assert trio.current_time() == 5.0


async def test_the_connect_timeout_is_exact(autojump_clock: Any) -> None:
    class Unreachable(MockBackend):
        async def connect(self, origin: Any, ssl_context: Any) -> Any:
            await trio.sleep_forever()

    client = LeanClient(URL, network=Unreachable(ok), timeouts=Timeouts(connect=3.0))
    with pytest.raises(UpstreamTimeoutError):
        await client.post_json("m", "x", {})
    assert trio.current_time() == 3.0
    assert pool(client) == (0, 0)


async def test_a_cancel_mid_stream_closes_the_connection_at_that_instant(autojump_clock: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    chunk = f"{len(event):x}\r\n".encode() + event + b"\r\n"
    backend = MockBackend.replying([head, chunk, chunk])  # then silence: the stream is not over
    client = LeanClient(URL, network=backend)
    seen: list[str] = []

    async def on_event(name: str, data: str) -> None:
        seen.append(data)

    with trio.move_on_after(2.5):
        await client.post_sse("m", "x", {}, on_event)
    assert len(seen) == 2
    assert backend.streams[0].closed_at == 2.5
    assert pool(client) == (0, 0)


async def cancel_at_byte(cut: int, stream: bool) -> None:
    """A request whose answer stops after ``cut`` bytes, then silence; the caller cancels at t=1."""
    answer = sse_answer(b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n') if stream else OK
    backend = MockBackend.replying([answer[:cut]] if cut else [], [OK])  # (b"" would be the EOF)
    client = LeanClient(URL, network=backend)
    events: list[str] = []

    async def on_event(name: str, data: str) -> None:
        events.append(data)

    with trio.move_on_after(1.0) as scope:
        if stream:
            await client.post_sse("m", "x", {}, on_event)
        else:
            await client.post_json("m", "x", {})
    if cut < len(answer):
        assert scope.cancelled_caught
        assert backend.streams[0].closed_at == 1.0, "the cancel closed the connection at once"
    else:
        assert not scope.cancelled_caught
    assert pool(client) == ((0, 0) if cut < len(answer) else (0, 1))
    # The pool is consistent afterwards: the next call gets its answer.
    assert (await client.post_json("m", "x", {})).json() == {"ok": True}
    assert pool(client) == (0, 1)
    client.close()
    assert all(s.closed for s in backend.streams)


@given(cut=st.integers(min_value=0, max_value=len(OK)), stream=st.booleans())
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_cancel_at_any_byte_of_the_answer_closes_the_connection_and_leaves_the_pool_consistent(
    cut: int, stream: bool
) -> None:
    trio.run(cancel_at_byte, cut, stream, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_an_answer_over_the_byte_cap_fails_and_its_connection_is_closed() -> None:
    backend = MockBackend.replying([http_response(200, json={"x": "y" * 200})], [OK])
    client = LeanClient(URL, network=backend, max_response_bytes=100)
    with pytest.raises(UpstreamResponseError, match="larger than"):
        await client.post_json("m", "x", {})
    assert backend.streams[0].closed
    assert pool(client) == (0, 0)
    await client.post_json("m", "x", {})
    assert len(backend.streams) == 2


async def test_a_compression_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"0" * (16 << 20))
    answer = http_response(
        200, bomb, headers=[("content-type", "application/json"), ("content-encoding", "gzip")]
    )
    backend = MockBackend.replying([answer])
    client = LeanClient(URL, network=backend, max_response_bytes=1 << 20)
    with pytest.raises(UpstreamResponseError, match="larger than"):
        await client.post_json("m", "x", {})
    assert backend.streams[0].closed


@pytest.mark.parametrize(
    "events",
    [
        [b"data: " + b"z" * 5000 + b"\n\n"],  # one event over the cap
        [b"data: z\n" * 2000],  # an event that never ends, line after line
    ],
    ids=["large-event", "endless-event"],
)
async def test_an_event_over_the_event_cap_fails_and_its_connection_is_closed(events: list[bytes]) -> None:
    backend = MockBackend.replying([sse_answer(*events)])
    client = LeanClient(URL, network=backend, max_event_bytes=1024)

    async def on_event(name: str, data: str) -> None:
        pass

    with pytest.raises(UpstreamResponseError):
        await client.post_sse("m", "x", {}, on_event)
    assert backend.streams[0].closed
    assert pool(client) == (0, 0)


COMPLETION = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
MESSAGE = {"content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 3, "output_tokens": 1}}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_the_http_backends_run_the_lean_transport_on_it(provider: str) -> None:
    """The default transport of both backends, from their constructors down, with no socket."""
    answer = COMPLETION if provider == "openai" else MESSAGE
    backend = MockBackend(lambda request: [http_response(200, json=answer)])
    lm: OpenAICompatibleLM | AnthropicLM
    if provider == "openai":
        lm = OpenAICompatibleLM("m", api_base="http://upstream.test/v1", api_key="sk-1", network=backend)
    else:
        lm = AnthropicLM("m", api_base="http://upstream.test", api_key="sk-1", network=backend)
    assert isinstance(lm._clients, LeanClient)
    messages = [{"role": "user", "content": "q"}]
    assert await lm.acall(messages=messages) == ["ok"]
    assert await lm.acall(messages=messages) == ["ok"]
    [stream] = backend.streams
    request = stream.requests[0]
    assert request.target == ("/v1/chat/completions" if provider == "openai" else "/v1/messages")
    sent_key = request.headers.get("authorization") or request.headers.get("x-api-key")
    assert sent_key in ("Bearer sk-1", "sk-1")
    assert json.loads(request.body)["messages"][0]["content"] == "q"
    await lm.aclose()
    assert stream.closed


async def test_the_in_memory_peer_refuses_a_request_it_has_no_reply_for() -> None:
    client = LeanClient(URL, network=MockBackend.replying([OK]))
    await client.post_json("m", "x", {})
    with pytest.raises(AssertionError, match="more requests than the 1 scripted replies"):
        await client.post_json("m", "x", {})


async def test_the_in_memory_peer_reads_http_as_a_server_does() -> None:
    """An invalid request fails the test that sent it, not silently."""
    stream = await MockBackend(ok).connect(Origin("http", "upstream.test", 80), None)
    with pytest.raises(AssertionError, match=r"invalid HTTP/1\.1"):
        await stream.send_all(b"NOT HTTP\r\n\r\n")


def test_http_settings_send_the_lean_transport_to_the_given_network() -> None:
    backend = MockBackend(ok)
    client = HTTPSettings(client="httpx").clients(URL, {}, network=backend)
    assert isinstance(client, LeanClient)
    assert client.pool.network is backend


MESSAGES = [{"role": "user", "content": "What is Trio?"}]


async def test_a_nan_parameter_is_an_engine_error_not_a_raw_value_error(autojump_clock: Any) -> None:
    """When such a value does reach a call, the JSON encoder's ValueError ("Out of range float values are
    not JSON compliant") is translated at the edge (the transports' post_json) into an EngineError."""
    from dspy_trio.engine import EngineError

    lm = openai_lm(Scripted(), temperature=math.nan)
    with pytest.raises(EngineError):
        await lm.acall(messages=MESSAGES)


async def test_response_format_none_in_params_sends_no_response_format(autojump_clock: Any) -> None:
    """README: "a response_format in the LM's params wins". A user whose server rejects response_format
    sets it to None, and no response_format is sent: the None must survive request_params (lm/_base.py),
    or the JSONAdapter's json_object is sent anyway."""
    import dspy

    answer = {"choices": [{"index": 0, "message": {"content": '{"answer": "ok"}'}, "finish_reason": "stop"}]}
    script = Scripted(success=answer)
    with dspy.context(lm=openai_lm(script, response_format=None), adapter=dspy.JSONAdapter()):
        await dspy.Predict("question -> answer").acall(question="q")
    assert "response_format" not in script.bodies[0]
