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
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks._upstream import start_upstream
from benchmarks.http import _predict_load
from benchmarks.throughput import RESULTS

SERVERS = ("dspy-trio", "fastapi-8", "fastapi-tuned")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(kind: str, upstream_url: str, clients: int) -> tuple[subprocess.Popen[str], str]:
    """Start one server process and wait until it answers /health."""
    port = _free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if kind == "dspy-trio":
        env.update(
            LM_PROVIDER="openai",
            LM_MODEL="bench",
            LM_API_BASE=upstream_url,
            LM_MAX_ATTEMPTS="1",
            DSPY_TRIO_MAX_IN_FLIGHT=str(max(clients, 64)),
            DSPY_TRIO_MAX_QUEUED=str(4 * max(clients, 64)),
        )
        command = [sys.executable, "-m", "web.cli", "--log-level", "WARNING", "serve", "--port", str(port)]
    else:
        env.update(PEER_API_BASE=upstream_url, PEER_WORKERS="8" if kind == "fastapi-8" else str(clients))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256, 1000])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--cancels", type=int, default=20)
    args = parser.parse_args()
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    cancels: dict[str, Any] = {}
    upstream, upstream_url = start_upstream(args.latency)
    slow_upstream, slow_url = start_upstream(2.0)
    try:
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
        for kind in tqdm(SERVERS, desc="cancel", unit="server"):
            server, url = start_server(kind, slow_url, 64)
            try:
                cancels[kind] = trio.run(_cancel_trials, url, slow_url, args.cancels)
            finally:
                stop(server)
    finally:
        upstream.kill()
        slow_upstream.kill()

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
                f"{row['p99_ms']:9.1f} "
                f"{row['p99_ms'] / row['p50_ms']:8.2f} {row['failures']:5d} {ours['rps'] / row['rps']:7.2f}x"
            )
    print(
        "\nclient disconnects after 0.3 s (upstream latency 2 s): time until the upstream connection closed"
    )
    for kind, result in cancels.items():
        if result["closed"]:
            print(
                f"  {kind:14s} closed {result['closed']}/{result['trials']}: p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms; ran to completion: {result['ran_to_completion']}"
            )
        else:
            print(
                f"  {kind:14s} never closed; the upstream call ran to completion in "
                f"{result['ran_to_completion']}/{result['trials']} trials"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "cancel": cancels}, indent=2)
    )
    plot(rows, RESULTS / "serving.png")
    print(f"\nraw results: {RESULTS / 'serving.json'}; plot: {RESULTS / 'serving.png'}")


if __name__ == "__main__":
    main()
