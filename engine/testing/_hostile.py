"""The fake upstream's hostile answers: what a broken or malicious LM server sends.

Each is built from the same wire format as the good answers (``_wire``), so a client that is not careful
takes it for a real one: a stream whose event never ends, an endless stream of valid deltas, a
compression bomb, JSON nested ten thousand deep, an HTML page where JSON or SSE belongs, invalid UTF-8
inside an otherwise valid answer, and an error that quotes the credentials the request carried.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Mapping
from typing import Any

import trio

from ._faults import Behavior, Fault, FaultKind
from ._records import RequestRecord
from ._wire import AnthropicWire, OpenAIWire, Sender, sse

Wire = OpenAIWire | AnthropicWire

# The fault kinds answered here (the others are the fake upstream's plain errors, hangs and cuts).
KINDS: frozenset[FaultKind] = frozenset(
    {"endless_event", "endless_stream", "bomb", "nested", "html", "bad_utf8", "surrogate", "echo_key"}
)

# A placeholder token replaced by raw bytes after encoding (JSON cannot carry invalid UTF-8 itself).
_BAD_TOKEN = "@@INVALID_UTF8@@"
INVALID_UTF8 = b"caf\xe9 \xff\xfe"

# How the fake upstream labels each encoding it can compress with; any other label is sent over gzip
# bytes (a client must refuse an encoding it cannot decode, whatever the bytes are).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def credentials(headers: Mapping[str, str]) -> str:
    """The credentials a request carried (``Authorization`` or ``x-api-key``), as an upstream that
    quotes them back would write them."""
    return headers.get("authorization") or headers.get("x-api-key") or "(none)"


def echo_key_error(wire: Wire, headers: Mapping[str, str]) -> bytes:
    """An error body quoting the credentials received, as some providers and proxies do."""
    message = f"Incorrect API key provided: {credentials(headers)}. You can find your key at ..."
    return json.dumps(wire.error("invalid_api_key", message)).encode()


def echo_key_stream_error(wire: Wire, headers: Mapping[str, str], status: int) -> bytes:
    """An error event mid-stream quoting the credentials received."""
    message = f"upstream failure while authorising {credentials(headers)}"
    if isinstance(wire, AnthropicWire):
        kind = "overloaded_error" if status in (503, 529) else "authentication_error"
        return sse({"type": "error", "error": {"type": kind, "message": message}}, "error")
    return sse({"error": {"message": message, "type": "server_error", "code": status}})


def html_page(status: int, headers: Mapping[str, str]) -> bytes:
    """A proxy's HTML page that dumps the request headers (credentials included)."""
    dump = "\n".join(f"{name}: {value}" for name, value in headers.items())
    return (
        f"<!DOCTYPE html><html><head><title>{status}</title></head><body><h1>Gateway says {status}</h1>"
        f"<pre>{dump}</pre></body></html>"
    ).encode()


def nested(depth: int) -> bytes:
    """``depth`` nested JSON arrays: valid JSON that recursive parsers cannot take."""
    return b"[" * depth + b"]" * depth


# What replaces the placeholder: raw bytes that are not UTF-8, or a JSON escape of a lone surrogate.
_BAD_TEXT = {"bad_utf8": INVALID_UTF8, "surrogate": b"lone \\ud800 surrogate"}


def bad_text_completion(wire: Wire, index: int, model: str, kind: str) -> bytes:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    completion = wire.completion(index, model, f"[[ ## answer ## ]]\n{_BAD_TOKEN}", usage)
    return json.dumps(completion).encode().replace(_BAD_TOKEN.encode(), _BAD_TEXT[kind])


def bad_text_token(wire: Wire, index: int, model: str, kind: str) -> bytes:
    return wire.stream_token(index, model, _BAD_TOKEN).replace(_BAD_TOKEN.encode(), _BAD_TEXT[kind])


