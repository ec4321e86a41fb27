"""A fake LM upstream for tests, benchmarks and the CLI: an OpenAI and Anthropic HTTP/1.1 server on Trio.

It answers ``POST /v1/chat/completions`` and Anthropic's ``POST /v1/messages`` (plain and streamed) with
text the built-in simulated LM would write for the same messages, so DSPy parses every answer. Latency and
token pacing are configurable and run on Trio's clock. Faults (``_faults``) are queued on demand and
consumed one per request, in order: 429 with ``Retry-After``, 500, 503, a hang, a disconnect mid-stream, a
malformed chunk — and the hostile answers of ``_hostile``: an event that never ends, an endless stream, a
compression bomb, deeply nested JSON, an HTML page, invalid UTF-8, an error that quotes the request's
credentials.

Every request is recorded (``_records``), including — the point of it all — the time its client closed the
connection if that happened before the answer was complete. A watcher task reads the socket while the answer
is being produced, so a client that cancels is seen at once, even in the middle of a sleep.

It is built on h11 (the sans-I/O HTTP/1.1 library httpx itself uses) rather than on a web framework, so
that it can misbehave at the byte level and notice a closed connection at the moment it happens.

Control endpoints, for a fake upstream running in another process::

    POST /_fake/faults   {"faults": [{"kind": "rate_limit", "retry_after": 2}, ...]}   queue faults
                         ("clear": true drops those still queued first)
    POST /_fake/behavior {"latency": 1.0, ...}                                         change pacing
    GET  /_fake/records                                                                the request log
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio

from .._groups import open_service_nursery
from ..lm.simulated import SimulatedLM
from . import _hostile
from ._faults import Behavior as Behavior
from ._faults import Fault as Fault
from ._records import IdleClose as IdleClose
from ._records import RequestRecord as RequestRecord
from ._wire import AnthropicWire, ClientGone, OpenAIWire, Sender, wire_for

_ERROR_STATUS = {
    "rate_limit": 429,
    "server_error": 500,
    "unavailable": 503,
    "overloaded": 529,
    "context_window": 400,
    "unauthorized": 401,
}


class FakeUpstream:
    """The server. Start it with :func:`open_fake_upstream`, or ``await nursery.start(upstream.serve)``."""

    def __init__(self, behavior: Behavior | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behavior = behavior or Behavior()
        self.host = host
        self.port = port
        self.records: list[RequestRecord] = []
        self.idle_closes: list[IdleClose] = []
        self._faults: deque[Fault] = deque()
        self._indices = itertools.count()
        self._open_connections = 0
        self._changed = trio.Event()
        self._release = trio.Event()

    def __repr__(self) -> str:
        active = sum(not r.ended for r in self.records)
        return (
            f"<FakeUpstream {self.url} [requests: {len(self.records)}, {active} active | "
            f"connections: {self._open_connections} open | faults queued: {len(self._faults)}]>"
        )

    @property
    def url(self) -> str:
        """The API root to give an OpenAI-compatible client, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        return self._open_connections

    @property
    def active_requests(self) -> int:
        """Requests whose answer has neither completed nor been cut off by the client."""
        return sum(not record.ended for record in self.records)

    def release_waiting(self) -> None:
        """Cut short the latency of every request now waiting it out: they are answered at once (a
        test can hold many requests open with a long latency, then finish them)."""
        self._release.set()
        self._release = trio.Event()

    def add_faults(self, *faults: Fault) -> None:
        """Queue faults; each following request consumes one, in order."""
        self._faults.extend(faults)

    async def wait_for(self, predicate: Any) -> None:
        """Block until ``predicate(self)`` is true, rechecking whenever a record changes."""
        while not predicate(self):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled. Reports ``self`` (with its port bound) to ``nursery.start``."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self._open_connections += 1
        connection = h11.Connection(h11.SERVER)
        try:
            while await self._one_exchange(connection, stream):
                connection.start_next_cycle()
                if not await self._await_next_request(connection, stream):
                    break
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self._open_connections -= 1
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    async def _await_next_request(self, connection: h11.Connection, stream: trio.SocketStream) -> bool:
        """Wait for the next request on a kept-alive connection, up to ``behavior.idle_timeout``.
        Returns False after closing it for idleness (and recording when the client closed its end)."""
        idle_timeout = self.behavior.idle_timeout
        if idle_timeout is None or connection.trailing_data[0]:
            return True
        with trio.move_on_after(idle_timeout):
            connection.receive_data(await stream.receive_some(65536))
            return True
        record = IdleClose(closed_at=trio.current_time())
        self.idle_closes.append(record)
        self._notify()
        await stream.send_eof()
        with trio.move_on_after(60):
            while await stream.receive_some(65536):
                pass
            record.client_closed_at = trio.current_time()
            self._notify()
        return False

    async def _receive_event(self, connection: h11.Connection, stream: trio.SocketStream) -> Any:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            connection.receive_data(await stream.receive_some(65536))

    async def _one_exchange(self, connection: h11.Connection, stream: trio.SocketStream) -> bool:
        """Serve one request. Returns whether the connection can carry another."""
        request = await self._receive_event(connection, stream)
        if not isinstance(request, h11.Request):
            return False
        chunks = []
        while isinstance(event := await self._receive_event(connection, stream), h11.Data):
            chunks.append(bytes(event.data))
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            body = None
        path = request.target.decode()
        send = Sender(connection, stream)
        if path.startswith("/_fake/"):
            await self._control(send, request.method.decode(), path, body)
            return connection.our_state is h11.DONE
        fault = self._faults.popleft() if self._faults and wire_for(path) is not None else None
        record = RequestRecord(
            index=next(self._indices),
            path=path,
            body=body,
            stream=bool(isinstance(body, dict) and body.get("stream")),
            fault=fault.kind if fault else None,
            received_at=trio.current_time(),
            received_wall=time.time(),
            headers={name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers},
        )
        self.records.append(record)
        send.record = record
        self._notify()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_for_close, connection, stream, record, nursery.cancel_scope)
            try:
                await self._answer(send, record, fault)
            except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
                self._client_closed(record)
            nursery.cancel_scope.cancel()
        if not record.ended:
            record.completed_at = trio.current_time()
            record.completed_wall = time.time()
            self._notify()
        return not send.aborted and record.client_closed_at is None and connection.our_state is h11.DONE

    def _client_closed(self, record: RequestRecord) -> None:
        if record.client_closed_at is None and record.completed_at is None:
            record.client_closed_at = trio.current_time()
            record.client_closed_wall = time.time()
            self._notify()

    async def _watch_for_close(
        self,
        connection: h11.Connection,
        stream: trio.SocketStream,
        record: RequestRecord,
        scope: trio.CancelScope,
    ) -> None:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                if not record.aborted:
                    self._client_closed(record)
                scope.cancel()
                return
            connection.receive_data(data)  # a pipelined next request: keep it for later

    async def _control(self, send: Sender, method: str, path: str, body: Any) -> None:
        try:
            if method == "POST" and path == "/_fake/faults":
                faults = [Fault(**fault) for fault in body["faults"]]
                if body.get("clear"):
                    self._faults.clear()
                self.add_faults(*faults)
                await send.json(200, {"queued": len(self._faults)})
            elif method == "POST" and path == "/_fake/behavior":
                self.behavior = attrs.evolve(self.behavior, **body)
                await send.json(200, attrs.asdict(self.behavior))
            elif method == "GET" and path == "/_fake/records":
                await send.json(200, {"records": [r.as_json() for r in self.records]})
            else:
                await send.json(404, {"error": {"message": f"no control endpoint {method} {path}"}})
        except (KeyError, TypeError, ValueError) as exc:
            await send.json(400, {"error": {"message": f"bad control request: {exc}"}})

    async def _answer(self, send: Sender, record: RequestRecord, fault: Fault | None) -> None:
        wire = wire_for(record.path)
        if wire is None or not isinstance(record.body, dict):
            record.status = 404 if isinstance(record.body, dict) else 400
            message = "POST a JSON body to /v1/chat/completions or /v1/messages"
            await send.json(record.status, {"error": {"message": message}})
            return
        if fault is not None and fault.kind in _ERROR_STATUS:
            record.status = _ERROR_STATUS[fault.kind]
            headers = []
            if fault.retry_after is not None:
                headers.append(("retry-after", _number(fault.retry_after)))
            if fault.retry_after_ms is not None:
                headers.append(("retry-after-ms", _number(fault.retry_after_ms)))
            await send.json(record.status, wire.error(fault.kind, f"fake {fault.kind}"), headers)
            return
        if fault is not None and fault.kind == "hang":
            await trio.sleep_forever()
        if (
            fault is not None
            and fault.kind in _hostile.KINDS
            and await _hostile.answer(send, record, fault, wire, self.behavior)
        ):
            return
        simulated = SimulatedLM(words_per_field=self.behavior.words_per_field)
        messages = wire.messages(record.body)
        text = simulated.render(messages)
        tokens = simulated.tokens(text)
        limit = record.body.get("max_tokens")
        cut = isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(tokens)
        if cut:  # as a real model: the answer stops at the token limit (finish_reason "length")
            tokens = tokens[:limit]
            text = "".join(tokens)
        model = str(record.body.get("model", "fake"))
        prompt_tokens = math.ceil(len(json.dumps(messages)) / 4)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        if record.stream:
            await self._stream(send, record, fault, wire, model, tokens, usage, cut)
            return
        with trio.move_on_after(self.behavior.latency):
            await self._release.wait()
        record.status = 200
        if fault is not None and fault.kind == "disconnect":
            record.aborted = True
            await send.abort()
            return
        if fault is not None and fault.kind == "malformed":
            await send.raw(200, wire.malformed_body, "application/json")
            return
        await send.json(200, wire.completion(record.index, model, text, usage, cut))

    async def _stream(
        self,
        send: Sender,
        record: RequestRecord,
        fault: Fault | None,
        wire: OpenAIWire | AnthropicWire,
        model: str,
        tokens: Sequence[str],
        usage: dict[str, int],
        cut: bool = False,
    ) -> None:
        record.status = 200
        await send.start_stream()
        if start := wire.stream_start(record.index, model, usage):
            await send.data(start)
        for index, token in enumerate(tokens):
            await trio.sleep(self.behavior.first_token_delay if index == 0 else self.behavior.token_delay)
            if fault is not None and index == fault.after_tokens:
                if fault.kind == "disconnect":
                    record.aborted = True
                    await send.abort()
                    return
                if fault.kind == "malformed":
                    await send.data(wire.malformed_chunk)
                    await send.end()
                    return
                if fault.kind == "echo_key":
                    status = fault.status or 401
                    await send.data(_hostile.echo_key_stream_error(wire, record.headers, status))
                    await send.end()
                    return
                if fault.kind in ("bad_utf8", "surrogate"):
                    await send.data(_hostile.bad_text_token(wire, record.index, model, fault.kind))
                    record.tokens_sent += 1
                    continue
            await send.data(wire.stream_token(record.index, model, token))
            record.tokens_sent += 1
        await send.data(wire.stream_end(record.index, model, usage, record.body, cut))
        await send.end()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@asynccontextmanager
async def open_fake_upstream(
    behavior: Behavior | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeUpstream]:
    """Run a fake upstream for the duration of the block; it listens on ``upstream.url``."""
    async with open_service_nursery() as nursery:
        yield await nursery.start(FakeUpstream(behavior, host=host, port=port).serve)
