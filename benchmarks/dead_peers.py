"""File descriptors after a storm of WebSocket clients that vanish with a TCP reset.

N clients open ``/v1/ws`` on ``dspy-trio serve``, each sends one prediction frame and leaves its answer
unread, then all close with a reset (``SO_LINGER`` 0, as a client that crashed or lost its network does).
The server's open descriptors (``/proc/PID/fd``, above its idle count) are read at fixed times after the
resets. The same app runs twice in one run: on our listener (``dspy_trio.web.listener``: a reset socket is
closed at once and its ping task stops) and, as the peer, on Hypercorn's own ``hypercorn.trio.serve`` (the
ping task of a dead connection sleeps out its interval, 20 s by default, and holds the socket)::

    python -m benchmarks.dead_peers                  # 1,000 clients, WebSocket pings every 20 s
    python -m benchmarks.dead_peers --clients 200 --ping 5

Bounded: N connections, one frame each, descriptors sampled for 8 s. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import trio
import wsproto
import wsproto.events

from benchmarks.hotpath_http import _free_port, _wait_health, stop

SAMPLES = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0)  # seconds after the resets
FRAME = '{"id":"a","type":"predict","inputs":{"question":"q"}}'


def start_server(*, stock: bool, ping: float) -> tuple[subprocess.Popen[bytes], int]:
    """``dspy-trio serve`` (simulated LM) on a free port; with ``stock``, on Hypercorn's own serve."""
    port = _free_port()
    env = {**os.environ, "LM_PROVIDER": "simulated", "DSPY_TRIO_WS_PING_INTERVAL": str(ping)}
    command = [sys.executable, "-m", "benchmarks.dead_peers"]
    command += ["--stock-serve"] if stock else ["--serve"]
    command += ["--", "--log-level", "WARNING", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    threading.Thread(target=lambda: process.stderr and process.stderr.read(), daemon=True).start()
    _wait_health(process, port, "the server")
    return process, port


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _open(port: int, sockets: list[trio.SocketStream], limiter: trio.CapacityLimiter) -> None:
    async with limiter:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(client.send(wsproto.events.Request(host="bench", target="/v1/ws")))
        while not any(isinstance(e, wsproto.events.AcceptConnection) for e in client.events()):
            client.receive_data(await stream.receive_some(65536))
        await stream.send_all(client.send(wsproto.events.TextMessage(FRAME)))
        sockets.append(stream)


async def storm(pid: int, port: int, clients: int) -> dict[str, float]:
    """Open ``clients`` WebSockets, send a frame on each, reset them all; descriptors above idle after."""
    idle = descriptors(pid)
    sockets: list[trio.SocketStream] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(100)
            for _ in range(clients):
                nursery.start_soon(_open, port, sockets, limiter)
    await trio.sleep(0.5)  # the answers arrive and stay unread
    figures: dict[str, float] = {"open": descriptors(pid) - idle}
    for stream in sockets:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
    reset_at = time.monotonic()
    for at in SAMPLES:
        await trio.sleep(max(0.0, reset_at + at - time.monotonic()))
        figures[f"{at:g}s"] = descriptors(pid) - idle
    return figures


def _serve(argv: list[str], *, stock: bool) -> None:
    """Run ``dspy_trio.web.cli`` (ours), or the same with ``dspy_trio.web.server``'s listener swapped for
    Hypercorn's serve."""
    from dspy_trio.web.cli import main as cli_main

    if stock:
        import hypercorn.trio

        from dspy_trio import web

        async def hypercorn_serve(app: object, config: object, **kwargs: object) -> None:
            kwargs.pop("dead_peer_timeout", None)
            await hypercorn.trio.serve(app, config, **kwargs)  # type: ignore[arg-type]

        web.server.serve_app = hypercorn_serve  # type: ignore[attr-defined]
    sys.exit(cli_main(argv))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--serve", "--stock-serve"):
        _serve(sys.argv[sys.argv.index("--") + 1 :], stock=sys.argv[1] == "--stock-serve")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--ping", type=float, default=20.0, help="WebSocket ping interval (seconds)")
    args = parser.parse_args()
    print(f"{args.clients} WebSocket clients reset with answers unread; pings every {args.ping:g} s")
    print("server descriptors above idle: while open, then at each time after the resets")
    header = ["server", "open", *(f"{at:g}s" for at in SAMPLES)]
    print("  " + "".join(f"{h:>22}" if i == 0 else f"{h:>8}" for i, h in enumerate(header)))
    for name, stock in (("web.listener (ours)", False), ("hypercorn.trio.serve", True)):
        process, port = start_server(stock=stock, ping=args.ping)
        try:
            figures = trio.run(storm, process.pid, port, args.clients)
        finally:
            stop(process)
        print("  " + f"{name:>22}" + "".join(f"{value:>8.0f}" for value in figures.values()), flush=True)


if __name__ == "__main__":
    main()
