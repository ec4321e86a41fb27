"""The floor of one prediction's CPU: what no engine can avoid for ``question -> answer`` over HTTP.

Two parts, each CPU per call in this process (``time.process_time``), the fake upstream in another:

  adapter   DSPy's ChatAdapter: format the messages for ``question -> answer``, parse the answer text.
  h11-post  one POST of a chat completion body on a kept-alive connection, with raw h11 on a Trio
            stream (one ``send_all``), the JSON answer parsed — no pool, no timeouts, no error mapping.

The floor is their sum. ``python -m benchmarks.floor`` prints them; ``benchmarks.hotpath`` measures
them in the same run as ``engine.predict``.
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

    from engine.lm import SimulatedLM

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


def h11_post_ms(url: str, n: int = 2000) -> float:
    """CPU ms of one POST with raw h11 on a kept-alive Trio stream, JSON answer parsed."""
    import dspy
    import h11
    import trio

    parts = urlsplit(url)
    target = (parts.path.rstrip("/") + "/chat/completions").encode()
    messages = dspy.ChatAdapter().format(dspy.Signature("question -> answer"), [], {"question": QUESTION})
    body: dict[str, Any] = {"model": "bench", "messages": messages}
    host = f"{parts.hostname}:{parts.port}"

    async def run() -> float:
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        connection = h11.Connection(h11.CLIENT)

        async def one() -> Any:
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers = [
                ("host", host),
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
            ]
            data = connection.send(h11.Request(method="POST", target=target, headers=headers))
            data += connection.send(h11.Data(data=payload))
            data += connection.send(h11.EndOfMessage())
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
            return json.loads(b"".join(chunks))

        for _ in range(50):
            await one()
        started = time.process_time()
        for _ in range(n):
            await one()
        elapsed = time.process_time() - started
        await stream.aclose()
        return elapsed / n * 1000

    return float(trio.run(run))


def measure(url: str, n: int = 2000) -> dict[str, float]:
    adapter, post = adapter_ms(n), h11_post_ms(url, n)
    return {"adapter_ms": adapter, "h11_post_ms": post, "floor_ms": adapter + post}


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
        f"{result['h11_post_ms']:.3f} ms = {result['floor_ms']:.3f} ms"
    )


if __name__ == "__main__":
    main()
