"""A hostile upstream, over real sockets, against both providers on both transports: one rule for all.

Every answer the engine cannot take — too large, an event that never ends, a compression bomb, JSON
nested too deep, HTML where JSON or SSE belongs, invalid UTF-8 — fails the call with
``UpstreamResponseError`` (``upstream_bad_response``, never retried), on the predict path and on the
stream path alike, with memory bounded by the caps and the event loop never held for the whole answer.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from dspy_trio.engine import (
    EngineConfig,
    ErrorEvent,
    LMConfig,
    OpenAISettings,
    RetryPolicy,
    UpstreamError,
    UpstreamResponseError,
    open_engine,
)
from dspy_trio.engine.lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM, TrioLM
from dspy_trio.engine.lm._answers import parse_json
from dspy_trio.engine.lm._base import Completion
from dspy_trio.engine.lm._redact import Redactor
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault, open_fake_upstream

from .transport_helpers import RawServer, keep_alive_handler, open_raw_server, read_request, wait_closed
from .web_helpers import running, settings

pytestmark = pytest.mark.network

PROVIDERS = ("openai", "anthropic")
TRANSPORTS = ("lean", "httpx")
PATHS = ("predict", "stream")
MESSAGES = [{"role": "user", "content": "[[ ## question ## ]]\nWhat is Trio?"}]
DEFAULTS = HTTPSettings()


def backend(provider: str, transport: str, url: str, **http: Any) -> TrioLM:
    settings = HTTPSettings(client=transport, **http)  # type: ignore[arg-type]
    if provider == "openai":
        return OpenAICompatibleLM("fake", api_base=url, api_key="sk-test-key", http=settings)
    return AnthropicLM("claude-fake", api_base=url, api_key="sk-ant-test-key", http=settings)


class Deltas:
    """A stream sink that keeps only how much text arrived (keeping the text would cost memory)."""

    def __init__(self) -> None:
        self.count = 0
        self.chars = 0
        self.texts: list[str] = []

    async def send(self, text: str) -> None:
        self.count += 1
        self.chars += len(text)
        if len(self.texts) < 100:
            self.texts.append(text)


async def call(lm: TrioLM, path: str, sink: Deltas | None = None) -> Completion:
    """One completion: a plain request (``predict``) or a streamed one (``stream``)."""
    if path == "stream":
        return await lm.complete(MESSAGES, {}, sink or Deltas())
    return await lm.complete(MESSAGES, {}, None)


@pytest.fixture(params=[(p, t, k) for p in PROVIDERS for t in TRANSPORTS for k in PATHS], ids="-".join)
def case(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with open_fake_upstream(Behavior(words_per_field=8)) as fake:
        yield fake


async def refused_within(
    upstream: FakeUpstream, attempt: Callable[[], Any], budget: int
) -> UpstreamError | None:
    """Run ``attempt``; return its upstream error. Fails the test if the upstream could send more than
    ``budget`` bytes of the answer before the client gave up (the client read on without a bound)."""
    error: UpstreamError | None = None

    async def run() -> None:
        nonlocal error
        try:
            await attempt()
        except UpstreamError as exc:
            error = exc
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await upstream.wait_for(lambda u: bool(u.records) and u.records[-1].bytes_sent > budget)
        nursery.cancel_scope.cancel()
    sent = upstream.records[-1].bytes_sent
    assert sent <= budget, f"the client read {sent} bytes of an endless answer without refusing it"
    return error


# --- size caps ----------------------------------------------------------------------------------


async def test_an_event_that_never_ends_is_refused_at_the_event_cap(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    """``data:`` lines that never end an event (a JSON body that never ends, for predict): refused
    once one event (or the whole answer) passes its cap, long before the upstream could send 4x it."""
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url)
    upstream.add_faults(Fault("endless_event"))
    cap = DEFAULTS.max_event_bytes if path == "stream" else DEFAULTS.max_response_bytes
    error = await refused_within(upstream, lambda: call(lm, path), 4 * cap)
    assert isinstance(error, UpstreamResponseError), error
    assert "larger than" in error.message
    await lm.aclose()


async def test_an_endless_stream_of_valid_deltas_is_refused_at_the_answer_cap(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    """Valid deltas forever: the whole streamed answer is capped as a JSON answer is."""
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url, max_response_bytes=1 << 20)
    upstream.add_faults(Fault("endless_stream"))
    sink = Deltas()
    error = await refused_within(upstream, lambda: call(lm, path, sink), 4 << 20)
    assert isinstance(error, UpstreamResponseError), error
    assert "larger than 1048576 bytes" in error.message
    assert sink.chars < 1 << 20
    await lm.aclose()


async def test_an_answer_of_exactly_the_cap_is_taken_and_one_byte_more_is_refused(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    """The cap counts the body as decoded; an answer exactly at it passes."""
    provider, transport, path = case
    probe = backend(provider, transport, upstream.url)
    await call(probe, path)
    await upstream.wait_for(lambda u: u.records[-1].ended)
    size = upstream.records[-1].body_bytes
    await probe.aclose()
    exact = backend(provider, transport, upstream.url, max_response_bytes=size, max_event_bytes=size)
    completion = await call(exact, path)
    assert completion.texts[0].startswith("[[ ## answer ## ]]")
    await exact.aclose()
    short = backend(provider, transport, upstream.url, max_response_bytes=size - 1, max_event_bytes=size)
    with pytest.raises(UpstreamResponseError, match=f"larger than {size - 1} bytes"):
        await call(short, path)
    await short.aclose()


# --- compression ---------------------------------------------------------------------------------


async def test_a_compression_bomb_is_refused_before_it_is_inflated(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    """100 MB that arrives as ~100 KB of gzip, all in one write: inflated a piece at a time, refused
    at the cap with memory bounded by it, and the event loop runs between pieces."""
    provider, transport, path = case
    cap = 4 << 20
    lm = backend(provider, transport, upstream.url, max_response_bytes=cap)
    upstream.add_faults(Fault("bomb", size=100_000_000))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            with pytest.raises(UpstreamResponseError, match="larger than"):
                await call(lm, path)
            nursery.cancel_scope.cancel()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap, f"peak {peak / 2**20:.1f} MiB for a {cap / 2**20:.0f} MiB cap"
    assert ticks >= cap // (64 << 10) // 2, "the loop was held while the answer inflated"
    await lm.aclose()


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip"])
async def test_an_encoding_that_cannot_be_bounded_is_refused(
    upstream: FakeUpstream, case: tuple[str, str, str], encoding: str
) -> None:
    """We ask for ``identity``; an answer in an encoding we do not decode (or stacked encodings) is a
    bad answer, not a broken connection to retry."""
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url)
    upstream.add_faults(Fault("bomb", size=1_000_000, encoding=encoding))
    with pytest.raises(UpstreamResponseError, match="Content-Encoding"):
        await call(lm, path)
    assert upstream.records[-1].headers.get("accept-encoding") == "identity"
    await lm.aclose()


async def test_a_small_gzip_answer_is_still_decoded(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url)
    upstream.add_faults(Fault("bomb", size=100_000))
    completion = await call(lm, path)
    assert set(completion.texts[0]) == {"a"}
    assert len(completion.texts[0]) >= 90_000
    await lm.aclose()


# --- malformed answers ---------------------------------------------------------------------------


async def test_deeply_nested_json_is_a_bad_response_not_a_program_error(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url)
    upstream.add_faults(Fault("nested"))
    with pytest.raises(UpstreamResponseError) as info:
        await call(lm, path)
    assert "Recursion" not in info.value.message
    await lm.aclose()


async def test_html_where_json_or_sse_belongs_is_a_bad_response_and_never_quoted(
    upstream: FakeUpstream, case: tuple[str, str, str]
) -> None:
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url)
    upstream.add_faults(Fault("html"))
    with pytest.raises(UpstreamResponseError) as info:
        await call(lm, path)
    assert "text/html" in info.value.message
    assert "<" not in info.value.message
    assert "sk-" not in info.value.message
    await lm.aclose()


@pytest.mark.parametrize(("kind", "match"), [("bad_utf8", "not UTF-8"), ("surrogate", "not valid Unicode")])
async def test_text_that_is_not_unicode_is_a_bad_response_on_both_paths(
    upstream: FakeUpstream, case: tuple[str, str, str], kind: str, match: str
) -> None:
    """One rule: an answer that is not UTF-8 fails the call, whether it is one JSON body or a stream
    (it used to fail a predict but stream U+FFFD); so does valid JSON whose text holds a lone surrogate
    (``"\\ud800"``), which no client could be sent."""
    provider, transport, path = case
    lm = backend(provider, transport, upstream.url)
    upstream.add_faults(Fault(kind, after_tokens=2))  # type: ignore[arg-type]
    sink = Deltas()
    with pytest.raises(UpstreamResponseError, match=match):
        await call(lm, path, sink)
    assert not any("\ufffd" in text or not text.isascii() for text in sink.texts)
    await lm.aclose()


@pytest.mark.parametrize("kind", ["bad_utf8", "surrogate"])
async def test_the_service_answers_text_that_is_not_unicode_with_an_error_not_a_crash(kind: str) -> None:
    """A lone surrogate reached the web layer and broke it: a 500 ``internal_error`` for predict, and an
    SSE stream cut without an error event. Both now end with ``upstream_bad_response``."""
    async with open_fake_upstream() as upstream:
        lm = LMConfig(
            model="fake", retry=RetryPolicy(max_attempts=1), settings=OpenAISettings(api_base=upstream.url)
        )
        async with (
            running(settings(engine=EngineConfig(lms={"default": lm}))) as server,
            httpx.AsyncClient(base_url=server.url) as client,
        ):
            upstream.add_faults(Fault(kind))  # type: ignore[arg-type]
            predict = await client.post("/v1/programs/default/predict", json={"inputs": {"question": "q"}})
            upstream.add_faults(Fault(kind, after_tokens=2))  # type: ignore[arg-type]
            stream = await client.post("/v1/programs/default/stream", json={"inputs": {"question": "q"}})
    assert predict.status_code == 502
    assert predict.json()["error"]["code"] == "upstream_bad_response"
    last = stream.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error"), stream.text
    assert "upstream_bad_response" in last


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_bad_answer_to_a_stream_is_not_retried(provider: str, transport: str) -> None:
    """``200 text/html`` to a stream used to look like a dropped connection and was retried (8 upstream
    requests for 2 calls): a bad answer is not retryable, each call sends one request."""
    async with open_fake_upstream() as upstream:
        lm = LMConfig.from_mapping(
            {
                "provider": provider,
                "model": "fake",
                "api_base": upstream.url,
                "api_key": "k",
                "http": {"client": transport},
                "retry": {"max_attempts": 4},
            }
        )
        upstream.add_faults(Fault("html"), Fault("html"))
        async with open_engine(EngineConfig(lms={"default": lm})) as engine:
            for _ in range(2):
                async with engine.stream("default", {"question": "q"}) as events:
                    last = [event async for event in events][-1]
                assert isinstance(last, ErrorEvent)
                assert isinstance(last.error, UpstreamResponseError), last.error
    assert len(upstream.records) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("path", PATHS)
async def test_a_cancel_while_a_bomb_inflates_closes_the_connection_and_leaves_nothing(
    transport: str, path: str
) -> None:
    """The caller's scope is cancelled between two inflated pieces of one huge compressed chunk: the
    call ends as cancelled, its connection is closed (the upstream sees it), and the pool is empty."""
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"a" * 1000 + b'"}}]}\n\n'
    bomb = gzip.compress(event * 100_000 if path == "stream" else b"a" * 100_000_000)
    media = b"text/event-stream" if path == "stream" else b"application/json"

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: " + media + b"\r\ncontent-encoding: gzip\r\n"
        await stream.send_all(head + b"content-length: %d\r\n\r\n" % len(bomb) + bomb)
        await wait_closed(stream)

    async with open_raw_server(handle) as server:
        lm = backend("openai", transport, server.url.removesuffix("/"))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            with trio.CancelScope() as scope:

                async def cancel_mid_inflation() -> None:
                    await server.wait_for(lambda s: len(s.requests) == 1)
                    seen = ticks
                    while ticks < seen + 20:  # the call is inflating, a piece per tick
                        await trio.lowlevel.checkpoint()
                    scope.cancel()

                nursery.start_soon(cancel_mid_inflation)
                await call(lm, path)
            assert scope.cancelled_caught, "the call finished before the cancel"
            await server.wait_for(lambda s: s.closed == 1)
            nursery.cancel_scope.cancel()
        if transport == "lean":
            stats = lm._clients.pool.statistics()  # type: ignore[attr-defined]
            assert (stats.active, stats.idle) == (0, 0)
        await lm.aclose()


# --- attacks that broke the rules above (the upstream attack round; each fix flips its test) ---------


def _raw_answer(*parts: bytes | float) -> Callable[[trio.abc.Stream, RawServer], Any]:
    """A raw upstream that reads one request, then writes ``parts`` (bytes) and sleeps (numbers), then
    keeps the connection open until the client closes it."""

    async def handle(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        for part in parts:
            if isinstance(part, bytes):
                await stream.send_all(part)
            else:
                await trio.sleep(part)
        await wait_closed(stream)

    return handle


def _delta(text: str, finish: str | None = None) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stream_that_starts_with_a_bom_loses_no_delta(transport: str) -> None:
    body = b"\xef\xbb\xbf" + _delta("Hello ") + _delta("world", "stop") + b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)
    async with open_raw_server(_raw_answer(head + body)) as server:
        lm = backend("openai", transport, server.url)
        sink = Deltas()
        completion = await lm.complete(MESSAGES, {}, sink)
        await lm.aclose()
    assert completion.texts == ["Hello world"]
    assert sink.texts == ["Hello ", "world"]


@pytest.mark.parametrize("head", ["informational", "trickled"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_head_that_never_completes_times_out_on_both_transports(
    autojump_clock: trio.testing.MockClock, transport: str, head: str
) -> None:
    """The same bytes, the same outcome: an upstream that answers ``100 Continue`` every second forever,
    or trickles its status line and headers a byte a second, never sends a response head. The lean
    transport gives up after ``read_timeout`` (5 s here); httpx waited until the caller's deadline."""

    async def endless_head(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        if head == "trickled":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        while True:
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n" if head == "informational" else b"x")
            await trio.sleep(1)

    async with open_raw_server(endless_head) as server:
        lm = backend("openai", transport, server.url, read_timeout=5.0)
        started = trio.current_time()
        error: UpstreamError | None = None
        with trio.move_on_after(100):  # the caller's deadline
            try:
                await lm.complete(MESSAGES, {}, None)
            except UpstreamError as exc:
                error = exc
        await lm.aclose()
    assert error is not None, "no timeout: the call ran until the caller's deadline"
    assert "read timeout" in error.message
    assert trio.current_time() - started == 5.0


@pytest.mark.parametrize("path", PATHS)
async def test_a_token_count_too_large_for_a_float_is_not_an_internal_error(path: str) -> None:
    huge = "1" + "0" * 400  # valid JSON, a whole number, not negative
    completion = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "[[ ## answer ## ]]\nhi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    if path == "predict":
        body = (
            json.dumps(completion).encode().replace(b'"total_tokens": 2', b'"total_tokens": ' + huge.encode())
        )
        media = b"application/json"
    else:
        usage = b'data: {"choices": [], "usage": {"total_tokens": ' + huge.encode() + b"}}\n\n"
        body = _delta("[[ ## answer ## ]]\nhi", "stop") + usage + b"data: [DONE]\n\n"
        media = b"text/event-stream"
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + media + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    )

    async with open_raw_server(keep_alive_handler(lambda request, content: answer)) as server:
        lm = LMConfig(
            model="fake",
            settings=OpenAISettings(api_base=server.url, stream_upstream=path == "stream"),
            retry=RetryPolicy(max_attempts=1),
        )
        async with open_engine(EngineConfig(lms={"default": lm})) as engine:
            # Refusing the answer is as good as dropping the count; a ProgramError is not.
            with contextlib.suppress(UpstreamResponseError):
                await engine.predict("default", {"question": "q"})


