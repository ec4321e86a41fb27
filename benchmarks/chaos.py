"""Chaos run: many requests through the real service against a fault-injecting upstream.

``python -m benchmarks.chaos [--requests 2000] [--concurrency 64]``: the service (Hypercorn, Quart-Trio,
the engine with its OpenAI-compatible backend) and the fake upstream run in this process on 127.0.0.1,
the load in a child process;
a fault feeder queues one upstream fault every ``--fault-every`` seconds (429 and 503 with
``Retry-After: 1``, 500, a stall, a disconnect, a malformed body) and a share of clients leave early.

It prints the outcome of every request (client side and the server's /metrics), the requests that
finished later than their deadline + 100 ms (goal 0), and the retries the engine sent earlier than the
upstream's ``Retry-After`` (goal 0), for 429 and 503 apart. Bounded: it stops after ``--requests``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import re
import sys
from typing import Any

import attrs
import httpx
import trio

from dspy_trio.engine import CallTimeouts, EngineConfig, LMConfig, OpenAISettings, RetryPolicy
from dspy_trio.engine.testing import Behavior, Fault
from dspy_trio.engine.testing.fake_upstream import open_fake_upstream
from dspy_trio.web.server import open_server
from dspy_trio.web.settings import ServiceSettings

RETRY_AFTER = 1.0
FAULTS = [
    Fault("rate_limit", retry_after=RETRY_AFTER),
    Fault("unavailable", retry_after=RETRY_AFTER),
    Fault("server_error"),
    Fault("hang"),
    Fault("disconnect"),
    Fault("malformed"),
]
_TAG = re.compile(r"chaos-(\d+)-x")


@attrs.define
class Outcome:
    index: int
    timeout: float
    elapsed: float = 0.0
    status: int = 0
    code: str = ""
    left: bool = False
    server_total: float = 0.0  # the service's own measure (Server-Timing total: head arrival -> answer)


async def one_request(
    client: httpx.AsyncClient, index: int, rng: random.Random, leave_share: float
) -> Outcome:
    timeout = rng.choice([2.0, 4.0, 8.0])
    outcome = Outcome(index, timeout)
    body = {"inputs": {"question": f"chaos-{index}-x"}, "timeout_secs": timeout}
    leave_after = rng.uniform(0.05, timeout) if rng.random() < leave_share else None
    started = trio.current_time()
    with trio.move_on_after(leave_after if leave_after is not None else timeout + 30) as scope:
        response = await client.post("/v1/programs/default/predict", json=body)
        outcome.status = response.status_code
        timing = re.search(r"total;dur=([0-9.]+)", response.headers.get("server-timing", ""))
        outcome.server_total = float(timing.group(1)) / 1000 if timing else 0.0
        payload = response.json()
        outcome.code = "ok" if response.status_code == 200 else payload["error"]["code"]
    outcome.left = scope.cancelled_caught
    outcome.elapsed = trio.current_time() - started
    return outcome


async def feed_faults(upstream: Any, every: float, rng: random.Random) -> None:
    while True:
        upstream.add_faults(rng.choice(FAULTS))
        await trio.sleep(every)


def early_retries(records: list[Any]) -> dict[str, list[float]]:
    """For each retry after a 429/503 with Retry-After: how much earlier than allowed it came (<= 0: fine)."""
    by_request: dict[int, list[Any]] = collections.defaultdict(list)
    for record in records:
        found = _TAG.search(json.dumps(record.body))
        if found:
            by_request[int(found.group(1))].append(record)
    early: dict[str, list[float]] = {"429": [], "503": []}
    for attempts in by_request.values():
        attempts.sort(key=lambda r: r.received_at)
        for before, after in itertools.pairwise(attempts):
            if before.status in (429, 503) and before.completed_at is not None:
                gap = after.received_at - before.completed_at
                early[str(before.status)].append(RETRY_AFTER - gap)
    return early


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    async with open_fake_upstream(Behavior(latency=args.latency)) as upstream:
        lm = LMConfig(
            model="fake",
            timeouts=CallTimeouts(attempt=args.attempt_timeout),
            retry=RetryPolicy(max_attempts=3),
            settings=OpenAISettings(api_base=upstream.url),
        )
        engine = EngineConfig(lms={"default": lm}, max_in_flight=256, max_queued=1024)
        service = ServiceSettings(engine=engine, port=0, ws_ping_interval=None)
        async with open_server(service) as server, trio.open_nursery() as nursery:
            nursery.start_soon(feed_faults, upstream, args.fault_every, rng)
            started = trio.current_time()
            # The load comes from a process of its own, so that its clock is not the service's busy loop.
            command = [sys.executable, "-m", "benchmarks.chaos", "--client", server.url]
            command += ["--requests", str(args.requests), "--concurrency", str(args.concurrency)]
            command += ["--leave-share", str(args.leave_share), "--seed", str(args.seed)]
            done = await trio.run_process(command, capture_stdout=True)
            outcomes = [Outcome(**o) for o in json.loads(done.stdout)]
            wall = trio.current_time() - started
            await trio.sleep(1.0)
            async with httpx.AsyncClient(base_url=server.url) as client:
                metrics = (await client.get("/metrics")).text
            stats = server.state.engine.statistics() if server.state.engine else None
            nursery.cancel_scope.cancel()
        report(args, outcomes, wall, metrics, stats, early_retries(list(upstream.records)))


def report(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    wall: float,
    metrics: str,
    stats: Any,
    early: dict[str, list[float]],
) -> None:
    print(
        f"chaos: {len(outcomes)} requests, concurrency {args.concurrency}, "
        f"one fault every {args.fault_every}s, {args.leave_share:.0%} of clients leave early; "
        f"wall {wall:.1f}s"
    )
    codes = collections.Counter("client_left" if o.left else o.code for o in outcomes)
    print("client-side outcomes: " + ", ".join(f"{k} {v}" for k, v in codes.most_common()))
    server: collections.Counter[str] = collections.Counter()
    for line in metrics.splitlines():
        if line.startswith("dspy_trio_requests_total{"):
            name = re.search(r'outcome="([a-z_]+)"', line)
            if name:
                server[name.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    print(
        "server outcomes (/metrics): "
        + ", ".join(f"{k} {v}" for k, v in server.most_common())
        + f"; total {sum(server.values())}"
    )
    finished = [o for o in outcomes if not o.left]
    late = [o for o in finished if o.elapsed > o.timeout + 0.1]
    worst = max((o.elapsed - o.timeout for o in finished), default=0.0)
    print(
        f"finished later than deadline + 100 ms: {len(late)} of {len(finished)} "
        f"(worst excess {worst * 1000:.0f} ms; by outcome: {dict(collections.Counter(o.code for o in late))})"
    )
    late_server = [o for o in finished if o.server_total > o.timeout + 0.1]
    worst_server = max((o.server_total - o.timeout for o in finished), default=0.0)
    print(
        f"  by the service's own clock (head arrival -> answer): {len(late_server)} "
        f"(worst excess {worst_server * 1000:.0f} ms); the rest is time before the head reached the service"
    )
    for status, margins in early.items():
        too_early = [m for m in margins if m > 0.01]
        worst_early = max(margins, default=0.0)
        print(
            f"retries after a {status} with Retry-After {RETRY_AFTER:g}s: {len(margins)}, "
            f"earlier than allowed (by > 10 ms): {len(too_early)} (most early {worst_early * 1000:.0f} ms)"
        )
    if stats is not None:
        print(f"after the run: in_flight {stats.in_flight}, queued {stats.queued}")


async def load(args: argparse.Namespace) -> None:
    """The client side (``--client URL``): run the requests, print their outcomes as JSON."""
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    indices = iter(range(args.requests))
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.client, limits=limits, timeout=60) as client:

        async def worker() -> None:
            for index in indices:
                outcomes.append(await one_request(client, index, rng, args.leave_share))

        async with trio.open_nursery() as workers:
            for _ in range(args.concurrency):
                workers.start_soon(worker)
    print(json.dumps([attrs.asdict(o) for o in outcomes]))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fault-every", type=float, default=0.02)
    parser.add_argument("--leave-share", type=float, default=0.1)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--attempt-timeout", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--client", help="run only the load against this service URL (internal)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    trio.run(load if arguments.client else main, arguments)
