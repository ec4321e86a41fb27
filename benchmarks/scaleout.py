"""Scale-out: dspy-trio replicas behind a real HAProxy (deploy/haproxy.cfg), sharing one Redis.

    python -m benchmarks.scaleout [--seconds 8] [--quota-seconds 20] [--rpm 60] [--contrast]
    python -m benchmarks.scaleout --cost-only --workers 2 [--cost-seconds 8] [--rounds 2]
    python -m benchmarks.scaleout --script-cost

One run starts redis-server, the fake upstream (its own process), two replicas (``dspy-trio serve``,
each its own process and port, both with ``DSPY_TRIO_REDIS_URL``) and two HAProxy instances built from
deploy/haproxy.cfg (one with the first replica only, one with both), then measures:

1. Throughput: predictions per second through HAProxy, 1 replica vs 2 (no rate limit, same client load),
   and one replica without the proxy (what HAProxy costs here).
2. Quota adherence: a program whose LM has an RPM quota, hammered through HAProxy from both replicas; the
   requests the upstream saw vs what the quota allows (``rpm`` in any 60 seconds: ``rpm`` for a run
   shorter than a minute). With ``--contrast``, the same against two replicas without Redis (each worker
   applies the full quota).
3. Redis round-trips per prediction (heartbeats included), from the replicas' ``dspy_trio_cluster_*``.
4. SSE and WebSocket through HAProxy: one stream each, checked for a final event.
5. What Redis costs: one replica (``--workers`` workers, no proxy) with Redis and one without, loaded in
   turn (``--rounds``, medians) on ``default`` (no rate limit) and ``metered`` (an RPM quota it never
   reaches, so every prediction takes it): predictions per second each way, and the Redis commands per
   prediction, counted by the server (``INFO commandstats``, every command a Lua script runs included,
   heartbeats included) and the round trips per prediction the replica counted.
6. ``--script-cost``: Redis CPU per call of the quota's Lua script as its window holds more entries (the
   server's ``usec_per_call`` for EVALSHA, 1,000 calls at each size, one process, no contention).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
import trio_websocket

from benchmarks._upstream import start_upstream

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, seconds: float = 120) -> None:
    limit = time.monotonic() + seconds
    while time.monotonic() < limit:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {seconds}s")


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is missing: apt-get install redis-server (bash .ci/ensure-redis)")
    port = free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_port(port)
    return process, f"redis://127.0.0.1:{port}/0"


def write_config(upstream: str, rpm: float) -> Path:
    """Three programs on the same fake upstream: ``default`` unlimited, ``limited`` with an RPM quota,
    ``metered`` with a quota it never reaches."""
    text = f"""
[lms.default]
provider = "openai"
model = "fake-model"
api_base = "{upstream}"
api_key = "bench"

[lms.limited]
provider = "openai"
model = "fake-model"
api_base = "{upstream}"
api_key = "bench"
rate_limit = {{ rpm = {rpm} }}
retry = {{ max_attempts = 1 }}

[lms.metered]
provider = "openai"
model = "fake-model"
api_base = "{upstream}"
api_key = "bench"
rate_limit = {{ rpm = 100000000 }}

[programs.limited]
source = "question -> answer"
lm = "limited"

[programs.metered]
source = "question -> answer"
lm = "metered"
"""
    path = Path(tempfile.mkstemp(prefix="scaleout-", suffix=".toml")[1])
    path.write_text(text)
    return path


def start_replica(config: Path, redis_url: str | None, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "DSPY_TRIO_CONFIG": str(config), "DSPY_TRIO_MAX_QUEUED": "100000"}
    env.pop("DSPY_TRIO_REDIS_URL", None)
    if redis_url:
        env["DSPY_TRIO_REDIS_URL"] = redis_url
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
    command += ["--workers", str(workers)]
    process = subprocess.Popen(command, env=env)
    return process, port


def wait_ready(port: int, seconds: float = 180) -> None:
    limit = time.monotonic() + seconds
    while time.monotonic() < limit:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"replica on {port} not ready after {seconds}s")


def start_haproxy(backends: list[int]) -> tuple[subprocess.Popen[bytes], int, Path]:
    """deploy/haproxy.cfg with its bind and ``server`` lines pointed at this run's ports."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        raise SystemExit("haproxy is missing: apt-get install haproxy (bash .ci/ensure-redis)")
    port = free_port()
    lines = []
    for line in HAPROXY_CONFIG.read_text().splitlines():
        if line.strip().startswith("server replica"):
            continue
        line = re.sub(r"bind 127\.0\.0\.1:\d+", f"bind 127.0.0.1:{port}", line)
        lines.append(line)
        if line.strip().startswith("default-server"):
            lines += [f"    server replica{i + 1} 127.0.0.1:{p}" for i, p in enumerate(backends)]
    config = Path(tempfile.mkstemp(prefix="haproxy-", suffix=".cfg")[1])
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([haproxy, "-f", str(config)])
    wait_port(port)
    return process, port, config


