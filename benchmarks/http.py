"""The HTTP service under load: /predict and OpenAI's /v1/chat/completions (the same program) at several
concurrencies, SSE events/s, WebSocket messages/s, and server memory per in-flight request.

Three processes: the fake upstream (200 ms latency), `dspy-trio serve` on the Trio-native HTTP backend,
and this load generator (httpx / trio-websocket on Trio).

::

    python -m benchmarks.http                              # 64 and 1000 connections, 2,000 requests each
    python -m benchmarks.http --connections 64 256 --requests 1000
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from benchmarks._measure import percentile, rss_mb
from benchmarks._upstream import start_upstream


def _start_server(upstream_url: str, max_in_flight: int) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "LM_PROVIDER": "openai",
        "LM_MODEL": "bench",
        "LM_API_BASE": upstream_url,
        "DSPY_TRIO_MAX_IN_FLIGHT": str(max_in_flight),
        "DSPY_TRIO_MAX_QUEUED": str(max_in_flight * 4),
    }
    command = [sys.executable, "-m", "dspy_trio.web.cli", "--log-level", "INFO", "serve", "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    for line in process.stderr:
        if "serving on " in line:
            # Keep draining the server's log so that it never blocks on a full pipe.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, line.split("serving on ")[1].strip()
    raise SystemExit("the server did not start")


def _predict_body(i: int) -> dict[str, Any]:
    return {"question": f"question {i}"}


def _chat_body(i: int) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": f"question {i}"}]}


ROUTES = {"/predict": _predict_body, "/v1/chat/completions": _chat_body}


async def _predict_load(
    url: str, connections: int, requests: int, server_pid: int, route: str = "/predict"
) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    peak_rss = 0.0
    remaining = iter(range(requests))
    # One client (one keep-alive connection) per simulated user: httpx's pool bookkeeping grows with
    # the square of its connections, which would make the load generator the bottleneck.
    verify = ssl.create_default_context()

    async def worker() -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=url, timeout=60, verify=verify) as client:
            for i in remaining:
                started = time.perf_counter()
                try:
                    response = await client.post(route, json=ROUTES[route](i))
                except httpx.HTTPError:
                    failures += 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

    async def sample_rss() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, rss_mb(server_pid))
            await trio.sleep(0.05)

    idle_rss = rss_mb(server_pid)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        async with trio.open_nursery() as workers:
            for _ in range(connections):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    wall = time.perf_counter() - started
    return {
        "connections": connections,
        "rps": len(latencies) / wall,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "failures": failures,
        "rss_per_inflight_kb": max(0.0, peak_rss - idle_rss) * 1024 / connections,
    }


async def _sse_rate(url: str, streams: int) -> float:
    events = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal events
        body = {"inputs": {"question": f"stream {i}"}}
        async with client.stream("POST", "/v1/programs/default/stream", json=body) as response:
            async for line in response.aiter_lines():
                events += line.startswith("event:")

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client, trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(one, client, i)
    return events / (time.perf_counter() - started)


async def _ws_rate(url: str, sockets: int, questions: int) -> float:
    messages = 0

    async def one(i: int) -> None:
        nonlocal messages
        async with open_websocket_url(url.replace("http", "ws", 1) + "/ws") as ws:
            for q in range(questions):
                await ws.send_message(f"question {i}.{q}")
                while await ws.get_message() != "[DONE]":
                    messages += 1
                messages += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(sockets):
            nursery.start_soon(one, i)
    return messages / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace, url: str, server_pid: int) -> None:
    async with httpx.AsyncClient(base_url=url) as client:  # warm-up
        for _ in range(20):
            await client.post("/predict", json={"question": "warm-up"})
    for route in ROUTES:
        print(f"\n{route}, upstream latency {args.latency * 1000:.0f} ms, {args.requests} requests per row")
        print(
            f"{'connections':>11s} {'req/s':>8s} {'ideal':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99/p50':>8s} "
            f"{'KB/in-flight':>13s} {'fail':>5s}"
        )
        for connections in args.connections:
            row = await _predict_load(url, connections, args.requests, server_pid, route)
            ideal = connections / args.latency
            print(
                f"{connections:11d} {row['rps']:8.0f} {ideal:8.0f} {row['p50_ms']:8.1f} "
                f"{row['p99_ms']:8.1f} {row['p99_ms'] / row['p50_ms']:8.2f} "
                f"{row['rss_per_inflight_kb']:13.1f} {row['failures']:5d}"
            )
    sse_rate = await _sse_rate(url, args.streams)
    print(f"\nSSE: {sse_rate:,.0f} events/s over {args.streams} concurrent streams")
    ws_rate = await _ws_rate(url, args.streams, 5)
    print(f"WebSocket /ws: {ws_rate:,.0f} messages/s over {args.streams} sockets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 1000])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--streams", type=int, default=50)
    args = parser.parse_args()
    upstream, upstream_url = start_upstream(args.latency)
    server, url = _start_server(upstream_url, max_in_flight=max(args.connections))
    try:
        trio.run(main_async, args, url, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        upstream.kill()


if __name__ == "__main__":
    main()
