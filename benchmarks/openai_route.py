"""OpenAI's chat completions against the service's own route, in one run: the server's CPU per call of
the same program (``default``: ``question -> answer``) through ``POST /v1/chat/completions`` and through
``POST /v1/programs/default/predict``, and streamed: ``stream: true`` against ``/v1/programs/default/stream``
per token.

Processes: the fake upstream (20 ms, streamed tokens at once), ``dspy-trio serve`` (OpenAI-compatible
backend, lean transport), and this load generator (raw HTTP/1.1 on Trio sockets, one keep-alive connection
per client, requests pre-encoded). Server CPU is read from ``/proc/PID/stat`` just before and after a fixed
number of requests, after a warm-up on the same connections; the four routes alternate in each round, on
one server::

    python -m benchmarks.openai_route                      # 3 rounds of 3,000 calls per route
    python -m benchmarks.openai_route --rounds 5 --n 5000 --clients 64

Goals: a chat completion <= 1.1x the server CPU of the same predict; a streamed chat completion adds <= 10%
per token over the service's own stream.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks._measure import median, process_cpu, verdict
from benchmarks._upstream import start_upstream
from benchmarks.hotpath_http import _Conn, _connect, start_ours, stop

ROUTES = {
    "predict": ("/v1/programs/default/predict", b'{"inputs":{"question":"question number %08d"}}'),
    "chat": (
        "/v1/chat/completions",
        b'{"model":"default","messages":[{"role":"user","content":"question number %08d"}]}',
    ),
    "stream": ("/v1/programs/default/stream", b'{"inputs":{"question":"question number %08d"}}'),
    "chat stream": (
        "/v1/chat/completions",
        b'{"model":"default","stream":true,"messages":[{"role":"user","content":"question number %08d"}]}',
    ),
}


def _request(path: str, template: bytes, i: int, host: str) -> bytes:
    body = template % i
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(conn: _Conn, request: bytes) -> tuple[int, bytes]:
    """One request; the status and the whole body (Content-Length, or chunked as streams are sent)."""
    await conn.stream.send_all(request)
    while (end := conn.buffer.find(b"\r\n\r\n")) < 0:
        await conn._fill()
    head = bytes(conn.buffer[: end + 2]).lower()
    del conn.buffer[: end + 4]
    if b"transfer-encoding: chunked" not in head:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(conn.buffer) < length:
            await conn._fill()
        whole = bytes(conn.buffer[:length])
        del conn.buffer[:length]
        return int(head[9:12]), whole
    body = bytearray()
    while True:
        while (line_end := conn.buffer.find(b"\r\n")) < 0:
            await conn._fill()
        size = int(bytes(conn.buffer[:line_end]).split(b";")[0], 16)
        while len(conn.buffer) < line_end + 2 + size + 2:
            await conn._fill()
        body += conn.buffer[line_end + 2 : line_end + 2 + size]
        del conn.buffer[: line_end + 2 + size + 2]
        if size == 0:
            return int(head[9:12]), bytes(body)


def _tokens(route: str, body: bytes) -> int:
    """The output's tokens in an answer: the stream's delta events (0 for a JSON answer)."""
    if route == "stream":
        return body.count(b"event: delta")
    if route == "chat stream":
        return body.count(b'"delta":{"content":')
    return 0


def _load(url: str, route: str, clients: int, n: int, pid: int) -> dict[str, Any]:
    import trio

    host = url.removeprefix("http://")
    path, template = ROUTES[route]

    async def run_requests(conns: list[_Conn], first: int, count: int) -> dict[str, Any]:
        requests = iter(range(first, first + count))
        statuses: dict[int, int] = {}
        tokens = 0

        async def client(conn: _Conn) -> None:
            nonlocal tokens
            for i in requests:
                status, body = await _exchange(conn, _request(path, template, i, host))
                statuses[status] = statuses.get(status, 0) + 1
                tokens += _tokens(route, body)

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(client, conn)
        return {"statuses": statuses, "tokens": tokens}

    async def run() -> dict[str, Any]:
        conns = await _connect(url, clients)
        await run_requests(conns, 0, max(clients * 5, 300))  # warm-up
        server0, wall0 = process_cpu(pid), time.perf_counter()
        done = await run_requests(conns, 10**6, n)
        server, wall = process_cpu(pid) - server0, time.perf_counter() - wall0
        for conn in conns:
            await conn.stream.aclose()
        return {
            "server_cpu_ms": server / n * 1000,
            "rps": n / wall,
            "tokens_per_call": done["tokens"] / n,
            "statuses": done["statuses"],
        }

    return dict(trio.run(run))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=3000, help="measured calls per route and round")
    parser.add_argument("--clients", type=int, default=64, help="keep-alive connections")
    args = parser.parse_args()

    # Tokens 2 ms apart: each its own write, so a stream carries one delta per token (all at once, the
    # pipeline may merge them, and the per-token figure measures the merging instead).
    upstream, upstream_url = start_upstream(0.02, first_token_delay=0.02, token_delay=0.002)
    server, url = start_ours(upstream_url, in_flight=args.clients, queued=4 * args.clients)
    rows: dict[str, list[dict[str, Any]]] = {route: [] for route in ROUTES}
    try:
        for r in range(args.rounds):
            for route in list(ROUTES) if r % 2 == 0 else list(ROUTES)[::-1]:
                row = _load(url, route, args.clients, args.n, server.pid)
                if set(row["statuses"]) != {200}:
                    raise SystemExit(f"{route}: answers other than 200: {row['statuses']}")
                rows[route].append(row)
                print(f"  {route:12s} {json.dumps(row)}", file=sys.stderr)
    finally:
        stop(server)
        upstream.kill()

    cpu = {route: median(rows[route], "server_cpu_ms") for route in ROUTES}
    tokens = {route: median(rows[route], "tokens_per_call") for route in ("stream", "chat stream")}
    chat_ratio = cpu["chat"] / cpu["predict"]
    # What streaming adds, per token: the stream's CPU over its JSON twin's, divided by its tokens.
    per_token = {
        "stream": (cpu["stream"] - cpu["predict"]) / tokens["stream"],
        "chat stream": (cpu["chat stream"] - cpu["chat"]) / tokens["chat stream"],
    }
    stream_ratio = cpu["chat stream"] / cpu["stream"]
    token_ratio = per_token["chat stream"] / per_token["stream"]
    print(f"\nserver CPU per call, median of {args.rounds} rounds of {args.n} at {args.clients} clients:")
    print(f"  POST /v1/programs/default/predict   {cpu['predict']:.3f} ms")
    met = verdict(chat_ratio <= 1.1)
    print(f"  POST /v1/chat/completions           {cpu['chat']:.3f} ms   {chat_ratio:.2f}x  {met}")
    print(f"  POST /v1/programs/default/stream    {cpu['stream']:.3f} ms   ({tokens['stream']:.0f} deltas)")
    print(
        f"  chat completions, stream: true      {cpu['chat stream']:.3f} ms   {stream_ratio:.2f}x  "
        f"({tokens['chat stream']:.0f} chunks)"
    )
    print(
        f"  streaming's CPU per token: {per_token['stream'] * 1000:.1f} us (service's stream), "
        f"{per_token['chat stream'] * 1000:.1f} us (chat)   {token_ratio:.2f}x  {verdict(token_ratio <= 1.1)}"
    )


if __name__ == "__main__":
    main()
