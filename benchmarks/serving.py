"""Workloads 2 and 4: the HTTP service against DSPy's FastAPI recipe, in one run.

2. ``/predict`` under 64, 256 and 1,000 clients with a 200 ms upstream: req/s, p50, p99, for
   ``dspy-trio serve`` and FastAPI + uvicorn + ``dspy.asyncify`` at its default 8 workers and tuned to the
   client count. Each server is a fresh process per row; rows interleave the servers.
4. Cancellation: a client sends ``/predict`` (upstream latency 2 s) and disconnects after 0.3 s; the fake
   upstream records when (wall clock) the server closed the upstream connection, or that the call ran to
   completion.

::

    python -m benchmarks.serving
    python -m benchmarks.serving --clients 64 256 --requests 1000 --cancels 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks._optional import plot_if_possible, require
from benchmarks._upstream import start_upstream
from benchmarks.http import _predict_load
from benchmarks.throughput import RESULTS

SERVERS = ("dspy-trio", "fastapi-8", "fastapi-tuned")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    kind: str, upstream_url: str, clients: int, *, in_flight: int | None = None, queued: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start one server process and wait until it answers /health."""
    port = _free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if kind == "dspy-trio":
        env.update(
            LM_PROVIDER="openai",
            LM_MODEL="bench",
            LM_API_BASE=upstream_url,
            LM_MAX_ATTEMPTS="1",
            DSPY_TRIO_MAX_IN_FLIGHT=str(in_flight or max(clients, 64)),
            DSPY_TRIO_MAX_QUEUED=str(4 * max(clients, 64) if queued is None else queued),
        )
        command = [
            sys.executable,
            "-m",
            "dspy_trio.web.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            str(port),
        ]
    else:
        workers = 8 if kind == "fastapi-8" else (in_flight or clients)
        env.update(PEER_API_BASE=upstream_url, PEER_WORKERS=str(workers))
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.peer_fastapi:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "4096",
        ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: process.stderr and process.stderr.read(), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{kind} did not start")


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


