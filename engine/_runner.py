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
from ._dspy import (
    AdapterParseError,
    parse_failure_message,
    predictor_fingerprint,
    program_context,
    pure_predictor,
)
from ._errors import EngineError, ProgramError
from ._program_spec import AdapterName
from ._programs import Program
from ._request import Request
from ._request_sharing import sharing_scope
from ._result import PredictionResult, Timings, Usage
from ._shared_predictions import SharedPrediction, SharedPredictions, prediction_key
from ._streaming import DeltaRouter
from ._trace import RequestTrace, tracing
from .lm import TrioLM

logger = logging.getLogger("dspy_trio.engine")


class ProgramRunner:
    """Runs programs on the engine's LMs.

    Args:
        lms: The LM backends by name.
        adapter: The adapter of programs that do not name one.
        predictions: Single-flight and the cache of whole predictions, for programs that are pure
            functions of their inputs and LM answers (None: every program runs for each request).
    """

    def __init__(
        self, lms: Mapping[str, TrioLM], adapter: AdapterName, predictions: SharedPredictions | None = None
    ) -> None:
        self._lms = lms
        self.adapter = adapter
        self._predictions = predictions

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
        adapter = self.adapter_of(request.program)
        predictions, shared = self._predictions, self._shared_whole(request, adapter)
        if predictions is None or shared is None:
            prediction = await self._run(request, adapter, send_stream)
            return prediction.outputs, prediction.usage
        predictor, key = shared
        if send_stream is None:
            return await self._shared(predictions, key, request, adapter)
        if (found := predictions.cached(key)) is not None:
            return await self._streamed_hit(predictions, found, request, predictor, send_stream)
        prediction = await self._run(request, adapter, send_stream)
        if not request.no_store:
            predictions.store(key, prediction)
        return prediction.outputs, prediction.usage

    def _shared_whole(self, request: Request, adapter: AdapterName) -> tuple[Any, str] | None:
        """The predictor and prediction key of ``request`` when its prediction is shared whole: a pure
        program (:func:`._dspy.pure_predictor`), not ``no_cache``, inputs that have a key; else None."""
        predictions, program = self._predictions, request.program
        if predictions is None or request.no_cache:
            return None
        predictor = pure_predictor(program.module)
        if predictor is None:
            return None
        key = prediction_key(
            predictions.secret,
            predictor_fingerprint(program.module, predictor),
            adapter=adapter,
            lm_name=program.lm,
            lm=self._lms[program.lm],
            values=request.values,
            params=request.lm_params,
            scope=predictions.scope_of(_sharer(request)),
        )
        return None if key is None else (predictor, key)

    async def _run(
        self,
        request: Request,
        adapter: AdapterName,
        send_stream: DeltaRouter | None,
        shared: bool = False,
    ) -> SharedPrediction:
        """The request's program, run here (or, ``shared``, for a flight of identical requests, whose
        usage DSPy's enclosing tracker gets through the one that paid for it).

        Raises:
            EngineError: what an LM call raised (upstream errors, timeouts).
            ProgramError: anything else the program raised (not ``shared``: a flight's waiters raise
                their copy of the program's own exception, and translate it themselves).
        """
        program = request.program
        with (
            program_context(self._lms[program.lm], adapter, send_stream, roll_up=not shared) as tracker,
            tracing(request.lm_params) as trace,
            sharing_scope(
                _sharer(request), no_cache=request.no_cache, no_store=request.no_store, direct=shared
            ) as sharing,
        ):
            if not shared:
                request.trace = trace
            try:
                result = await program.module.acall(**request.values)
            except BaseExceptionGroup as group:
                _raise_program_failure(program, adapter, _groups.collapse(group), translate=not shared)
            except Exception as exc:
                _raise_program_failure(program, adapter, exc, translate=not shared)
        return SharedPrediction(
            dict(result.items()),
            sharing.texts,
            Usage.from_tracker_totals(tracker.get_total_tokens(), saved_tokens=trace.saved_tokens),
            tracker.usage_data if shared else {},
            lm_calls=trace.lm_calls,
            answers=tuple(trace.answers),
            truncated=trace.truncated,
            cached_calls=trace.cached_calls,
            shared_calls=trace.shared_calls,
            attempts=trace.attempts,
            lm_seconds=trace.lm_seconds,
            storable=sharing.all_parsed,
        )

    async def _shared(
        self, predictions: SharedPredictions, key: str, request: Request, adapter: AdapterName
    ) -> tuple[dict[str, Any], Usage]:
        """The request's prediction shared with identical ones (stored, or in flight)."""
        started = trio.current_time()
        try:
            outputs, usage, request.trace = await predictions.predict(
                key, self._run, request, adapter, joined=started
            )
        except BaseException as exc:
            request.trace = RequestTrace(lm_seconds=trio.current_time() - started)  # its time waiting
            if isinstance(exc, BaseExceptionGroup):
                _raise_program_failure(request.program, adapter, _groups.collapse(exc))
            if isinstance(exc, Exception):
                _raise_program_failure(request.program, adapter, exc)
            raise
        return outputs, usage

    async def _streamed_hit(
        self,
        predictions: SharedPredictions,
        found: SharedPrediction,
        request: Request,
        predictor: Any,
        send_stream: DeltaRouter,
    ) -> tuple[dict[str, Any], Usage]:
        """A stored prediction streamed: its LM answer through the stream's router (one delta per
        field), then its outputs. Blocks while the stream's buffer is full (policy ``block``)."""
        outputs, usage, request.trace = predictions.hit(found)
        sink = send_stream.sink(id(predictor))
        if sink is not None and found.texts:
            await sink.send(found.texts[0])
        return outputs, usage

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


def _raise_program_failure(
    program: Program, adapter: AdapterName, exc: BaseException, *, translate: bool = True
) -> NoReturn:
    """Raise what a failure of ``program`` looks like to the engine's caller: engine errors and
    cancellation as they are, anything else as a :class:`ProgramError` caused by it (as it is, when
    not ``translate``: for a shared prediction's flight, whose waiters each translate their copy)."""
    if isinstance(exc, EngineError) or not isinstance(exc, Exception) or not translate:
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
