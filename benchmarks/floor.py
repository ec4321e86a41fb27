"""The floor of one prediction's CPU: what no engine can avoid for ``question -> answer`` over HTTP.

Two parts, each CPU per call in this process (``time.process_time``), the fake upstream in another:

  adapter   DSPy's ChatAdapter: format the messages for ``question -> answer``, parse the answer text.
  h11-post  one POST of a chat completion body on a kept-alive connection, with raw h11 on a Trio
            stream (one ``send_all``), the JSON answer parsed — no pool, no timeouts, no error mapping.

The floor is their sum. ``python -m benchmarks.floor`` prints them; ``benchmarks.hotpath`` measures
them in the same run as ``dspy_trio.engine.predict``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

QUESTION = "question number 1"


def adapter_ms(n: int = 2000) -> float:
    """CPU ms of one ChatAdapter format + parse of ``question -> answer``."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    from dspy_trio.engine.lm import SimulatedLM

    adapter = dspy.ChatAdapter()
    signature = dspy.Signature("question -> answer")
    messages = adapter.format(signature, demos=[], inputs={"question": QUESTION})
    answer = SimulatedLM().render(messages)
    for _ in range(50):  # warm caches
        adapter.parse(signature, answer)
    started = time.process_time()
    for i in range(n):
        adapter.format(signature, demos=[], inputs={"question": f"question number {i}"})
        adapter.parse(signature, answer)
    return (time.process_time() - started) / n * 1000


async def raw_post(stream: Any, connection: Any, host: str, target: bytes, payload: bytes) -> bytes:
    """One POST of ``payload`` with raw h11 on a kept-alive Trio stream; the response body. Blocks for
    the exchange."""
    import h11

    headers = [("host", host), ("content-type", "application/json"), ("content-length", str(len(payload)))]
    data = connection.send(h11.Request(method="POST", target=target, headers=headers))
    data += connection.send(h11.Data(data=payload)) + connection.send(h11.EndOfMessage())
    await stream.send_all(data)
    chunks = []
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Data):
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
    connection.start_next_cycle()
    return b"".join(chunks)


def h11_post_ms(url: str, n: int = 2000, concurrency: int = 1) -> float:
    """CPU ms of one POST with raw h11 on a kept-alive Trio stream, JSON answer parsed; ``concurrency``
    connections each carry requests one after another (1: one request at a time; 64: the
    same load shape as ``dspy_trio.engine.predict`` at 64 concurrent, where the event loop's cost is
    shared)."""
    import dspy
    import h11
    import trio

    parts = urlsplit(url)
    target = (parts.path.rstrip("/") + "/chat/completions").encode()
    messages = dspy.ChatAdapter().format(dspy.Signature("question -> answer"), [], {"question": QUESTION})
    body: dict[str, Any] = {"model": "bench", "messages": messages}
    host = f"{parts.hostname}:{parts.port}"

    async def run() -> float:
        per_task = max(1, n // concurrency)
        elapsed = 0.0
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            go = trio.Event()
            done = trio.Semaphore(0)
            for _ in range(concurrency):
                nursery.start_soon(connection_task, ready, go, done, per_task)
            for _ in range(concurrency):
                await ready.acquire()
            started = time.process_time()
            go.set()
            for _ in range(concurrency):
                await done.acquire()
            elapsed = time.process_time() - started
        return elapsed / (per_task * concurrency) * 1000

    async def connection_task(
        ready: trio.Semaphore, go: trio.Event, done: trio.Semaphore, count: int
    ) -> None:
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        connection = h11.Connection(h11.CLIENT)

        async def one() -> Any:
            payload = json.dumps(body, separators=(",", ":")).encode()
            return json.loads(await raw_post(stream, connection, host, target, payload))

        for _ in range(20):
            await one()
        ready.release()
        await go.wait()
        for _ in range(count):
            await one()
        done.release()
        await stream.aclose()

    return float(trio.run(run))


def concurrent_floor(url: str, n: int = 1000, *, warm: bool = False, tuned: bool = False) -> dict[str, float]:
    """``n`` predictions' floor all at once, one OS thread: each formats ``question -> answer`` with
    DSPy's ChatAdapter, POSTs it with raw h11 on its own connection, parses the JSON and the answer.
    ``warm``: the ``n`` connections are opened (and used once) first, as a server's kept-alive pool
    would be; otherwise each task also connects. ``tuned``: the collector set as ``dspy-trio serve`` sets it
    (``dspy_trio.engine.tune_gc_for_serving``) before the measured round.
    Returns the wall seconds and CPU ms per prediction:
    what any engine's ``n``-concurrent wall time is measured against."""
    import dspy
    import h11
    import trio

    parts = urlsplit(url)
    target = (parts.path.rstrip("/") + "/chat/completions").encode()
    adapter = dspy.ChatAdapter()
    signature = dspy.Signature("question -> answer")
    host = f"{parts.hostname}:{parts.port}"

    async def post(stream: trio.SocketStream, connection: Any, question: str) -> Any:
        messages = adapter.format(signature, demos=[], inputs={"question": question})
        payload = json.dumps({"model": "bench", "messages": messages}, separators=(",", ":")).encode()
        body = await raw_post(stream, connection, host, target, payload)
        text = json.loads(body)["choices"][0]["message"]["content"]
        return adapter.parse(signature, text)

    async def run() -> dict[str, float]:
        streams: list[tuple[trio.SocketStream, Any]] = []
        if warm:

            async def open_one() -> None:
                stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
                connection = h11.Connection(h11.CLIENT)
                await post(stream, connection, "warm-up")
                streams.append((stream, connection))

            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(open_one)
        if tuned:
            from dspy_trio.engine import tune_gc_for_serving

            tune_gc_for_serving()
        ok = 0

        async def one(i: int) -> None:
            nonlocal ok
            if warm:
                stream, connection = streams[i]
            else:
                stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
                connection = h11.Connection(h11.CLIENT)
            await post(stream, connection, f"question number {i}")
            ok += 1
            if not warm:
                await stream.aclose()

        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        result = {
            "wall": time.perf_counter() - wall0,
            "cpu_ms": (time.process_time() - cpu0) / n * 1000,
            "ok": float(ok),
        }
        for stream, _connection in streams:
            await stream.aclose()
        return result

    return dict(trio.run(run))


def measure(url: str, n: int = 2000) -> dict[str, float]:
    """The floor's parts; ``floor_ms`` with one connection, ``floor64_ms`` with 64."""
    adapter, post, post64 = adapter_ms(n), h11_post_ms(url, n), h11_post_ms(url, n, 64)
    return {
        "adapter_ms": adapter,
        "h11_post_ms": post,
        "h11_post64_ms": post64,
        "floor_ms": adapter + post,
        "floor64_ms": adapter + post64,
    }


def main() -> None:
    from benchmarks._upstream import start_upstream

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    upstream, url = start_upstream(0.0)
    try:
        result = measure(url, args.n)
    finally:
        upstream.kill()
    print(
        f"floor per prediction, CPU: adapter {result['adapter_ms']:.3f} ms + h11 POST "
        f"{result['h11_post_ms']:.3f} ms = {result['floor_ms']:.3f} ms "
        f"(POSTs on 64 connections: {result['h11_post64_ms']:.3f} ms, floor {result['floor64_ms']:.3f} ms)"
    )


if __name__ == "__main__":
    main()