async def _warm(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(10):
            await client.post("/predict", json={"question": "warm-up"})


async def _cancel_trials(url: str, upstream_url: str, trials: int) -> dict[str, Any]:
    """Disconnect after 0.3 s; how long until the upstream connection closed (or did the call complete)?"""
    closes: list[float] = []
    async with httpx.AsyncClient(base_url=upstream_url.removesuffix("/v1"), timeout=30) as control:
        before = len((await control.get("/_fake/records")).json()["records"])
        left: list[float] = []
        for i in range(trials):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                with trio.move_on_after(0.3):
                    await client.post("/predict", json={"question": f"cancel me {i}"})
            left.append(time.time())
        await trio.sleep(2.5)  # long enough for an abandoned call to complete upstream
        records = (await control.get("/_fake/records")).json()["records"][before:]
    completed = 0
    for record, gone in zip(records, left, strict=False):
        if record["client_closed_wall"] is not None:
            closes.append(record["client_closed_wall"] - gone)
        elif record["completed_wall"] is not None:
            completed += 1
    return {
        "trials": trials,
        "closed": len(closes),
        "ran_to_completion": completed,
        "p50_ms": statistics.median(closes) * 1000 if closes else None,
        "p99_ms": sorted(closes)[min(len(closes) - 1, int(len(closes) * 0.99))] * 1000 if closes else None,
    }


async def _stream_trials(url: str, kind: str, streams: int, first_token_delay: float) -> dict[str, Any]:
    """TTFT added over the upstream's first-token delay (sequential streams), and tokens/s with
    ``streams`` concurrent streams, over SSE (both) and WebSocket (dspy-trio's /ws)."""

    def is_token(line: str) -> bool:
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            return False
        if kind == "dspy-trio":
            return True
        try:  # the recipe's streaming_response: {"predict_name", "signature_field_name", "chunk"}
            return "chunk" in json.loads(line[len("data:") :])
        except ValueError:
            return False

    failures = 0

    async def one_sse(client: httpx.AsyncClient, i: int) -> tuple[float, int, float]:
        nonlocal failures
        started, first, tokens = time.perf_counter(), math.nan, 0
        try:
            async with client.stream("POST", "/stream", json={"question": f"stream {i}"}) as response:
                async for line in response.aiter_lines():
                    if is_token(line):
                        tokens += 1
                        if math.isnan(first):
                            first = time.perf_counter() - started
        except httpx.HTTPError:
            failures += 1  # the stream broke off
        return first, tokens, time.perf_counter() - started

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        ttft = [(await one_sse(client, i))[0] - first_token_delay for i in range(10)]
        totals: list[tuple[float, int, float]] = []
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(streams):

                async def run(i: int = i) -> None:
                    totals.append(await one_sse(client, i))

                nursery.start_soon(run)
        wall = time.perf_counter() - started
    measured = [t for t in ttft if not math.isnan(t)]
    result: dict[str, Any] = {
        "ttft_added_p50_ms": statistics.median(measured) * 1000 if measured else math.nan,
        "sse_tokens_per_s": sum(t for _, t, _ in totals) / wall,
        "broken_streams": failures,
    }
    if kind == "dspy-trio":
        from trio_websocket import open_websocket_url

        tokens = 0
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(streams):

                async def socket(i: int = i) -> None:
                    nonlocal tokens
                    async with open_websocket_url(url.replace("http", "ws", 1) + "/ws") as ws:
                        await ws.send_message(f"ws stream {i}")
                        while await ws.get_message() != "[DONE]":
                            tokens += 1

                nursery.start_soon(socket)
        result["ws_tokens_per_s"] = tokens / (time.perf_counter() - started)
    return result


async def _overload(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop load at ``rate`` requests/s: latency of the admitted, time to refuse the rest, and each
    refusal's own time in the server (its ``Server-Timing: total``; dspy-trio's only)."""
    admitted: list[float] = []
    refused: list[float] = []
    refused_server: list[float] = []
    with_retry_after = failures = 0
    verify = ssl.create_default_context()
    async with httpx.AsyncClient(
        base_url=url, timeout=120, verify=verify, limits=httpx.Limits(max_connections=4096)
    ) as client:

        async def one(i: int) -> None:
            nonlocal with_retry_after, failures
            started = time.perf_counter()
            try:
                response = await client.post("/predict", json={"question": f"overload {i}"})
            except httpx.HTTPError:
                failures += 1
                return
            took = time.perf_counter() - started
            if response.status_code == 200:
                admitted.append(took)
            elif response.status_code in (429, 503):
                refused.append(took)
                with_retry_after += "retry-after" in response.headers
                match = re.search(r"total;dur=([0-9.]+)", response.headers.get("server-timing", ""))
                if match:
                    refused_server.append(float(match.group(1)) / 1000)
            else:
                failures += 1

        async with trio.open_nursery() as nursery:
            for i in range(int(rate * seconds)):
                nursery.start_soon(one, i)
                await trio.sleep(1 / rate)

    def p(samples: list[float], q: float) -> float | None:
        return sorted(samples)[min(len(samples) - 1, int(len(samples) * q))] * 1000 if samples else None

    return {
        "admitted": len(admitted),
        "admitted_p50_ms": p(admitted, 0.5),
        "admitted_p99_ms": p(admitted, 0.99),
        "refused": len(refused),
        "refused_p50_ms": p(refused, 0.5),
        "refused_p99_ms": p(refused, 0.99),
        "refused_server_p99_ms": p(refused_server, 0.99),
        "with_retry_after": with_retry_after,
        "failures": failures,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    levels = sorted({row["clients"] for row in rows})
    for kind in SERVERS:
        mine = [next(r for r in rows if r["server"] == kind and r["clients"] == c) for c in levels]
        left.plot(levels, [r["rps"] for r in mine], marker="o", label=kind)
        right.plot(levels, [r["p99_ms"] for r in mine], marker="o", label=kind)
    for axes, title in ((left, "req/s"), (right, "p99 latency, ms")):
        axes.set_xscale("log")
        axes.set_xlabel("clients")
        axes.set_title(title)
        axes.legend()
    right.set_yscale("log")
    figure.suptitle("/predict over HTTP, 200 ms upstream")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_extras(
    cancels: dict[str, Any], streams: dict[str, Any], overload: dict[str, Any], path: Path
) -> None:
    """Bar charts for cancellation, streaming and overload (whichever were run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (cancels, streams, overload) if p]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    axes_iter = iter(axes_list[0])
    if cancels:
        axes = next(axes_iter)
        names = list(cancels)
        closed = [cancels[n]["p99_ms"] or 0.0 for n in names]
        bars = axes.bar(names, closed)
        for bar, name in zip(bars, names, strict=True):
            if not cancels[name]["closed"]:
                axes.annotate(
                    "never closed:\nran to completion",
                    (bar.get_x() + bar.get_width() / 2, 0.5),
                    ha="center",
                    fontsize=8,
                )
        axes.set_title("disconnect -> upstream closed, p99 ms")
    if streams:
        axes = next(axes_iter)
        names = list(streams)
        axes.bar(names, [streams[n]["sse_tokens_per_s"] for n in names])
        for i, name in enumerate(names):
            if streams[name]["broken_streams"]:
                axes.annotate(
                    f"{streams[name]['broken_streams']} streams broke", (i, 0), ha="center", fontsize=8
                )
        axes.set_title("SSE tokens/s")
    if overload:
        axes = next(axes_iter)
        names = list(overload)
        width = 0.4
        xs = range(len(names))
        axes.bar(
            [x - width / 2 for x in xs],
            [overload[n]["unloaded"]["admitted_p99_ms"] for n in names],
            width,
            label="unloaded",
        )
        axes.bar(
            [x + width / 2 for x in xs],
            [overload[n]["loaded"]["admitted_p99_ms"] for n in names],
            width,
            label="2x capacity",
        )
        axes.set_xticks(list(xs), names)
        axes.set_title("admitted p99, ms")
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256, 1000])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument(
        "--part",
        nargs="+",
        default=["predict", "cancel", "stream", "overload"],
        choices=["predict", "cancel", "stream", "overload"],
    )
    parser.add_argument("--streams", type=int, default=20)
    args = parser.parse_args()
    require("fastapi", "uvicorn", why="the peers this benchmark compares dspy-trio with")
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    cancels: dict[str, Any] = {}
    streams: dict[str, Any] = {}
    overload: dict[str, Any] = {}
    upstreams = []
    try:
        if "predict" in args.part:
            upstream, upstream_url = start_upstream(args.latency)
            upstreams.append(upstream)
            plan = [
                (c, s) for i, c in enumerate(args.clients) for s in (SERVERS if i % 2 == 0 else SERVERS[::-1])
            ]
            for clients, kind in tqdm(plan, desc="http", unit="run"):
                server, url = start_server(kind, upstream_url, clients)
                try:
                    trio.run(_warm, url)
                    row = trio.run(_predict_load, url, clients, max(args.requests, 2 * clients), server.pid)
                    rows.append({"server": kind, "clients": clients, **row})
                finally:
                    stop(server)
        if "cancel" in args.part:
            slow_upstream, slow_url = start_upstream(2.0)
            upstreams.append(slow_upstream)
            for kind in tqdm(SERVERS, desc="cancel", unit="server"):
                server, url = start_server(kind, slow_url, 64)
                try:
                    cancels[kind] = trio.run(_cancel_trials, url, slow_url, args.cancels)
                finally:
                    stop(server)
        if "stream" in args.part:
            stream_upstream, stream_url = start_upstream(first_token_delay=0.1, token_delay=0.002, words=200)
            upstreams.append(stream_upstream)
            for kind in tqdm(("dspy-trio", "fastapi-tuned"), desc="stream", unit="server"):
                server, url = start_server(kind, stream_url, args.streams)
                try:
                    trio.run(_warm, url)
                    streams[kind] = trio.run(_stream_trials, url, kind, args.streams, 0.1)
                finally:
                    stop(server)
        if "overload" in args.part:
            over_upstream, over_url = start_upstream(args.latency)
            upstreams.append(over_upstream)
            for kind in tqdm(("dspy-trio", "fastapi-tuned"), desc="overload", unit="server"):
                # Capacity 16 in flight / 0.2 s = 80 req/s (dspy-trio also queues 16); offered: twice that.
                server, url = start_server(kind, over_url, 16, in_flight=16, queued=16)
                try:
                    trio.run(_warm, url)
                    unloaded = trio.run(_overload, url, 20.0, 3.0)
                    loaded = trio.run(_overload, url, 160.0, 5.0)
                    overload[kind] = {"unloaded": unloaded, "loaded": loaded}
                finally:
                    stop(server)
    finally:
        for upstream in upstreams:
            upstream.kill()

    report(args, rows, cancels, streams, overload)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(
        json.dumps(
            {"args": vars(args), "rows": rows, "cancel": cancels, "stream": streams, "overload": overload},
            indent=2,
        )
    )
    print(f"\nraw results: {RESULTS / 'serving.json'}")
    if rows:
        plot_if_possible(lambda: plot(rows, RESULTS / "serving.png"), RESULTS / "serving.png")
    if cancels or streams or overload:
        extras = RESULTS / "serving_extras.png"
        plot_if_possible(lambda: plot_extras(cancels, streams, overload, extras), extras)


