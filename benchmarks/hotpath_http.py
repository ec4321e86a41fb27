"""The hot path over HTTP in one run: the web layer's CPU per request against a bare Quart-Trio
endpoint, RSS per in-flight request at 64 and 1,000 connections, and overload at 2x capacity.

Processes: the fake upstream (its own), the server under test (its own: ``dspy-trio serve``, or the bare
peer ``benchmarks.peer_quart``), the engine alone (``benchmarks.hotpath``'s worker) and the load generator
(its own: raw HTTP/1.1 on Trio sockets, one keep-alive connection per client, requests pre-encoded, so its
CPU stays far below the server's). Server CPU is read from ``/proc/PID/stat`` by the load generator just
before and after a fixed number of requests, after a warm-up on the same connections::

    python -m benchmarks.hotpath_http                      # cpu, rss and overload, 2 rounds
    python -m benchmarks.hotpath_http --parts cpu --rounds 3 --n 4000
    python -m benchmarks.hotpath_http --parts profile      # cProfile of the server process under load
    python -m benchmarks.hotpath_http --parts cpu --baseline main   # also main's web layer, same run

Parts:
  cpu       (a) ``dspy-trio serve``'s CPU per ``POST /v1/programs/default/predict`` at --clients keep-alive
            clients (20 ms upstream); (b) ``dspy_trio.engine.predict`` CPU per prediction in process at 64
            concurrent against the same upstream (lean transport); (c) the bare peer's CPU per ``POST /echo``
            with the same body, clients and load generator. Prints (a - b) / c; goal <= 1.5. With
            ``--baseline REF`` the tree of REF (``git archive``) is measured in the same rounds: its
            ``dspy-trio serve`` (a'), its engine (b') and its refusal (d'), and (a' - b') / c beside ours.
  rss       RSS per in-flight request at each of --rss-connections (upstream latency --rss-latency, long
            enough for every request to be in flight at once): RSS at the plateau (every request in flight,
            confirmed by ``/metrics``' ``active_requests``) minus RSS idle after a warm-up, divided by the
            in-flight count; a cold round (the first at that size) and a warm one (the same again). Goal
            <= 50 KB.
  overload  open-loop 20 req/s (unloaded) then 160 req/s for 5 s against a capacity of 80 req/s (16 in
            flight + 16 queued, 200 ms upstream), as ``benchmarks.overload``; also the refusals' own time in
            the server (``Server-Timing: total``). Goals: admitted p99 <= 2x unloaded, refusal p99 <= 10 ms.
  profile   the server process under cProfile (a benchmark-only launcher around ``dspy_trio.web.cli``) during
  the
            cpu load: own time per request by package and the top functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._baseline import baseline_tree
from benchmarks._measure import ROOT, rss_mb, run_worker
from benchmarks._measure import median as _median
from benchmarks._measure import process_cpu as _process_cpu
from benchmarks._measure import verdict as _verdict
from benchmarks._upstream import start_upstream
from benchmarks.hotpath import profile_table

PREDICT_PATH = "/v1/programs/default/predict"
ECHO_PATH = "/echo"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_SERVER_TOTAL = re.compile(rb"\r\nserver-timing:[^\r]*total;dur=([0-9.]+)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_health(process: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{what} did not start")


def start_ours(
    upstream_url: str,
    *,
    in_flight: int,
    queued: int,
    profile_to: str | None = None,
    trace_to: str | None = None,
    log_level: str = "WARNING",
    tree: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``dspy-trio serve`` on the OpenAI-compatible backend (lean transport) against ``upstream_url``
    (``tree``: the serve of another tree, a ``--baseline``)."""
    port = _free_port()
    env = {
        **os.environ,
        **({"PYTHONPATH": str(tree)} if tree is not None else {}),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LM_PROVIDER": "openai",
        "LM_MODEL": "bench",
        "LM_API_BASE": upstream_url,
        "LM_MAX_ATTEMPTS": "1",
        "DSPY_TRIO_MAX_IN_FLIGHT": str(in_flight),
        "DSPY_TRIO_MAX_QUEUED": str(queued),
    }
    if trace_to is not None:
        command = [sys.executable, "-m", "benchmarks.hotpath_http", "--traced-serve", trace_to]
        command += ["--", "--log-level", log_level, "serve", "--port", str(port)]
    elif profile_to is None:
        command = [
            sys.executable,
            "-m",
            "dspy_trio.web.cli",
            "--log-level",
            log_level,
            "serve",
            "--port",
            str(port),
        ]
    else:
        command = [sys.executable, "-m", "benchmarks.hotpath_http", "--profiled-serve", profile_to]
        command += ["--", "--log-level", log_level, "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    threading.Thread(target=lambda: process.stderr and process.stderr.read(), daemon=True).start()
    _wait_health(process, port, "dspy-trio serve")
    return process, f"http://127.0.0.1:{port}"


def start_bare() -> tuple[subprocess.Popen[bytes], str]:
    """The bare Quart-Trio peer (``benchmarks.peer_quart``)."""
    port = _free_port()
    command = [sys.executable, "-m", "benchmarks.peer_quart", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    threading.Thread(target=lambda: process.stderr and process.stderr.read(), daemon=True).start()
    _wait_health(process, port, "the bare Quart-Trio peer")
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _profiled_serve(out: str, argv: list[str]) -> None:
    """Run ``dspy_trio.web.cli`` under cProfile; dump the stats to ``out`` when it returns (after SIGTERM's
    drain)."""
    import cProfile

    from dspy_trio.web.cli import main as cli_main

    profiler = cProfile.Profile()
    try:
        profiler.runcall(cli_main, argv)
    finally:
        profiler.dump_stats(out)


def _traced_serve(directory: str, argv: list[str]) -> None:
    """Run ``dspy_trio.web.cli`` with tracemalloc on; a thread writes a snapshot to ``DIR/NAME.snap``
    whenever the
    load generator creates ``DIR/NAME.want`` (benchmark-only: the product has no such hook)."""
    import pathlib
    import tracemalloc

    from dspy_trio.web.cli import main as cli_main

    tracemalloc.start(12)
    folder = pathlib.Path(directory)

    def snapshots() -> None:
        while True:
            for want in folder.glob("*.want"):
                want.unlink()
                snapshot = tracemalloc.take_snapshot()
                snapshot.dump(str(want.with_suffix(".tmp")))
                want.with_suffix(".tmp").rename(want.with_suffix(".snap"))
            time.sleep(0.02)

    threading.Thread(target=snapshots, daemon=True).start()
    cli_main(argv)


async def _snapshot(directory: str | None, name: str) -> None:
    """Ask a traced server (:func:`_traced_serve`) for a tracemalloc snapshot; wait until it is written."""
    import trio

    if directory is None:
        return
    folder = trio.Path(directory)
    await (folder / f"{name}.want").touch()
    while not await (folder / f"{name}.snap").exists():  # noqa: ASYNC110 - another process writes it
        await trio.sleep(0.02)


# ---------------------------------------------------------------------------------------- load generator


def _body(i: int) -> bytes:
    # The same size for every request; distinct questions (DSPy's cache is off anyway).
    return b'{"inputs":{"question":"question number %08d"}}' % i


def _request(path: str, i: int, host: str) -> bytes:
    body = _body(i)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Conn:
    """One keep-alive client connection speaking just enough HTTP/1.1 (Content-Length bodies)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Send one request; return the status, the head and the body of its response."""
        await self.stream.send_all(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[: end + 2])
        match = _CONTENT_LENGTH.search(head)
        if match is None:
            raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
        total = end + 4 + int(match.group(1))
        while len(self.buffer) < total:
            await self._fill()
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        return int(head[9:12]), head, body

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data


async def _connect(url: str, count: int) -> list[_Conn]:
    import trio

    host, port = url.removeprefix("http://").split(":")
    conns: list[_Conn] = []

    async def one() -> None:
        conns.append(_Conn(await trio.open_tcp_stream(host, int(port))))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return conns


async def _run_requests(conns: list[_Conn], path: str, first: int, n: int, host: str) -> dict[str, Any]:
    """``n`` requests over ``conns`` (each connection takes the next as soon as it is free)."""
    import trio

    requests = iter(range(first, first + n))
    statuses: dict[int, int] = {}
    latencies: list[float] = []

    async def client(conn: _Conn) -> None:
        for i in requests:
            started = time.perf_counter()
            status, _, _ = await conn.exchange(_request(path, i, host))
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(client, conn)
    return {"statuses": statuses, "latencies": latencies}


def _load_cpu(url: str, path: str, clients: int, n: int, pid: int, occupy: bool = False) -> dict[str, Any]:
    """Warm up on ``clients`` connections, then measure the server's CPU over ``n`` requests.

    With ``occupy``, one request is sent first and left in flight (the server under test has one slot
    and no queue, and a slow upstream), so that every measured request is refused."""
    import trio

    host = url.removeprefix("http://")

    async def run() -> dict[str, Any]:
        if occupy:
            occupier = (await _connect(url, 1))[0]
            await occupier.stream.send_all(_request(path, 0, host))
            while await _active_requests(url) < 1:  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.01)
        conns = await _connect(url, clients)
        await _run_requests(conns, path, 0, max(clients * 5, 300), host)  # warm-up
        server0, own0, wall0 = _process_cpu(pid), time.process_time(), time.perf_counter()
        done = await _run_requests(conns, path, 10**6, n, host)
        server, own = _process_cpu(pid) - server0, time.process_time() - own0
        wall = time.perf_counter() - wall0
        for conn in conns:
            await conn.stream.aclose()
        if occupy:
            await occupier.stream.aclose()
        latencies = sorted(done["latencies"])
        return {
            "server_cpu_ms": server / n * 1000,
            "client_cpu_ms": own / n * 1000,
            "rps": n / wall,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "statuses": done["statuses"],
        }

    return dict(trio.run(run))


async def _active_requests(url: str) -> int:
    import trio

    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        conn = _Conn(stream)
        request = f"GET /metrics HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n".encode()
        _, _, body = await conn.exchange(request)
        return int(json.loads(body)["active_requests"])
    finally:
        await stream.aclose()


def _load_rss(
    url: str, connections: int, pid: int, rounds: int, snapshots: str | None = None
) -> dict[str, Any]:
    """Per round: idle RSS, then ``connections`` requests at once; RSS once all are in flight."""
    import trio

    host = url.removeprefix("http://")

    async def run() -> dict[str, Any]:
        warm = await _connect(url, 8)
        await _run_requests(warm, PREDICT_PATH, 0, 40, host)
        for conn in warm:
            await conn.stream.aclose()
        results = []
        for r in range(rounds):
            await trio.sleep(0.5)
            await _snapshot(snapshots, f"idle-{r}")
            idle = rss_mb(pid) * 1024
            conns = await _connect(url, connections)
            connected = rss_mb(pid) * 1024
            samples: list[tuple[int, float]] = []  # (active requests, RSS KB) every 50 ms

            async def watch(samples: list[tuple[int, float]] = samples, r: int = r) -> None:
                snapped = False
                while True:
                    active = await _active_requests(url)
                    samples.append((active, rss_mb(pid) * 1024))
                    if active >= connections * 0.95 and not snapped:
                        await _snapshot(snapshots, f"plateau-{r}")
                        snapped = True
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                done = await _run_requests(conns, PREDICT_PATH, (r + 1) * 10**6, connections, host)
                nursery.cancel_scope.cancel()
            for conn in conns:
                await conn.stream.aclose()
            seen = max(active for active, _ in samples)
            plateau = statistics.median(rss for active, rss in samples if active == seen)
            results.append(
                {
                    "round": r,
                    "idle_kb": idle,
                    "connected_kb": connected,
                    "plateau_kb": plateau,
                    "in_flight": seen,
                    "all_in_flight": seen >= connections,
                    "kb_per_in_flight": (plateau - idle) / max(seen, 1),
                    "statuses": done["statuses"],
                }
            )
        return {"connections": connections, "rounds": results}

    return dict(trio.run(run))


def _run_load(kind: str, url: str, args: argparse.Namespace, pid: int, **extra: Any) -> dict[str, Any]:
    arguments = ["--load", kind, "--url", url, "--pid", str(pid), "--clients", str(args.clients)]
    arguments += ["--n", str(args.n)]
    for key, value in extra.items():
        arguments += [f"--{key.replace('_', '-')}", str(value)]
    return run_worker("benchmarks.hotpath_http", arguments, timeout=600)


def _engine_worker(upstream_url: str, n: int, tree: Path | None = None) -> dict[str, Any]:
    """The engine alone (``benchmarks.hotpath``'s worker), of this tree or of ``tree`` (a baseline)."""
    arguments = ["--worker", "predict:lean", "--url", upstream_url, "--n", str(n)]
    return run_worker("benchmarks.hotpath", arguments, tree=tree or ROOT)


# ------------------------------------------------------------------------------------------------ parts


def part_cpu(args: argparse.Namespace, results: dict[str, Any]) -> None:
    with baseline_tree(args.baseline or "none", prefix="hotpath-http-baseline-") as baseline:
        if baseline is not None:
            results["baseline"] = {"ref": args.baseline, "commit": baseline[1]}
        _cpu_rounds(args, results, baseline[0] if baseline is not None else None)


def _cpu_rounds(args: argparse.Namespace, results: dict[str, Any], tree: Path | None) -> None:
    upstream, upstream_url = start_upstream(0.02)
    slow_upstream, slow_url = start_upstream(600.0)
    order = ["ours", "engine", "bare", "refused"]
    if tree is not None:
        order += ["baseline", "baseline engine", "baseline refused"]
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in order}
    clients = max(args.clients, 64)
    try:
        for r in range(args.rounds):
            for kind in order if r % 2 == 0 else order[::-1]:
                where = tree if kind.startswith("baseline") else None
                if kind.endswith("engine"):
                    row = _engine_worker(upstream_url, args.n, where)
                elif kind.endswith("refused"):
                    server, url = start_ours(slow_url, in_flight=1, queued=0, tree=where)
                    try:
                        row = _run_load("refuse", url, args, server.pid, path=PREDICT_PATH)
                    finally:
                        stop(server)
                else:
                    if kind in ("ours", "baseline"):
                        server, url = start_ours(
                            upstream_url, in_flight=clients, queued=4 * clients, tree=where
                        )
                        path = PREDICT_PATH
                    else:
                        server, url = start_bare()
                        path = ECHO_PATH
                    try:
                        row = _run_load("cpu", url, args, server.pid, path=path)
                    finally:
                        stop(server)
                rows[kind].append(row)
                print(f"  cpu {kind:16s} {json.dumps(row)}", file=sys.stderr)
    finally:
        upstream.kill()
        slow_upstream.kill()
    results["cpu"] = rows


