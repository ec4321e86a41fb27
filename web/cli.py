"""The ``dspy-trio`` command.

::

    dspy-trio serve --port 8000                    serve HTTP, SSE and WebSocket (simulated LM by default)
    dspy-trio predict "What is Trio?"              answer one question (simulated LM unless configured)
    dspy-trio predict --program qa --input question="..." --timeout 5
    dspy-trio fake-upstream --port 8001 --latency 0.2   run the fake OpenAI-compatible upstream
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from engine import EngineConfig, EngineError, open_engine
from engine.testing.fake_upstream import Behavior, FakeUpstream

from .server import run_workers, serve
from .settings import ServiceSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspy-trio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the HTTP / SSE / WebSocket API")
    serve.add_argument(
        "--host", default=None, help="address to listen on (default 127.0.0.1, $DSPY_TRIO_HOST)"
    )
    serve.add_argument("--port", type=int, default=None, help="port (default 8000, $DSPY_TRIO_PORT)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    serve.add_argument("--config", default=None, help="TOML config file (default: $DSPY_TRIO_CONFIG)")
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)

    predict = commands.add_parser("predict", help="run one prediction and print its outputs as JSON")
    predict.add_argument("question", nargs="?", help="the question, for programs with a 'question' input")
    predict.add_argument("--program", default="default", help="registered program name (default: default)")
    predict.add_argument(
        "--input", action="append", default=[], metavar="FIELD=VALUE", help="an input field (repeatable)"
    )
    predict.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    predict.add_argument("--config", default=None, help="TOML config file (default: $DSPY_TRIO_CONFIG)")

    fake = commands.add_parser("fake-upstream", help="serve the fake OpenAI-compatible upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8001)
    for name in ("latency", "first_token_delay", "token_delay"):
        fake.add_argument(f"--{name.replace('_', '-')}", type=float, default=0.0, dest=name)
    fake.add_argument("--words-per-field", type=int, default=16, help="length of generated text fields")
    return parser


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if args.question is not None:
        inputs["question"] = args.question
    for item in args.input:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"dspy-trio: --input takes FIELD=VALUE, got {item!r}")
        inputs[field] = value
    return inputs


async def _predict(args: argparse.Namespace) -> int:
    config = EngineConfig.from_toml(args.config) if args.config else EngineConfig.from_env()
    async with open_engine(config) as engine:
        with trio.fail_after(args.timeout if args.timeout is not None else math.inf):
            result = await engine.predict(args.program, _inputs(args))
    report = {
        "request_id": result.request_id,
        "program": result.program,
        "outputs": result.outputs,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
        },
        "timings": attrs.asdict(result.timings),
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


def _service_settings(args: argparse.Namespace) -> ServiceSettings:
    env = dict(os.environ)
    if args.config:
        env["DSPY_TRIO_CONFIG"] = args.config
    settings = ServiceSettings.from_env(env)
    changes = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers))
        if v is not None
    }
    return attrs.evolve(settings, **changes)


async def _serve(args: argparse.Namespace) -> int:
    await serve(_service_settings(args), worker_count=args.worker_of or 1)
    return 0


async def _fake_upstream(args: argparse.Namespace) -> int:
    behavior = Behavior(
        latency=args.latency,
        first_token_delay=args.first_token_delay,
        token_delay=args.token_delay,
        words_per_field=args.words_per_field,
    )
    upstream = FakeUpstream(behavior, host=args.host, port=args.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        print(f"fake upstream listening on {upstream.url}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dspy-trio`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Request log lines are JSON objects already: one per line, nothing around them.
    # The web layer's lines (requests it refused before the engine saw them) go the same way.
    json_lines = logging.StreamHandler()
    json_lines.setFormatter(logging.Formatter("%(message)s"))
    for name in ("engine.requests", "web.requests"):
        requests = logging.getLogger(name)
        requests.addHandler(json_lines)
        requests.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "serve":
        workers = args.workers if args.workers is not None else _service_settings(args).workers
        if workers > 1 and args.worker_of is None:
            return run_workers(sys.argv[1:] if argv is None else list(argv), workers)
    command = {"serve": _serve, "predict": _predict, "fake-upstream": _fake_upstream}[args.command]
    try:
        return trio.run(command, args)
    except EngineError as exc:
        print(f"dspy-trio: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except trio.TooSlowError:
        print(f"dspy-trio: no answer within {args.timeout}s", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
