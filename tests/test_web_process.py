"""The service as users run it: `dspy-trio serve` in its own process, SIGTERM, several workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start(*args: str, env: dict[str, str] | None = None) -> tuple[trio.Process, list[str]]:
    """Start `dspy-trio serve ...`; return the process once every worker logged its URL."""
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dspy_trio.web.cli", "serve", *args],
        stderr=subprocess.PIPE,
        # the raw-socket tests name the server "x" in Host (tests/web_helpers.py's RAW_HOST)
        env={"DSPY_TRIO_ALLOWED_HOSTS": "x", **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    urls: list[str] = []
    buffer = b""
    with trio.fail_after(60):
        while len(urls) < workers:
            chunk = await process.stderr.receive_some()
            if not chunk:
                raise AssertionError(f"server exited early: {buffer.decode()}")
            buffer += chunk
            urls = [
                line.split("serving on ")[1] for line in buffer.decode().splitlines() if "serving on " in line
            ]
    return process, urls


async def test_sigterm_drains_in_flight_requests_then_exits_cleanly() -> None:
    env = {"LM_PROVIDER": "simulated", "DSPY_TRIO_DRAIN_TIMEOUT": "5"}
    process, [url] = await start("--port", "0", env=env)
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).text == "OK"
            results = []

            async def call() -> None:
                results.append(await client.post("/predict", json={"question": "in flight at SIGTERM"}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await trio.sleep(0.05)
                process.send_signal(signal.SIGTERM)
            assert results[0].status_code == 200
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
async def test_several_workers_share_one_port() -> None:
    port = free_port()
    process, urls = await start("--port", str(port), "--workers", "2")
    try:
        assert urls == [f"http://127.0.0.1:{port}"] * 2
        async with trio.open_nursery() as nursery:
            for _ in range(20):

                async def call() -> None:
                    async with httpx.AsyncClient() as client:
                        response = await client.post(
                            f"http://127.0.0.1:{port}/predict", json={"question": "q"}
                        )
                        assert response.status_code == 200

                nursery.start_soon(call)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