def _rss_latency(args: argparse.Namespace, connections: int) -> float:
    """The upstream latency of a row of part rss: --rss-latency, else long enough for every request to
    be admitted before the first answer comes back (3 s, plus 3 ms per connection over 500)."""
    return float(args.rss_latency or 3.0 + max(0, connections - 500) * 0.003)


def part_rss(args: argparse.Namespace, results: dict[str, Any]) -> None:
    rows = []
    for connections in args.rss_connections:
        latency = _rss_latency(args, connections)
        upstream, upstream_url = start_upstream(latency)
        try:
            server, url = start_ours(upstream_url, in_flight=connections, queued=connections)
            try:
                row = _run_load(
                    "rss", url, args, server.pid, connections=connections, rss_rounds=args.rss_rounds
                )
            finally:
                stop(server)
        finally:
            upstream.kill()
        rows.append({**row, "latency": latency})
        print(f"  rss {json.dumps(row)}", file=sys.stderr)
    results["rss"] = rows


def part_overload(args: argparse.Namespace, results: dict[str, Any]) -> None:
    import trio

    from benchmarks.serving import _overload, _warm

    upstream, upstream_url = start_upstream(0.2)
    runs = []
    try:
        for _ in range(args.overload_rounds):
            server, url = start_ours(upstream_url, in_flight=16, queued=16)
            try:
                trio.run(_warm, url)
                unloaded = trio.run(_overload, url, 20.0, 3.0)
                loaded = trio.run(_overload, url, 160.0, 5.0)
            finally:
                stop(server)
            runs.append({"unloaded": unloaded, "loaded": loaded})
            print(f"  overload {json.dumps(runs[-1])}", file=sys.stderr)
    finally:
        upstream.kill()
    results["overload"] = runs


