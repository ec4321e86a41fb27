"""Streaming through the engine: throughput, time to first token added, memory under slow consumers.

::

    python -m benchmarks.streaming                       # all three parts
    python -m benchmarks.streaming --part throughput --tokens 10000
    python -m benchmarks.streaming --part memory --streams 100 --duration 60

Parts:
  throughput  tokens/s of one 10,000-token stream in-process (simulated LM, no pacing), through the
              engine and, for reference, the bare LM pushing into a channel; several runs, medians.
  ttft        time to first token the engine adds: in-process (first answer token sent by the LM ->
              first FieldDelta received) and over HTTP against the fake upstream in another process
              (first FieldDelta - the upstream's configured first-token delay).
  memory      process RSS over time while --streams streams, each of a long answer from the fake
              upstream (another process, no pacing), are read at one event per second; block and drop
              policies, and an effectively unbounded buffer for contrast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import trio

from benchmarks._measure import rss_mb
from benchmarks._upstream import start_upstream
from dspy_trio.engine import (
    EngineConfig,
    FieldDelta,
    LMConfig,
    OpenAISettings,
    SimulatedSettings,
    StreamOptions,
    open_engine,
)
from dspy_trio.engine.lm import Completion, DeltaSink, SimulatedLM


async def _throughput(tokens: int, runs: int) -> None:
    lm = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0, words_per_field=tokens))
    engine_rates, bare_rates = [], []
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        for _ in range(runs):
            started, deltas = time.perf_counter(), 0
            async with engine.stream("default", {"question": "q"}) as events:
                async for event in events:
                    deltas += isinstance(event, FieldDelta)
            engine_rates.append(tokens / (time.perf_counter() - started))

            bare = SimulatedLM(first_token_delay=0, token_delay=0, words_per_field=tokens)
            send, receive = trio.open_memory_channel[Any](64)

            async def drain(channel: trio.MemoryReceiveChannel[Any] = receive) -> None:
                async for _chunk in channel:
                    pass

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                import dspy

                with dspy.context(send_stream=send):
                    await bare.acall(messages=[{"role": "user", "content": "q"}])
                await send.aclose()
            bare_rates.append(tokens / (time.perf_counter() - started))
    engine_rate, bare_rate = statistics.median(engine_rates), statistics.median(bare_rates)
    print(f"\nthroughput: one {tokens}-token stream, medians of {runs} runs")
    print(f"  through the engine   {engine_rate:10,.0f} tokens/s   ({deltas} field deltas)")
    print(f"  bare LM -> channel   {bare_rate:10,.0f} tokens/s")
    print(f"  engine / bare        {engine_rate / bare_rate:10.2f}x   (goal: engine >= 20,000 tokens/s)")


class _ClockedSink:
    """Wraps an LM's chunk sink; notes when the first text after the answer header is sent."""

    def __init__(self, sink: DeltaSink, sent_at: list[float]) -> None:
        self._sink = sink
        self._sent_at = sent_at
        self._text = ""

    async def send(self, text: str) -> None:
        header_seen = "## answer ## ]]" in self._text
        self._text += text
        if header_seen and text.strip() and not self._sent_at:
            self._sent_at.append(time.perf_counter())
        await self._sink.send(text)


async def _ttft_in_process(runs: int) -> list[float]:
    sent_at: list[float] = []

    class Clocked(SimulatedLM):
        async def complete(self, messages: Any, params: Any, sink: DeltaSink | None) -> Completion:
            clocked = _ClockedSink(sink, sent_at) if sink is not None else None
            return await super().complete(messages, params, clocked)

    lm = Clocked(first_token_delay=0.02, token_delay=0.001, words_per_field=20)
    added = []
    async with open_engine(EngineConfig(), lms={"default": lm}) as engine:
        for i in range(runs):
            sent_at.clear()
            async with engine.stream("default", {"question": f"q{i}"}) as events:
                async for event in events:
                    if isinstance(event, FieldDelta):
                        added.append(time.perf_counter() - sent_at[0])
                        break
    return added


async def _ttft_http(url: str, runs: int, first_token_delay: float) -> list[float]:
    lm = LMConfig(model="bench", settings=OpenAISettings(api_base=url))
    out = []
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        for i in range(runs):
            started = time.perf_counter()
            async with engine.stream("default", {"question": f"q{i}"}) as events:
                async for event in events:
                    if isinstance(event, FieldDelta):
                        out.append(time.perf_counter() - started - first_token_delay)
                        break
    return out


def _report(name: str, samples: list[float]) -> None:
    samples = sorted(samples)
    p50 = statistics.median(samples) * 1000
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000
    print(f"  {name:34s} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   (n={len(samples)})")


async def _memory(url: str, streams: int, duration: float, policy: str, buffer_size: int) -> list[float]:
    lm = LMConfig(model="bench", settings=OpenAISettings(api_base=url))
    options = StreamOptions(backpressure=policy, buffer_size=buffer_size)  # type: ignore[arg-type]
    samples: list[float] = []
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:

        async def slow_reader(i: int) -> None:
            async with engine.stream("default", {"question": f"long {i}"}, options=options) as events:
                async for _event in events:
                    await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(slow_reader, i)
            for _ in range(int(duration)):
                samples.append(rss_mb())
                await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    return samples


async def main_async(args: argparse.Namespace) -> None:
    parts = {"throughput", "ttft", "memory"} if args.part == "all" else {args.part}
    if "throughput" in parts:
        await _throughput(args.tokens, args.runs)
    upstream = None
    try:
        if "ttft" in parts:
            first_token = 0.05
            upstream, url = start_upstream(first_token_delay=first_token)
            print("\ntime to first token added by the engine")
            _report("in-process (LM token -> FieldDelta)", await _ttft_in_process(args.ttft_runs))
            _report("over HTTP (minus upstream's delay)", await _ttft_http(url, args.ttft_runs, first_token))
            upstream.kill()
        if "memory" in parts:
            upstream, url = start_upstream(words=args.words)
            print(
                f"\nRSS under {args.streams} streams of {args.words}-word answers read at 1 event/s, "
                f"{args.duration:g}s each (MB, sampled every 10 s)"
            )
            for policy, size in (("block", 64), ("drop", 64), ("block", 10**9)):
                samples = await _memory(url, args.streams, args.duration, policy, size)
                label = f"{policy}, buffer {size if size < 10**9 else 'unbounded'}"
                shown = " ".join(f"{s:6.0f}" for s in samples[::10])
                growth = samples[-1] - samples[min(5, len(samples) - 1)]
                print(f"  {label:24s} {shown}   growth after 5 s {growth:+.0f} MB")
    finally:
        if upstream is not None:
            upstream.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "throughput", "ttft", "memory"), default="all")
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttft-runs", type=int, default=200)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--words", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    trio.run(main_async, args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