def report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    cancels: dict[str, Any],
    streams: dict[str, Any],
    overload: dict[str, Any],
) -> None:
    if rows:
        print(f"\n/predict over HTTP, upstream latency {args.latency * 1000:.0f} ms")
        print(
            f"{'clients':>7s} {'server':14s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>9s} "
            f"{'p99/p50':>8s} {'fail':>5s} {'trio vs':>8s}"
        )
        for clients in args.clients:
            ours = next(r for r in rows if r["server"] == "dspy-trio" and r["clients"] == clients)
            for row in (r for r in rows if r["clients"] == clients):
                print(
                    f"{clients:7d} {row['server']:14s} {row['rps']:8.1f} {row['p50_ms']:8.1f} "
                    f"{row['p99_ms']:9.1f} {row['p99_ms'] / row['p50_ms']:8.2f} {row['failures']:5d} "
                    f"{ours['rps'] / row['rps']:7.2f}x"
                )
    if cancels:
        print(
            "\nclient disconnects after 0.3 s (upstream latency 2 s): "
            "time until the upstream connection closed"
        )
        for kind, result in cancels.items():
            if result["closed"]:
                print(
                    f"  {kind:14s} closed {result['closed']}/{result['trials']}: "
                    f"p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms; ran to completion: {result['ran_to_completion']}"
                )
            else:
                print(
                    f"  {kind:14s} never closed; the upstream call ran to completion in "
                    f"{result['ran_to_completion']}/{result['trials']} trials"
                )
    if streams:
        print(
            "\nstreaming (upstream: first token 100 ms, 2 ms/token, 200-word answers; "
            f"{args.streams} streams)"
        )
        for kind, result in streams.items():
            ws = (
                f", WebSocket {result['ws_tokens_per_s']:,.0f} tokens/s"
                if "ws_tokens_per_s" in result
                else ""
            )
            print(
                f"  {kind:14s} TTFT added p50 {result['ttft_added_p50_ms']:.1f} ms; "
                f"SSE {result['sse_tokens_per_s']:,.0f} tokens/s{ws}; "
                f"broken streams {result['broken_streams']}"
            )
    if overload:
        print(
            "\noverload: open-loop 160 req/s for 5 s against a capacity of 80 req/s (16 in flight x 200 ms)"
        )
        for kind, result in overload.items():
            base, hot = result["unloaded"], result["loaded"]
            refused = (
                f"refused {hot['refused']} (p99 {hot['refused_p99_ms']:.1f} ms, "
                f"Retry-After on {hot['with_retry_after']})"
                if hot["refused"]
                else "refused none"
            )
            print(
                f"  {kind:14s} unloaded p99 {base['admitted_p99_ms']:.0f} ms; "
                f"loaded: admitted {hot['admitted']} "
                f"p99 {hot['admitted_p99_ms']:.0f} ms; {refused}; failures {hot['failures']}"
            )


if __name__ == "__main__":
    main()
