"""Running one DSPy program for one request: the engine's port to DSPy's program API.

The program runs in the calling task under one DSPy settings context (its LM, its adapter, the stream
router, no history or trace growth, DSPy's usage tracker; see ``_dspy.program_context``) and the engine's
request trace. Whatever
the program raises that is not already an engine error becomes a :class:`ProgramError`: a parse failure
says what did not parse; any other exception is logged, and its name and text stay out of the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NoReturn

import trio

from . import _groups
from ._dspy import AdapterParseError, parse_failure_message, program_context
from ._errors import EngineError, ProgramError
from ._program_spec import AdapterName
from ._programs import Program
from ._request import Request
from ._request_sharing import sharing_scope
from ._result import PredictionResult, Timings, Usage
from ._streaming import DeltaRouter
from ._trace import RequestTrace, tracing
from .lm import TrioLM

logger = logging.getLogger("dspy_trio.engine")


class ProgramRunner:
    """Runs programs on the engine's LMs.

    Args:
        lms: The LM backends by name.
        adapter: The adapter of programs that do not name one.
    """

    def __init__(self, lms: Mapping[str, TrioLM], adapter: AdapterName) -> None:
        self._lms = lms
        self.adapter = adapter

    def model_of(self, lm: str | None) -> str:
        """The model name of the LM called ``lm`` (a metrics label), or "" for none."""
        return str(self._lms[lm].model) if lm is not None and lm in self._lms else ""

    def adapter_of(self, program: Program) -> AdapterName:
        return program.adapter or self.adapter

    async def run(
        self, request: Request, *, send_stream: DeltaRouter | None = None
    ) -> tuple[dict[str, Any], Usage]:
        """Run the request's program on its inputs. Blocks for every LM call the program makes.

        Raises:
            EngineError: what an LM call raised (upstream errors, timeouts).
            ProgramError: anything else the program raised.
        """
        program, values = request.program, request.values
        adapter = self.adapter_of(program)
        with (
            program_context(self._lms[program.lm], adapter, send_stream) as tracker,
            tracing(request.lm_params) as trace,
            sharing_scope(_sharer(request), no_cache=request.no_cache, no_store=request.no_store),
        ):
            request.trace = trace
            try:
                prediction = await program.module.acall(**values)
            except BaseExceptionGroup as group:
                _raise_program_failure(program, adapter, _groups.collapse(group))
            except Exception as exc:
                _raise_program_failure(program, adapter, exc)
        usage = Usage.from_tracker_totals(tracker.get_total_tokens(), saved_tokens=trace.saved_tokens)
        return dict(prediction.items()), usage

    @staticmethod
    def result(request: Request, outputs: dict[str, Any], usage: Usage) -> PredictionResult:
        """The request's result (kept on the request for its log line)."""
        trace = request.trace or RequestTrace()
        request.result = PredictionResult(
            request_id=request.request_id,
            program=request.program.name,
            outputs=outputs,
            usage=usage,
            timings=Timings(
                queued=request.admitted - request.started,
                lm=trace.lm_seconds,
                total=trio.current_time() - request.started,
                lm_calls=trace.lm_calls,
                cached_calls=trace.cached_calls,
                shared_calls=trace.shared_calls,
            ),
            attempts=trace.attempts,
            lm_calls=tuple(trace.answers),
            truncated=trace.truncated,
        )
        return request.result


def _raise_program_failure(program: Program, adapter: AdapterName, exc: BaseException) -> NoReturn:
    """Raise what a failure of ``program`` looks like to the engine's caller: engine errors and
    cancellation as they are, anything else as a :class:`ProgramError` caused by it."""
    if isinstance(exc, EngineError) or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, AdapterParseError):
        message = parse_failure_message(program.name, exc, adapter)
    else:
        # An exception's name and text are the program's internals (a RecursionError, a KeyError quoting
        # data): clients read that the program failed; the log, and the ``__cause__``, have the rest.
        logger.error("program %r failed", program.name, exc_info=exc)
        message = f"program {program.name!r} failed with an internal error (the server log has the details)"
    raise ProgramError(message) from exc


def _sharer(request: Request) -> str | None:
    """Who ``request`` shares answers and calls with under the cache's ``scope = "key"``: its API key
    and its tenant (two tenants never ride on each other's calls: each pays for, and is limited by,
    its own)."""
    if request.tenant is None:
        return request.owner
    return f"{request.tenant.name}\x00{request.owner or ''}"