async def load(url: str, program: str, seconds: float, concurrency: int) -> tuple[int, int, float]:
    """``concurrency`` clients posting predictions for ``seconds``; (ok, other statuses, elapsed)."""
    ok = failed = 0
    started = time.monotonic()
    stop_at = started + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    questions = itertools.count()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            nonlocal ok, failed
            while time.monotonic() < stop_at:
                # Distinct questions: identical ones in flight at once would share one upstream call.
                response = await client.post(
                    f"/v1/programs/{program}/predict",
                    json={"inputs": {"question": f"scale {next(questions)}"}},
                    headers={"X-Request-Timeout": "2"},
                )
                if response.status_code == 200:
                    ok += 1
                else:
                    failed += 1
                    await trio.sleep(0.05)  # a refused request comes back at once: do not spin

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return ok, failed, time.monotonic() - started


def upstream_records(upstream_root: str) -> int:
    base = upstream_root.removesuffix("/v1")
    return len(httpx.get(f"{base}/_fake/records", timeout=10).json()["records"])


def redis_commands(redis_url: str) -> int:
    """Commands the Redis server has run (``INFO commandstats``: scripts' own commands included),
    not counting the INFO commands that read it."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["redis-cli", "-p", port, "INFO", "commandstats"], capture_output=True, text=True, check=True
    ).stdout
    total = 0
    for line in out.splitlines():
        if line.startswith("cmdstat_") and not line.startswith("cmdstat_info:"):
            total += int(line.split("calls=", 1)[1].split(",", 1)[0])
    return total


def measure_script_cost(redis_url: str) -> dict[int, float]:
    """Part 6: the server's microseconds per EVALSHA of the quota script, by entries in its window."""
    from dspy_trio.engine._cluster_config import ClusterConfig
    from dspy_trio.engine.cluster import open_cluster
    from dspy_trio.engine.cluster._redis import stand_in_for_redis_time

    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    results: dict[int, float] = {}

    async def one(entries: int) -> float:
        clock = [0.0]
        config = ClusterConfig(
            redis_url=redis_url, key_prefix=f"script-cost-{entries}", secret="0123456789abcdef-bench"
        )
        # The script's clock (Redis's TIME) stood in for, so that every grant is an entry of its own.
        with stand_in_for_redis_time(lambda: clock[0]):
            async with open_cluster(config) as cluster:
                quota = cluster.quota("up", 1e9, None)  # never reached: every grant is kept as an entry
                step = 60.0 / entries  # one grant per entry's worth of the window
                for _ in range(entries):
                    clock[0] += step
                    await quota.acquire(0)
                await trio.run_process(["redis-cli", "-p", port, "CONFIG", "RESETSTAT"], capture_stdout=True)
                for _ in range(1000):
                    clock[0] += step
                    await quota.acquire(0)
        done = await trio.run_process(["redis-cli", "-p", port, "INFO", "commandstats"], capture_stdout=True)
        out = done.stdout.decode()
        line = next(line for line in out.splitlines() if line.startswith("cmdstat_evalsha:"))
        return float(line.split("usec_per_call=", 1)[1].split(",", 1)[0])

    print("# the quota script's Redis CPU per call, by entries in the window (server's usec_per_call)")
    for entries in (10, 100, 500, 1000, 2000):
        results[entries] = trio.run(one, entries)
        print(f"{entries:>5} entries: {results[entries]:7.1f} us per call")
    return results