def part_memory(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Where the Python heap grows per in-flight request: tracemalloc snapshots of a traced server at
    idle and at the plateau of part rss, compared by file (and the top lines)."""
    import tracemalloc

    upstream, upstream_url = start_upstream(args.rss_latency or 8.0)  # tracemalloc slows the server
    rows = []
    try:
        for connections in args.rss_connections:
            with tempfile.TemporaryDirectory() as tmp:
                server, url = start_ours(
                    upstream_url, in_flight=connections, queued=connections, trace_to=tmp
                )
                try:
                    load = _run_load(
                        "rss",
                        url,
                        args,
                        server.pid,
                        connections=connections,
                        rss_rounds=args.rss_rounds,
                        snapshots=tmp,
                    )
                finally:
                    stop(server)
                row: dict[str, Any] = {"connections": connections, "load": load, "rounds": []}
                for r in range(args.rss_rounds):
                    if not os.path.exists(os.path.join(tmp, f"plateau-{r}.snap")):
                        continue  # that round never had (nearly) every request in flight at once
                    idle = tracemalloc.Snapshot.load(os.path.join(tmp, f"idle-{r}.snap"))
                    plateau = tracemalloc.Snapshot.load(os.path.join(tmp, f"plateau-{r}.snap"))
                    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
                    idle, plateau = idle.filter_traces(ignore), plateau.filter_traces(ignore)
                    by_file = plateau.compare_to(idle, "filename")
                    by_line = plateau.compare_to(idle, "lineno")
                    total = sum(stat.size_diff for stat in by_file)
                    row["rounds"].append(
                        {
                            "python_kb_per_request": total / 1024 / connections,
                            "by_package": _by_package(by_file, connections),
                            "by_web_line": _by_web_line(plateau.compare_to(idle, "traceback"), connections),
                            "top_lines": [
                                (stat.size_diff / 1024 / connections, str(stat.traceback[0]))
                                for stat in by_line[: args.top]
                            ],
                        }
                    )
            rows.append(row)
            print(f"  memory {connections}: {json.dumps(row['load'])}", file=sys.stderr)
    finally:
        upstream.kill()
    results["memory"] = rows


def _by_web_line(stats: list[Any], connections: int) -> list[tuple[float, str]]:
    """Growth attributed to the innermost frame of ours (web/) on each allocation's stack (12 frames)."""
    lines: dict[str, float] = {}
    web = os.path.join(_ROOT, "web") + os.sep
    for stat in stats:
        where = next(
            (
                f"{frame.filename}:{frame.lineno}"
                for frame in reversed(stat.traceback)
                if frame.filename.startswith(web)
            ),
            "(no web/ frame within 12)",
        )
        lines[where] = lines.get(where, 0.0) + stat.size_diff / 1024 / connections
    return sorted(((kb, where.removeprefix(_ROOT + os.sep)) for where, kb in lines.items()), reverse=True)


def _by_package(stats: list[Any], connections: int) -> dict[str, float]:
    packages: dict[str, float] = {}
    for stat in stats:
        package = _package(stat.traceback[0].filename)
        packages[package] = packages.get(package, 0.0) + stat.size_diff / 1024 / connections
    return dict(sorted(packages.items(), key=lambda kv: -kv[1]))


def part_profile(args: argparse.Namespace, results: dict[str, Any]) -> None:
    refuse = args.profile_load == "refuse"
    upstream, upstream_url = start_upstream(600.0 if refuse else 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.profile_out or os.path.join(tmp, "server.prof")
        try:
            server, url = start_ours(
                upstream_url,
                in_flight=1 if refuse else 64,
                queued=0 if refuse else 256,
                profile_to=out,
            )
            try:
                row = _run_load(args.profile_load, url, args, server.pid, path=PREDICT_PATH)
            finally:
                stop(server)
        finally:
            upstream.kill()
        total, by_package, rows = profile_table(out, _package)  # before the directory goes
    # Everything the process did while profiled: start-up and warm-up included, so divide by all requests.
    n = args.n + max(args.clients * 5, 300)
    results["profile"] = {
        "load": row,
        "requests": n,
        "total_ms_per_request": total / n * 1000,
        "packages": {k: v / n * 1000 for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])},
        "top": [
            {"own_ms": tt / n * 1000, "cum_ms": ct / n * 1000, "calls": calls / n, "where": where}
            for tt, ct, calls, where in rows[: args.top]
        ],
        "ours": [
            {"own_ms": tt / n * 1000, "cum_ms": ct / n * 1000, "calls": calls / n, "where": where}
            for tt, ct, calls, where in sorted(
                (r for r in rows if r[3].startswith("web:")), key=lambda r: -r[1]
            )[: args.top]
        ],
    }


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/")[1].split("/")[0].removesuffix(".py")
    for ours in ("web/", "engine/lm/", "engine/", "benchmarks/"):
        if filename.startswith(os.path.join(_ROOT, ours)):
            return ours.strip("/").replace("/", ".")
    if filename.startswith("~") or "/lib/python3" in filename:
        return "stdlib"
    return "other"