def endless_line(size: int = 65536) -> bytes:
    """``size`` bytes of ``data:`` lines that never end an event (no blank line)."""
    line = b"data: " + b"x" * 1017 + b"\n"  # 1 KiB
    return line * max(1, size // len(line))


def endless_json_piece() -> bytes:
    """64 KiB more of a JSON answer that never ends."""
    return b'{"index": 0, "message": {"content": "xxxxxxxx"}},' * 1310


@functools.lru_cache(maxsize=16)
def bomb(wire: Wire, stream: bool, size: int, encoding: str) -> bytes:
    """A valid answer of about ``size`` bytes, compressed: a JSON completion whose text is ``size``
    letters, or a stream of deltas of 1 KiB each adding up to ``size`` bytes of events. Compressed once
    per argument set (repetitive text compresses about a thousandfold)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, _WBITS.get(encoding, _WBITS["gzip"]))
    parts: list[bytes] = []
    if stream:
        parts.append(compressor.compress(wire.stream_start(0, "bomb", {"prompt_tokens": 1})))
        token = wire.stream_token(0, "bomb", "a" * 1024)
        block = token * max(1, (1 << 20) // len(token))  # ~1 MiB
        for _ in range(max(1, -(-size // len(block)))):  # at least size bytes
            parts.append(compressor.compress(block))
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        parts.append(compressor.compress(wire.stream_end(0, "bomb", usage, {})))
    else:
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        head, _, tail = (
            json.dumps(wire.completion(0, "bomb", "@@TEXT@@", usage)).encode().partition(b"@@TEXT@@")
        )
        parts.append(compressor.compress(head))
        block = b"a" * (1 << 20)
        for _ in range(max(1, -(-size // len(block)))):  # at least size bytes
            parts.append(compressor.compress(block))
        parts.append(compressor.compress(tail))
    parts.append(compressor.flush())
    return b"".join(parts)


async def answer(send: Sender, record: RequestRecord, fault: Fault, wire: Wire, behavior: Behavior) -> bool:
    """Answer with the hostile ``fault``; False when it applies later (mid-stream, in the good stream)."""
    kind = fault.kind
    body: Any = record.body
    model = str(body.get("model", "fake"))
    if kind in ("echo_key", "bad_utf8", "surrogate") and record.stream and fault.after_tokens > 0:
        return False
    record.status = fault.status or (401 if kind == "echo_key" else 200)
    if kind == "echo_key":
        await send.raw(record.status, echo_key_error(wire, record.headers), "application/json")
    elif kind == "html":
        await send.raw(record.status, html_page(record.status, record.headers), "text/html")
    elif kind == "nested":
        payload = nested(fault.size or 10_000)
        if record.stream:
            await send.start_stream()
            await send.data(b"data: " + payload + b"\n\n")
            await send.end()
        else:
            await send.raw(200, payload, "application/json")
    elif kind in ("bad_utf8", "surrogate") and record.stream:
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        await send.start_stream()
        await send.data(wire.stream_start(record.index, model, usage))
        await send.data(bad_text_token(wire, record.index, model, kind))
        await send.data(wire.stream_end(record.index, model, usage, body))
        await send.end()
    elif kind in ("bad_utf8", "surrogate"):
        await send.raw(200, bad_text_completion(wire, record.index, model, kind), "application/json")
    elif kind == "bomb":
        payload = bomb(wire, record.stream, fault.size or 100_000_000, fault.encoding)
        content_type = "text/event-stream" if record.stream else "application/json"
        await send.raw(200, payload, content_type, [("content-encoding", fault.encoding)])
    else:
        await _endless(send, record, fault, wire, model, behavior.token_delay)
    return True


async def _endless(
    send: Sender, record: RequestRecord, fault: Fault, wire: Wire, model: str, delay: float
) -> None:
    """An answer that never ends (until the client leaves): 64 KiB a write, one every ``delay``."""
    if not record.stream:
        await send.start_stream("application/json")
        await send.data(b'{"choices": [')
        while True:
            await send.data(endless_json_piece())
            await trio.sleep(delay)
    await send.start_stream()
    if fault.kind == "endless_event":
        await send.data(b"data: ")
        while True:
            await send.data(endless_line())
            await trio.sleep(delay)
    await send.data(wire.stream_start(record.index, model, {"prompt_tokens": 1}))
    token = wire.stream_token(record.index, model, "tok ")
    while True:
        await send.data(token * 64)
        record.tokens_sent += 64
        await trio.sleep(delay)