class _LongestStep(trio.abc.Instrument):
    """The longest time one task step held the event loop (real seconds)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._began: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._began is not None:
            self.longest = max(self.longest, time.perf_counter() - self._began)
            self._began = None


async def test_an_answer_of_millions_of_nested_arrays_does_not_hold_the_event_loop() -> None:
    """Valid JSON within the size cap and the depth limit, but made of millions of containers: every
    other request of the process (deadlines, streams, heartbeats) waits while one answer is parsed. The
    answer may be refused or parsed off the loop; no single task step may hold the loop for long (the
    unfixed step is ~1.8 s on an idle machine, longer on a busy one; 0.5 s is the margin)."""
    cap = 4 << 20
    head = b'{"choices": [{"index": 0, "message": {"content": "hi"}}], "x": ['
    unit = b"[" * 100 + b"]" * 100 + b","
    body = head + unit * ((cap - len(head) - 3) // len(unit)) + b"0]}"
    assert len(body) <= cap
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    async with open_raw_server(_raw_answer(answer + body)) as server:
        lm = backend("openai", "lean", server.url, max_response_bytes=cap)
        steps = _LongestStep()
        trio.lowlevel.add_instrument(steps)
        try:
            with contextlib.suppress(UpstreamResponseError):
                await lm.complete(MESSAGES, {}, None)
            await trio.lowlevel.checkpoint()  # the step that parsed ends here: the instrument sees it
        finally:
            trio.lowlevel.remove_instrument(steps)
        await lm.aclose()
    print(f"LONGEST STEP {steps.longest:.4f} s")
    assert steps.longest < 0.5, f"one task step held the event loop for {steps.longest:.2f} s"


def test_an_answer_dense_with_logprobs_is_not_refused_for_its_containers() -> None:
    """The container bound of an answer (one per 16 bytes past 65,536) leaves room for the densest
    answer providers send: 4 MiB of logprobs with 20 alternatives a token (~28 bytes a container)."""
    alternative = {"token": "abd", "logprob": -1.23456, "bytes": [97, 98, 100]}
    token = {"token": "abc", "logprob": -0.12, "bytes": [97, 98, 99], "top_logprobs": [alternative] * 20}
    one = json.dumps(token)
    body = '{"choices": [{"logprobs": {"content": [' + ",".join([one] * ((4 << 20) // len(one))) + "]}}]}"
    parsed = parse_json("m", body.encode(), Redactor())
    assert len(parsed["choices"][0]["logprobs"]["content"]) == (4 << 20) // len(one)


_ENDED = {
    "openai": _delta("Hello ") + _delta("world", "stop") + b"data: [DONE]\n\n",
    "anthropic": b"".join(
        f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()
        for name, payload in [
            ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
            (
                "content_block_delta",
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hello "}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "world"}},
            ),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2}}),
            ("message_stop", {"type": "message_stop"}),
        ]
    ),
}


@pytest.mark.parametrize("after", ["silence", "keep-alives"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_stream_that_ended_is_taken_even_if_the_upstream_keeps_the_connection_open(
    autojump_clock: trio.testing.MockClock, provider: str, transport: str, after: str
) -> None:
    """The answer is complete (every delta, the finish, ``[DONE]`` / ``message_stop``), but the body's
    chunked framing never ends: silence, or a keep-alive comment a second. The caller already has the
    whole text; the call must return it, not fail with a read timeout after 5 s (the client of a
    stream got every delta and then an error event) or wait for the deadline."""
    body = _ENDED[provider]

    async def never_ends(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"%x\r\n" % len(body) + body + b"\r\n")
        while True:
            await trio.sleep(1)
            if after == "keep-alives":
                await stream.send_all(b"e\r\n: keep-alive\n\n\r\n")

    async with open_raw_server(never_ends) as server:
        lm = backend(provider, transport, server.url, read_timeout=5.0)
        sink = Deltas()
        completion = None
        with trio.move_on_after(100):  # the caller's deadline
            completion = await lm.complete(MESSAGES, {}, sink)
        await lm.aclose()
    assert completion is not None, "held until the caller's deadline"
    assert completion.texts == ["Hello world"]


@pytest.mark.parametrize(("late", "connections"), [(0.1, 1), (1.0, 2)], ids=["within-grace", "after-grace"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_body_after_a_streams_end_is_awaited_briefly_for_the_connection(
    autojump_clock: trio.testing.MockClock, provider: str, transport: str, late: float, connections: int
) -> None:
    """After the stream's own end the rest of the body (here: the chunked terminator, ``late`` seconds
    later) is read for at most half a second: arriving within it, the connection carries the next call;
    later, the connection is closed and the next call opens another. Both calls get their answer."""
    body = _ENDED[provider]

    async def terminator_late(stream: trio.abc.Stream, server: RawServer) -> None:
        while await read_request(stream, h11.Connection(h11.SERVER), server):
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            await stream.send_all(head + b"%x\r\n" % len(body) + body + b"\r\n")
            await trio.sleep(late)
            await stream.send_all(b"0\r\n\r\n")

    async with open_raw_server(terminator_late) as server:
        lm = backend(provider, transport, server.url, read_timeout=5.0)
        for _ in range(2):
            started = trio.current_time()
            completion = await lm.complete(MESSAGES, {}, Deltas())
            assert completion.texts == ["Hello world"]
            assert trio.current_time() - started == min(late, 0.5)
        await lm.aclose()
    assert server.connections == connections