# ---------------------------------------------------------------------------------------------- summary


def summary(results: dict[str, Any], args: argparse.Namespace) -> None:
    if "cpu" in results:
        rows = results["cpu"]
        ours, engine = _median(rows["ours"], "server_cpu_ms"), _median(rows["engine"], "cpu_ms")
        bare = _median(rows["bare"], "server_cpu_ms")
        print(
            f"\nCPU per request, medians of {args.rounds} rounds, {args.n} requests at {args.clients} clients"
        )
        print(
            f"  (a) dspy-trio serve, POST {PREDICT_PATH}: {ours:.3f} ms "
            f"({_median(rows['ours'], 'rps'):.0f} req/s, p99 {_median(rows['ours'], 'p99_ms'):.1f} ms)"
        )
        print(f"  (b) engine.predict in process, 64 concurrent (lean): {engine:.3f} ms")
        print(
            f"  (c) bare Quart-Trio JSON echo, POST {ECHO_PATH}: {bare:.3f} ms "
            f"({_median(rows['bare'], 'rps'):.0f} req/s)"
        )
        print(
            f"  web layer (a - b) = {ours - engine:.3f} ms = {(ours - engine) / bare:.2f}x the bare endpoint "
            f"(goal <= 1.5x: {_verdict((ours - engine) / bare <= 1.5)})"
        )
        refused = _median(rows["refused"], "server_cpu_ms")
        print(
            f"  (d) dspy-trio serve, the same POST refused (429, engine full): {refused:.3f} ms = "
            f"{refused / bare:.2f}x the bare endpoint, {refused / ours:.2f}x an answered request "
            f"(statuses {rows['refused'][-1]['statuses']})"
        )
        if rows.get("baseline"):
            base = _median(rows["baseline"], "server_cpu_ms")
            base_engine = _median(rows["baseline engine"], "cpu_ms")
            base_refused = _median(rows["baseline refused"], "server_cpu_ms")
            commit = results.get("baseline", {}).get("commit", "?")
            print(
                f"  (a') the baseline's ({commit}) serve: {base:.3f} ms "
                f"({_median(rows['baseline'], 'rps'):.0f} req/s); (b') its engine {base_engine:.3f} ms; "
                f"(d') its refusal {base_refused:.3f} ms"
            )
            print(
                f"  baseline web layer (a' - b') = {base - base_engine:.3f} ms = "
                f"{(base - base_engine) / bare:.2f}x the bare endpoint; this tree's is "
                f"{(ours - engine) / (base - base_engine):.2f}x the baseline's"
            )
        print(
            f"  load generator's own CPU per request: {_median(rows['ours'], 'client_cpu_ms'):.3f} ms "
            f"(ours), {_median(rows['bare'], 'client_cpu_ms'):.3f} ms (bare)"
        )
    if "rss" in results:
        print("\nRSS per in-flight request (RSS with every request in flight - RSS idle) / in flight")
        print(
            f"  {'conns':>6s} {'round':>6s} {'upstream':>8s} {'idle MB':>8s} {'conns MB':>8s} "
            f"{'plateau MB':>11s} {'in flight':>10s} {'KB each':>8s}"
        )
        for row in results["rss"]:
            for r in row["rounds"]:
                name = "cold" if r["round"] == 0 else "warm"
                flag = "" if r["all_in_flight"] else " (not all in flight at once)"
                print(
                    f"  {row['connections']:6d} {name:>6s} {row.get('latency', 0):7.1f}s "
                    f"{r['idle_kb'] / 1024:8.1f} {r['connected_kb'] / 1024:8.1f} "
                    f"{r['plateau_kb'] / 1024:11.1f} {r['in_flight']:10d} {r['kb_per_in_flight']:8.1f}"
                    f"  (goal <= 50 KB: {_verdict(r['kb_per_in_flight'] <= 50)}){flag}"
                )
    if "overload" in results:
        print(
            "\noverload: open-loop 160 req/s for 5 s against a capacity of 80 req/s (16 in flight x 200 ms)"
        )
        for run in results["overload"]:
            base, hot = run["unloaded"], run["loaded"]
            ratio = hot["admitted_p99_ms"] / base["admitted_p99_ms"]
            refused = hot["refused_p99_ms"] or float("nan")
            print(
                f"  unloaded p99 {base['admitted_p99_ms']:.0f} ms; admitted {hot['admitted']} p99 "
                f"{hot['admitted_p99_ms']:.0f} ms = {ratio:.2f}x (goal <= 2x: {_verdict(ratio <= 2)})"
            )
            print(
                f"  refused {hot['refused']} (Retry-After on {hot['with_retry_after']}): p50 "
                f"{hot['refused_p50_ms'] or float('nan'):.1f} ms, p99 {refused:.1f} ms (goal <= 10 ms: "
                f"{_verdict(refused <= 10)}); in the server p99 "
                f"{hot['refused_server_p99_ms'] or float('nan'):.1f} ms; failures {hot['failures']}"
            )
    if "memory" in results:
        print("\nPython heap growth per in-flight request (tracemalloc, plateau minus idle; KB per request)")
        for row in results["memory"]:
            for r, found in enumerate(row["rounds"]):
                name = "cold" if r == 0 else "warm"
                packages = ", ".join(f"{k} {v:.1f}" for k, v in list(found["by_package"].items())[:10])
                print(f"  {row['connections']} {name}: {found['python_kb_per_request']:.1f} KB: {packages}")
                for size, where in found["top_lines"][:15]:
                    print(f"    {size:7.2f} KB  {where}")
                print("    allocated under our frames (web/), by the innermost one:")
                for size, where in found["by_web_line"][:12]:
                    print(f"    {size:7.2f} KB  {where}")
    if "profile" in results:
        prof = results["profile"]
        print(
            f"\nprofile of the server process ({prof['requests']} requests incl. warm-up; cProfile inflates "
            f"times): {prof['total_ms_per_request']:.3f} ms own time per request"
        )
        print("  by package: " + ", ".join(f"{k} {v:.3f}" for k, v in list(prof["packages"].items())[:14]))
        for row in prof["top"]:
            print(
                f"  {row['own_ms']:.4f} own {row['cum_ms']:.4f} cum {row['calls']:6.2f} calls  {row['where']}"
            )
        print("  ours (web/), by cumulative time:")
        for row in prof["ours"]:
            print(
                f"  {row['own_ms']:.4f} own {row['cum_ms']:.4f} cum {row['calls']:6.2f} calls  {row['where']}"
            )


