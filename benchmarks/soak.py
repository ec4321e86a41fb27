"""Soak: steady load with client disconnects for minutes; does anything grow or stay behind?

``python -m benchmarks.soak [--seconds 300] [--clients 32] [--leave-share 0.2]``: the service and the fake
upstream (``--latency``) run in this process on 127.0.0.1; ``--clients`` loops send predictions, SSE
streams and ``/v1/ws`` requests, and ``--leave-share`` of them leave early (close the connection or the
socket at a random moment). Every ``--sample`` seconds it prints RSS and the engine's gauges; when the
load stops it prints RSS growth (after a warm-up), whether the gauges (in flight, queued) are back
to 0, the upstream requests not ended, and the upstream connections still open
(idle keep-alive connections of the LM's pool are normal; connections the upstream saw as busy are not).
The fake upstream's own request records (kept for tests) are dropped as they end, so that RSS measures
the service.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import re

import httpx
import trio
from trio_websocket import open_websocket_url

from benchmarks._measure import rss_mb
from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings
from dspy_trio.engine.testing import Behavior
from dspy_trio.engine.testing.fake_upstream import open_fake_upstream
from dspy_trio.web.server import open_server
from dspy_trio.web.settings import ServiceSettings


class _Outcomes(logging.Handler):
    """Collects the engine's request log lines of the outcomes worth a closer look."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(record.getMessage())
        if line.get("outcome") in ("timed_out", "failed"):
            total = line.get("total_ms") or 0
            self.seen[
                f"{line['kind']} {line['outcome']} {line.get('error')} "
                f"{'>=10s' if total >= 10_000 else '<10s'}"
            ] += 1


async def one(
    client: httpx.AsyncClient, ws_url: str, rng: random.Random, leave: bool, counts: collections.Counter[str]
) -> None:
    kind = rng.choice(["predict", "stream", "ws"])
    body = {"inputs": {"question": f"soak {rng.random()}"}, "timeout_secs": 10}
    with trio.move_on_after(rng.uniform(0.01, 0.4) if leave else 60) as scope:
        if kind == "predict":
            response = await client.post("/v1/programs/default/predict", json=body)
            counts[f"predict {response.status_code}"] += 1
        elif kind == "stream":
            async with client.stream("POST", "/v1/programs/default/stream", json=body) as response:
                async for _ in response.aiter_bytes():
                    pass
            counts[f"stream {response.status_code}"] += 1
        else:
            async with open_websocket_url(ws_url) as ws:
                await ws.send_message(json.dumps({"id": "a", "type": "predict", **body}))
                frame = json.loads(await ws.get_message())
            counts[f"ws {frame['type']}"] += 1
    if scope.cancelled_caught:
        counts[f"{kind} left"] += 1


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    watcher = _Outcomes()
    request_log = logging.getLogger("dspy_trio.engine.requests")
    request_log.addHandler(watcher)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    counts: collections.Counter[str] = collections.Counter()
    async with open_fake_upstream(
        Behavior(latency=args.latency, first_token_delay=args.latency, token_delay=0.005)
    ) as upstream:
        lm = LMConfig(model="fake", settings=OpenAISettings(api_base=upstream.url))
        engine = EngineConfig(lms={"default": lm}, max_in_flight=256, max_queued=1024)
        service = ServiceSettings(engine=engine, port=0, ws_ping_interval=None)
        async with open_server(service) as server:
            ws_url = server.url.replace("http", "ws") + "/v1/ws"
            limits = httpx.Limits(max_connections=args.clients)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
                stop_at = trio.current_time() + args.seconds
                samples: list[tuple[float, float]] = []

                async def loop() -> None:
                    while trio.current_time() < stop_at:
                        await one(client, ws_url, rng, rng.random() < args.leave_share, counts)

                async def sample() -> None:
                    started = trio.current_time()
                    while trio.current_time() < stop_at:
                        stats = server.state.engine.statistics()  # type: ignore[union-attr]
                        # The fake upstream keeps a record of every request (test infrastructure in this
                        # process): drop the ended ones so RSS measures the service.
                        upstream.records[:] = [r for r in upstream.records if not r.ended]
                        samples.append((trio.current_time() - started, rss_mb()))
                        print(
                            f"t={samples[-1][0]:5.0f}s rss={samples[-1][1]:6.1f} MB "
                            f"in_flight={stats.in_flight} queued={stats.queued} ended={stats.requests_total}",
                            flush=True,
                        )
                        await trio.sleep(args.sample)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sample)
                    for _ in range(args.clients):
                        nursery.start_soon(loop)
                await trio.sleep(2.0)  # let cancellations and closes settle
                stats = server.state.engine.statistics()  # type: ignore[union-attr]
                metrics = (await client.get("/metrics")).text
            upstream_busy = upstream.active_requests
            upstream_open = upstream.open_connections
    warm = [rss for t, rss in samples if t >= args.warmup]
    growth = (warm[-1] - warm[0]) if len(warm) > 1 else float("nan")
    outcomes: collections.Counter[str] = collections.Counter()
    for line in metrics.splitlines():
        if line.startswith("dspy_trio_requests_total{"):
            name = re.search(r'outcome="([a-z_]+)"', line)
            if name:
                outcomes[name.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    print(f"soak: {args.seconds:.0f}s, {args.clients} clients, {args.leave_share:.0%} leave early")
    print("client side: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("server outcomes (/metrics): " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    looked_at = ", ".join(f"{k}: {v}" for k, v in watcher.seen.items()) or "none"
    print(f"timed_out / failed by kind, error, duration: {looked_at}")
    print(
        f"RSS after {args.warmup:.0f}s warm-up: {warm[0] if warm else float('nan'):.1f} MB -> "
        f"{warm[-1] if warm else float('nan'):.1f} MB (growth {growth:+.1f} MB)"
    )
    print(
        f"after the load: in_flight {stats.in_flight}, queued {stats.queued}; "
        f"upstream requests not ended {upstream_busy}, upstream connections open {upstream_open} "
        f"(before the service closed its pool)"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--leave-share", type=float, default=0.2)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--sample", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=30)
    parser.add_argument("--seed", type=int, default=5)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())
