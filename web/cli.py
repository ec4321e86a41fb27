"""The ``dspy-trio`` command.

::

    dspy-trio serve --port 8000                    serve HTTP, SSE and WebSocket (simulated LM by default)
    dspy-trio predict "What is Trio?"              answer one question (simulated LM unless configured)
    dspy-trio predict --config examples/programs.toml --program summarize --input text="..." --timeout 5
    dspy-trio fake-upstream --port 8001 --latency 0.2   run the fake OpenAI-compatible upstream
    dspy-trio --version

``serve`` and ``predict`` read their configuration the same way: the TOML file of ``--config`` (else
``$DSPY_TRIO_CONFIG``), then the ``LM_*`` and ``DSPY_TRIO_*`` environment variables override it.

Before anything listens, ``serve`` checks what it can (:mod:`dspy_trio.web.preflight`): the settings, the
address, the API keys of hosted providers, and that the engine opens (program modules imported and built);
then it logs one line per LM (provider, model, API root, never the key).

Exit codes: 0 done; 1 internal error (a bug: the traceback is printed); 2 usage or configuration error (bad
flag, bad config file or variable, a program module that cannot be imported, a hosted API without its key,
unknown program, invalid input, an address that cannot be listened on: one line on stderr); 3 no answer
within ``--timeout``; 4 the prediction failed (the LM provider or the program); 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any, NoReturn

import attrs
import trio

from dspy_trio.engine import ConfigError, EngineConfig, EngineError, InvalidInputError, open_engine
from dspy_trio.engine.testing.fake_upstream import Behavior, FakeUpstream

from .preflight import check_api_keys, check_engine_opens, describe_lm
from .settings import ServiceSettings
from .startup import CannotListenError, check_can_listen, configure_logging

logger = logging.getLogger("dspy_trio.web.cli")

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in how the command was called or configured: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem (argparse's default prints the whole usage first)."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type[float] | type[int], *, zero: bool = False) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (value < 0 if zero else value <= 0) or (isinstance(value, float) and not math.isfinite(value)):
            bound = "0 or more" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid ... value" messages
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text!r}")
    return value


_port.__name__ = "port"


def _version() -> str:
    try:
        return metadata.version("dspy-trio")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout without installing
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dspy-trio", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"dspy-trio {_version()}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,predict,fake-upstream}")

    serve = commands.add_parser("serve", help="serve the HTTP / SSE / WebSocket API")
    serve.add_argument(
        "--host", default=None, help="address to listen on (default 127.0.0.1, $DSPY_TRIO_HOST)"
    )
    serve.add_argument(
        "--port", type=_port, default=None, help="port (default 8000, $DSPY_TRIO_PORT; 0: any free port)"
    )
    serve.add_argument("--workers", type=_positive(int), default=None, help="worker processes (default 1)")
    serve.add_argument("--config", default=None, help="TOML config file (default: $DSPY_TRIO_CONFIG)")
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)

    predict = commands.add_parser("predict", help="run one prediction and print its outputs as JSON")
    predict.add_argument("question", nargs="?", help="the question, for programs with a 'question' input")
    predict.add_argument("--program", default="default", help="registered program name (default: default)")
    predict.add_argument(
        "--input", action="append", default=[], metavar="FIELD=VALUE", help="an input field (repeatable)"
    )
    predict.add_argument("--timeout", type=_positive(float), default=None, help="seconds before giving up")
    predict.add_argument("--config", default=None, help="TOML config file (default: $DSPY_TRIO_CONFIG)")

    fake = commands.add_parser("fake-upstream", help="serve the fake OpenAI-compatible upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=_port, default=8001)
    for name in ("latency", "first_token_delay", "token_delay"):
        fake.add_argument(
            f"--{name.replace('_', '-')}", type=_positive(float, zero=True), default=0.0, dest=name
        )
    fake.add_argument(
        "--words-per-field", type=_positive(int), default=16, help="length of generated text fields"
    )
    return parser


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if args.question is not None:
        inputs["question"] = args.question
    for item in args.input:
        field, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--input takes FIELD=VALUE, got {item!r}")
        inputs[field] = value
    return inputs


def _env(args: argparse.Namespace) -> Mapping[str, str]:
    """The environment with ``--config`` standing in for ``$DSPY_TRIO_CONFIG``: one rule for every command."""
    env = dict(os.environ)
    if args.config:
        env["DSPY_TRIO_CONFIG"] = args.config
    return env


def _check_lms(config: EngineConfig) -> None:
    """Refuse a hosted API without its key (ConfigError); warn about the other doubtful LMs."""
    for warning in check_api_keys(config):
        logger.warning("%s", warning)
    simulated = sorted(name for name, lm in config.lms.items() if lm.provider == "simulated")
    if simulated:
        logger.warning(
            "no LM configured: the built-in SIMULATED LM answers (LM %s), with made-up text. "
            "Set LM_PROVIDER, LM_API_BASE and LM_MODEL, or pass --config FILE.toml",
            ", ".join(simulated),
        )


async def _predict(args: argparse.Namespace) -> int:
    config = EngineConfig.from_env(_env(args))
    _check_lms(config)
    inputs = _inputs(args)
    async with open_engine(config) as engine:
        with trio.fail_after(args.timeout if args.timeout is not None else math.inf):
            result = await engine.predict(args.program, inputs)
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
    settings = ServiceSettings.from_env(_env(args))
    changes = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers))
        if v is not None
    }
    return attrs.evolve(settings, **changes)


async def _serve(args: argparse.Namespace) -> int:
    from .server import serve  # the serving stack, imported only to serve (about a second)

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


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.command == "serve":
        settings = _service_settings(args)  # a bad config fails here, before anything starts
        if args.worker_of is None:  # the parent (or the only process) checks once, before any worker
            if settings.workers > 1 and settings.port == 0:
                raise UsageError(
                    f"{settings.workers} workers need a fixed port (--port or DSPY_TRIO_PORT): with port 0 "
                    "each worker would listen on a port of its own"
                )
            check_can_listen(settings.host, settings.port)
            _check_lms(settings.engine)
            trio.run(check_engine_opens, settings.engine)
            for name, lm in settings.engine.lms.items():
                if lm.provider != "simulated":  # announced above, loudly
                    logger.info("LM %s: %s", name, describe_lm(lm))
            if settings.workers > 1:
                from .server import run_workers

                return run_workers(sys.argv[1:] if argv is None else list(argv), settings.workers)
    command = {"serve": _serve, "predict": _predict, "fake-upstream": _fake_upstream}[args.command]
    return trio.run(command, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dspy-trio`` console script; returns the exit code (see the module doc)."""
    args = _parser().parse_args(argv)
    level = args.log_level.upper()
    if not isinstance(logging.getLevelName(level), int):
        _parser().error(f"argument --log-level: unknown level {args.log_level!r}")
    configure_logging(level)
    try:
        return _run(args, argv)
    except BaseException as exc:
        return _exit_code(_leaf(exc), exc, args)


def _exit_code(leaf: BaseException, exc: BaseException, args: argparse.Namespace) -> int:
    def fail(code: int, message: str) -> int:
        print(f"dspy-trio: {message}", file=sys.stderr)
        return code

    match leaf:
        case UsageError() | CannotListenError():
            return fail(EXIT_USAGE, str(leaf))
        case ConfigError():
            return fail(EXIT_USAGE, f"configuration error: {leaf}")
        case InvalidInputError():
            return fail(EXIT_USAGE, f"{type(leaf).__name__}: {leaf}")
        case EngineError():
            return fail(EXIT_FAILED, f"{type(leaf).__name__}: {leaf}")
        case trio.TooSlowError():
            return fail(EXIT_TIMEOUT, f"no answer within {args.timeout}s")
        case OSError(errno=errno.EADDRINUSE | errno.EADDRNOTAVAIL | errno.EACCES) if (
            args.command != "predict"
        ):
            return fail(EXIT_USAGE, f"cannot listen: {leaf.strerror}")
        case KeyboardInterrupt():
            return EXIT_INTERRUPTED
        case SystemExit():
            raise exc
        case _:
            logger.critical("internal error (please report it)", exc_info=exc)
            return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