def main() -> None:
    if "--traced-serve" in sys.argv:
        at = sys.argv.index("--traced-serve")
        _traced_serve(sys.argv[at + 1], sys.argv[sys.argv.index("--") + 1 :])
        return
    if "--profiled-serve" in sys.argv:
        at = sys.argv.index("--profiled-serve")
        _profiled_serve(sys.argv[at + 1], sys.argv[sys.argv.index("--") + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["cpu", "rss", "overload"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of part cpu (servers alternate)")
    parser.add_argument("--n", type=int, default=3000, help="requests per CPU measurement")
    parser.add_argument("--clients", type=int, default=64, help="keep-alive clients of part cpu")
    parser.add_argument("--rss-connections", type=int, nargs="+", default=[64, 1000])
    parser.add_argument("--rss-latency", type=float, default=None, help="seconds (default: by size)")
    parser.add_argument("--rss-rounds", type=int, default=2, help="cold, then warm rounds")
    parser.add_argument("--overload-rounds", type=int, default=1)
    parser.add_argument("--profile-load", choices=["cpu", "refuse"], default="cpu")
    parser.add_argument("--profile-out", default=None, help="keep part profile's pstats file here")
    parser.add_argument("--top", type=int, default=30, help="rows of part profile")
    parser.add_argument("--json", default=None, help="also write raw results to this file")
    parser.add_argument(
        "--baseline", default=None, help="part cpu also measures this commit's tree (e.g. main), same rounds"
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load in ("cpu", "refuse"):
        occupy = args.load == "refuse"
        print(json.dumps(_load_cpu(args.url, args.path, args.clients, args.n, args.pid, occupy)))
        return
    if args.load == "rss":
        print(json.dumps(_load_rss(args.url, args.connections, args.pid, args.rss_rounds, args.snapshots)))
        return
    results: dict[str, Any] = {}
    parts = {
        "cpu": part_cpu,
        "rss": part_rss,
        "overload": part_overload,
        "profile": part_profile,
        "memory": part_memory,
    }
    for name in args.parts:
        parts[name](args, results)
    summary(results, args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
