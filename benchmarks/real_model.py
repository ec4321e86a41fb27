"""dspy-trio against a real model, and the same model called directly: ``python -m benchmarks.real_model``.

Needs an OpenAI-compatible model server (``make local-model``: llama.cpp's server with SmolLM2-135M) and is
not part of ``python -m benchmarks all``. It measures, interleaving ours and the direct calls:

1. predictions and streams through the service (real HTTP, Hypercorn) vs the same request sent directly
   to the model (the same messages and parameters): medians and their ratio;
2. a cancel freeing the model's slot: how long a one-token request waits right after a stream or a
   predict was abandoned through the service, and after the same done directly, vs when the model is idle;
3. parse failures with DSPy's chat and JSON adapters on 20 questions (and LM calls per request: the chat
   adapter silently retries with the JSON adapter when the format is ignored).

    python -m benchmarks.real_model --url http://127.0.0.1:8080/v1 --model smollm2 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import dspy
import httpx
import trio

from dspy_trio.engine import (
    EngineConfig,
    EngineError,
    LMConfig,
    OpenAISettings,
    ProgramSpec,
    RetryPolicy,
    open_engine,
)
from dspy_trio.engine.lm import HTTPSettings, OpenAICompatibleLM
from dspy_trio.web.server import open_server
from dspy_trio.web.settings import ServiceSettings

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is 2 + 2?",
    "What is the boiling point of water in Celsius?",
    "Which planet is closest to the Sun?",
    "What is the largest ocean on Earth?",
    "What language is spoken in Brazil?",
    "How many days are in a week?",
    "What gas do plants absorb?",
    "What is the opposite of hot?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What animal is known as the king of the jungle?",
    "What is the freezing point of water in Fahrenheit?",
    "Which is bigger, a mouse or an elephant?",
    "What do bees make?",
    "What is the first letter of the English alphabet?",
    "What shape has three sides?",
]
LONG_PROMPT = (
    "Write a very long essay, at least 3000 words, about the history of computing, decade by decade."
)
PARAMS = {"temperature": 0.0, "max_tokens": 128}
JSON_FORMAT = {"response_format": {"type": "json_object"}}


def lm_config(url: str, model: str, **params: Any) -> LMConfig:
    return LMConfig(
        model=model,
        retry=RetryPolicy(max_attempts=1),
        params={**PARAMS, **params},
        settings=OpenAISettings(api_base=url, api_key="none", http=HTTPSettings(read_timeout=300)),
    )


def service(url: str, model: str) -> ServiceSettings:
    engine = EngineConfig(
        lms={
            "default": lm_config(url, model, **JSON_FORMAT),
            "long": lm_config(url, model, max_tokens=400, **JSON_FORMAT),
        },
        programs={
            "default": ProgramSpec("question -> answer"),
            "essay": ProgramSpec("topic -> essay", lm="long"),
        },
        adapter="json",
    )
    return ServiceSettings(engine=engine, port=0, default_timeout=300, max_timeout=300, ws_ping_interval=None)


def json_adapter_messages(signature: str, **inputs: str) -> list[dict[str, Any]]:
    """The messages dspy-trio sends for ``signature`` with the JSON adapter."""
    formatted: list[dict[str, Any]] = dspy.JSONAdapter().format(
        dspy.ensure_signature(signature), demos=[], inputs=inputs
    )
    return formatted


async def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def sse_until(response: httpx.Response, last: Callable[[str], bool]) -> int:
    lines = 0
    async for line in response.aiter_lines():
        lines += 1
        if last(line):
            break
    return lines


async def overhead(url: str, model: str, base: str, rounds: int) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        question = QUESTIONS[0]
        messages = json_adapter_messages("question -> answer", question=question)
        direct_body = {"model": model, "messages": messages, **PARAMS, **JSON_FORMAT}
        ours_body = {"inputs": {"question": question}}

        async def direct_predict() -> None:
            (await http.post(f"{url}/chat/completions", json=direct_body)).raise_for_status()

        async def ours_predict() -> None:
            response = await http.post(f"{base}/v1/programs/default/predict", json=ours_body)
            response.raise_for_status()

        async def direct_stream() -> None:
            body = {**direct_body, "stream": True}
            async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
                response.raise_for_status()
                await sse_until(response, lambda line: line.strip() == "data: [DONE]")

        async def ours_stream() -> None:
            async with http.stream("POST", f"{base}/v1/programs/default/stream", json=ours_body) as response:
                response.raise_for_status()
                await sse_until(response, lambda line: line.startswith("event: final"))

        await direct_predict()  # warm the model's prompt cache alike for both
        for kind, ours, theirs in (
            ("predict", ours_predict, direct_predict),
            ("stream", ours_stream, direct_stream),
        ):
            ours_times, direct_times = [], []
            for _ in range(rounds):
                direct_times.append(await timed(theirs))
                ours_times.append(await timed(ours))
            o, d = statistics.median(ours_times), statistics.median(direct_times)
            print(
                f"{kind:8} dspy-trio median {o * 1000:8.1f} ms   direct {d * 1000:8.1f} ms   "
                f"ratio {o / d:5.2f}   (n={rounds}; "
                f"min {min(ours_times) * 1000:.0f}/{min(direct_times) * 1000:.0f} ms)"
            )


async def probe(http: httpx.AsyncClient, url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}

    async def call() -> None:
        (await http.post(f"{url}/chat/completions", json=body)).raise_for_status()

    return await timed(call)


async def wait_until_idle(http: httpx.AsyncClient, url: str, model: str) -> float:
    for _ in range(200):
        if (seconds := await probe(http, url, model)) < 1.0:
            return seconds
    raise RuntimeError("the model never became idle")


async def cancel(url: str, model: str, base: str) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        messages = json_adapter_messages("topic -> essay", topic=LONG_PROMPT)
        long_body = {"model": model, "messages": messages, **PARAMS, **JSON_FORMAT, "max_tokens": 400}
        await wait_until_idle(http, url, model)
        full = await timed(lambda: http.post(f"{url}/chat/completions", json=long_body))
        idle = statistics.median([await probe(http, url, model) for _ in range(3)])
        print(
            f"cancel   long answer undisturbed {full:.2f} s; "
            f"one-token request, idle model {idle * 1000:.0f} ms"
        )
        essay = {"inputs": {"topic": LONG_PROMPT}}

        async def ours_stream() -> None:
            with trio.move_on_after(2.0):
                async with http.stream("POST", f"{base}/v1/programs/essay/stream", json=essay) as response:
                    await sse_until(response, lambda line: False)

        async def direct_stream() -> None:
            with trio.move_on_after(2.0):
                async with http.stream(
                    "POST", f"{url}/chat/completions", json={**long_body, "stream": True}
                ) as r:
                    await sse_until(r, lambda line: False)

        async def ours_predict() -> None:
            with trio.move_on_after(2.0):
                await http.post(f"{base}/v1/programs/essay/predict", json=essay)

        async def direct_predict() -> None:
            with trio.move_on_after(2.0):
                await http.post(f"{url}/chat/completions", json=long_body)

        for name, leave in (
            ("stream left after 2 s, through dspy-trio", ours_stream),
            ("stream left after 2 s, direct", direct_stream),
            ("predict left after 2 s, through dspy-trio", ours_predict),
            ("predict left after 2 s, direct", direct_predict),
        ) * 2:
            await wait_until_idle(http, url, model)
            await leave()
            waited = await probe(http, url, model)
            print(f"cancel   {name:45} next request waited {waited:6.2f} s")


async def parse_failures(url: str, model: str) -> None:
    calls = 0
    original = OpenAICompatibleLM.acall

    async def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(self, *args, **kwargs)

    OpenAICompatibleLM.acall = counting  # type: ignore[method-assign]
    try:
        adapters: tuple[tuple[Literal["chat", "json"], dict[str, Any]], ...] = (
            ("chat", {}),
            ("json", JSON_FORMAT),
        )
        for adapter, params in adapters:
            config = EngineConfig(lms={"default": lm_config(url, model, **params)}, adapter=adapter)
            failed, seconds, calls = 0, 0.0, 0
            examples: list[str] = []
            async with open_engine(config) as engine:
                for question in QUESTIONS:
                    started = time.perf_counter()
                    try:
                        result = await engine.predict("default", {"question": question})
                        if len(examples) < 2:
                            examples.append(result.outputs["answer"])
                    except EngineError as exc:
                        failed += 1
                        if len(examples) < 2:
                            examples.append(f"{exc.code}: {str(exc)[:80]}")
                    seconds += time.perf_counter() - started
            print(
                f"parse    adapter {adapter:4}: {failed}/{len(QUESTIONS)} failed, "
                f"{calls / len(QUESTIONS):.2f} LM calls per request, mean {seconds / len(QUESTIONS):.2f} s; "
                f"e.g. {json.dumps(examples)[:160]}"
            )
    finally:
        OpenAICompatibleLM.acall = original  # type: ignore[method-assign]


async def main(args: argparse.Namespace) -> None:
    url = args.url.rstrip("/")
    async with open_server(service(url, args.model)) as server:
        if "overhead" in args.only:
            await overhead(url, args.model, server.url, args.rounds)
        if "cancel" in args.only:
            await cancel(url, args.model, server.url)
    if "parse" in args.only:
        await parse_failures(url, args.model)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1", help="the model server's /v1 root")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=["overhead", "cancel", "parse"])
    trio.run(main, parser.parse_args())
