"""A deliberately minimal OpenAI-compatible upstream for measuring the client side at high concurrency.

The project's fake upstream (``dspy_trio.engine.testing.FakeUpstream``) records every request, watches for
client closes, renders an answer from the prompt and can inject faults: ~1.4 ms of CPU per answer, so at 1,000
concurrent requests its own core, not the client under test, decides the wall time. This one answers
every ``POST`` with the same pre-built chat completion (``[[ ## answer ## ]]`` for a ``question ->
answer`` program) after ``--latency`` seconds: per request one read of the head and body, one sleep and
one ``send_all``. No h11, no JSON parsing: it trusts its client (benchmarks only; never a test fixture).

::

    python -m benchmarks._canned_upstream --latency 1.0     # prints "canned upstream listening on URL"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys

import trio

ANSWER = "[[ ## answer ## ]]\nA canned answer.\n\n[[ ## completed ## ]]"


def response_bytes() -> bytes:
    body = json.dumps(
        {
            "id": "canned",
            "object": "chat.completion",
            "model": "bench",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 60, "completion_tokens": 10, "total_tokens": 70},
        }
    ).encode()
    head = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def serve(latency: float, port: int = 0) -> None:
    answer = response_bytes()

    async def connection(stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer[length:]
                await trio.sleep(latency)
                await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    port = listeners[0].socket.getsockname()[1]
    print(f"canned upstream listening on http://127.0.0.1:{port}/v1", flush=True)
    await trio.serve_listeners(connection, listeners)


def start_canned_upstream(latency: float) -> tuple[subprocess.Popen[str], str]:
    """Start the canned upstream in its own process; return the process and its API root."""
    command = [sys.executable, "-m", "benchmarks._canned_upstream", "--latency", str(latency)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("canned upstream listening on "):
        process.kill()
        raise SystemExit(f"canned upstream did not start: {line!r}")
    return process, line.removeprefix("canned upstream listening on ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.latency, args.port)


if __name__ == "__main__":
    main()