def measure_cost(config: Path, redis_url: str, args: argparse.Namespace) -> dict[str, object]:
    """Part 5: predictions/s with and without Redis, and Redis commands and round trips per prediction."""
    with_redis, with_port = start_replica(config, redis_url, args.workers)
    without, without_port = start_replica(config, None, args.workers)
    try:
        for port in (with_port, without_port):
            wait_ready(port)
        time.sleep(1.5)  # every worker of both has joined (heartbeats) and warmed up its pools
        rows: dict[str, dict[str, list[float]]] = {}
        for program in ("default", "metered"):
            for port in (with_port, without_port):  # warm-up
                trio.run(load, f"http://127.0.0.1:{port}", program, 1.0, args.concurrency)
            for _ in range(args.rounds):
                for mode, port in (("redis", with_port), ("no redis", without_port)):
                    row = rows.setdefault(f"{program}, {mode}", {"rate": [], "commands": [], "trips": []})
                    commands = redis_commands(redis_url)
                    trips = cluster_counter(port, "dspy_trio_cluster_redis_calls_total")
                    ok, failed, elapsed = trio.run(
                        load, f"http://127.0.0.1:{port}", program, args.cost_seconds, args.concurrency
                    )
                    done = max(1, ok + failed)
                    row["rate"].append(ok / elapsed)
                    if mode == "redis":
                        row["commands"].append((redis_commands(redis_url) - commands) / done)
                        trips_after = cluster_counter(port, "dspy_trio_cluster_redis_calls_total")
                        row["trips"].append((trips_after - trips) / done)
    finally:
        stop(with_redis)
        stop(without)
    print(
        f"# what Redis costs: 1 replica x {args.workers} worker(s), no proxy, {args.concurrency} clients, "
        f"{args.rounds} x {args.cost_seconds:g}s each, medians"
    )
    print(f"{'program, Redis':<22} {'predictions/s':>14} {'commands/pred':>14} {'round trips/pred':>17}")
    results: dict[str, object] = {}
    for name, row in rows.items():
        rate = statistics.median(row["rate"])
        per_command = statistics.median(row["commands"]) if row["commands"] else None
        per_trip = statistics.median(row["trips"]) if row["trips"] else None
        shown = [f"{rate:14.1f}", f"{per_command:14.2f}" if per_command is not None else f"{'-':>14}"]
        shown.append(f"{per_trip:17.2f}" if per_trip is not None else f"{'-':>17}")
        print(f"{name:<22} {' '.join(shown)}")
        results[name] = {
            "predictions_per_second": rate,
            "commands_per_prediction": per_command,
            "round_trips_per_prediction": per_trip,
        }
    for program in ("default", "metered"):
        ratio = statistics.median(rows[f"{program}, redis"]["rate"]) / statistics.median(
            rows[f"{program}, no redis"]["rate"]
        )
        print(f"{program}: with Redis / without = {ratio:.2f}x")
    return results


def cluster_counter(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def check_streams(url: str) -> tuple[bool, bool]:
    """One SSE stream and one WebSocket exchange through HAProxy; whether each ended properly."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream(
            "POST", "/v1/programs/default/stream", json={"inputs": {"question": "through haproxy"}}
        ) as response,
    ):
        body = "".join([chunk async for chunk in response.aiter_text()])
    sse_ok = "event: final" in body and body.count("event: delta") > 1
    host, port = url.removeprefix("http://").split(":")
    async with trio_websocket.open_websocket(host, int(port), "/ws", use_ssl=False) as ws:
        await ws.send_message("through haproxy")
        frames = []
        while (frame := await ws.get_message()) != "[DONE]":
            frames.append(frame)
    ws_ok = len(frames) > 1 and not any(str(f).startswith('{"error"') for f in frames)
    return sse_ok, ws_ok


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="each throughput measurement")
    parser.add_argument("--quota-seconds", type=float, default=20.0, help="the quota measurement")
    parser.add_argument("--rpm", type=float, default=60.0, help="the limited program's quota")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="workers per replica")
    parser.add_argument("--contrast", action="store_true", help="also measure two replicas without Redis")
    parser.add_argument("--cost-seconds", type=float, default=8.0, help="each load of part 5")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of part 5 (medians)")
    parser.add_argument("--cost-only", action="store_true", help="only part 5 (what Redis costs)")
    parser.add_argument("--script-cost", action="store_true", help="only part 6 (the Lua script's cost)")
    args = parser.parse_args()

    processes: list[subprocess.Popen[bytes]] = []
    files: list[Path] = []
    try:
        redis, redis_url = start_redis()
        processes.append(redis)
        if args.script_cost:
            measure_script_cost(redis_url)
            return 0
        upstream, upstream_root = start_upstream(latency=0.05)
        processes.append(upstream)  # type: ignore[arg-type]
        config = write_config(upstream_root, args.rpm)
        files.append(config)
        if args.cost_only:
            cost = measure_cost(config, redis_url, args)
            out = ROOT / "benchmarks" / "results" / "scaleout_cost.json"
            out.write_text(
                json.dumps({"workers": args.workers, "concurrency": args.concurrency, **cost}, indent=2)
            )
            print(f"raw results: {out.relative_to(ROOT)}")
            return 0
        replicas = [start_replica(config, redis_url, args.workers) for _ in range(2)]
        processes += [p for p, _ in replicas]
        ports = [port for _, port in replicas]
        for port in ports:
            wait_ready(port)
        one, one_port, one_cfg = start_haproxy(ports[:1])
        two, two_port, two_cfg = start_haproxy(ports)
        processes += [one, two]
        files += [one_cfg, two_cfg]
        time.sleep(1.5)  # HAProxy's first health checks

        results: dict[str, object] = {"workers_per_replica": args.workers, "concurrency": args.concurrency}
        print(f"# {args.workers} worker(s) per replica, {args.concurrency} concurrent clients, via HAProxy")
        trio.run(load, f"http://127.0.0.1:{two_port}", "default", 2.0, args.concurrency)  # warm-up
        rates = {}
        for name, port in (
            ("1 replica", one_port),
            ("2 replicas", two_port),
            ("1 replica, no proxy", ports[0]),
        ):
            ok, failed, elapsed = trio.run(
                load, f"http://127.0.0.1:{port}", "default", args.seconds, args.concurrency
            )
            rates[name] = ok / elapsed
            print(f"throughput, {name}: {ok / elapsed:8.1f} predictions/s ({ok} ok, {failed} not ok)")
        ratio = rates["2 replicas"] / rates["1 replica"]
        print(f"throughput ratio 2/1 replicas: {ratio:.2f}x")
        results["throughput"] = {**rates, "ratio": ratio}

        calls_before = sum(cluster_counter(p, "dspy_trio_cluster_redis_calls_total") for p in ports)
        seen_before = upstream_records(upstream_root)
        ok, failed, elapsed = trio.run(
            load, f"http://127.0.0.1:{two_port}", "limited", args.quota_seconds, args.concurrency
        )
        seen = upstream_records(upstream_root) - seen_before
        allowed = args.rpm * math.ceil(elapsed / 60)
        print(
            f"quota {args.rpm:g}/min, 2 replicas with Redis, {elapsed:.1f}s: the upstream saw {seen}; "
            f"the quota allows {allowed:.0f} (at most {args.rpm:g} in any 60 s); "
            f"{ok} answered, {failed} refused at once"
        )
        results["quota_redis"] = {
            "seen": seen,
            "allowed": allowed,
            "elapsed": elapsed,
            "ok": ok,
            "refused": failed,
        }
        calls = sum(cluster_counter(p, "dspy_trio_cluster_redis_calls_total") for p in ports) - calls_before
        print(
            "redis round-trips per request (limited program, heartbeats included): "
            f"{calls / max(1, ok + failed):.2f}"
        )
        results["redis_round_trips_per_request"] = calls / max(1, ok + failed)

        sse_ok, ws_ok = trio.run(check_streams, f"http://127.0.0.1:{two_port}")
        print(
            f"through HAProxy: SSE stream {'ok' if sse_ok else 'FAILED'}, "
            f"WebSocket {'ok' if ws_ok else 'FAILED'}"
        )
        results["sse_ok"], results["websocket_ok"] = sse_ok, ws_ok

        results["cost"] = measure_cost(config, redis_url, args)

        if args.contrast:
            plain = [start_replica(config, None, args.workers) for _ in range(2)]
            processes += [p for p, _ in plain]
            for _, port in plain:
                wait_ready(port)
            proxy, proxy_port, proxy_cfg = start_haproxy([port for _, port in plain])
            processes.append(proxy)
            files.append(proxy_cfg)
            time.sleep(1.5)
            seen_before = upstream_records(upstream_root)
            ok, failed, elapsed = trio.run(
                load, f"http://127.0.0.1:{proxy_port}", "limited", args.quota_seconds, args.concurrency
            )
            seen = upstream_records(upstream_root) - seen_before
            allowed = args.rpm * math.ceil(elapsed / 60)
            print(
                f"quota {args.rpm:g}/min, 2 replicas WITHOUT Redis, {elapsed:.1f}s: the upstream saw {seen}; "
                f"the quota allows {allowed:.0f}"
            )
            results["quota_no_redis"] = {"seen": seen, "allowed": allowed, "elapsed": elapsed}
        out = ROOT / "benchmarks" / "results" / "scaleout.json"
        out.write_text(json.dumps(results, indent=2))
        print(f"raw results: {out.relative_to(ROOT)}")
        return 0 if sse_ok and ws_ok else 1
    finally:
        for process in reversed(processes):
            stop(process)
        for path in files:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
