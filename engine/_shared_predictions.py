"""Single-flight and the response cache for whole predictions, one level above the layer of LM calls.

A program whose prediction is a pure function of its inputs and its LM's answers (DSPy's own ``Predict``
and ``ChainOfThought``: :func:`._dspy.pure_predictor`) makes the same prediction for the same program
(signature, demos, config), inputs, LM settings, adapter and scope. Identical predictions of such a
program share the whole prediction, not only its LM call: a request that waits for one in flight, or
finds one stored, skips the program's adapter (formatting the prompt, parsing the answer), which is
most of what a shared LM call still costs. Programs of several calls or custom code share call by
call (:mod:`._coalesce`).

- **Flights.** The first request of a key starts a :class:`~._flight.Flight`: the program runs in a task
  of the engine, its deadline the latest of its waiters', cancelled when the last one leaves; each
  waiter keeps its own deadline and cancel, and gets its own copy of the outputs (or of the error).
  The flight's LM calls go through the layer of calls marked ``direct``: a call of its own costs no
  second flight, and is shared call by call only when another process or an identical streamed call
  in flight could share it.
- **Stored** (``memory`` backend) once the program succeeded and its adapter parsed every LM answer
  (not DSPy's fallback from ChatAdapter to JSONAdapter), within ``max_entry_bytes``, unless every
  request of the flight said ``no_store``. Kept beside the LM calls' answers, in the same LRU bounds.
- **Streams** of such a program read a stored prediction (its LM answer goes through the stream's
  router: one delta per field, as a cached LM call streams) and store their own when they end; they
  run their own program otherwise, so that their LM call joins a streamed flight and tokens arrive live.
- **Not** for ``no_cache`` requests (a fresh program run, and a fresh LM call below).

The first waiter to get a flight's prediction is the one that paid for it (its usage, its attempts);
every other gets it with no usage and its tokens counted as saved, as for a shared LM call.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import _request_sharing
from ._call_key import NOT_IN_KEY
from ._dspy import roll_up_usage, written_out
from ._errors import EngineClosedError
from ._flight import Flight, FlightLost
from ._result import LMCall, Usage
from ._trace import RequestTrace

if TYPE_CHECKING:
    from ._coalesce import Sharing
    from ._program_spec import AdapterName
    from ._request import Request
    from .lm import TrioLM

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=repr)
# The inputs: every value written out in full, or no key at all (a repr may elide an image's data).
_values_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=written_out)
# Values shared as they are; anything else is copied (a tuple or frozenset may hold a list or a model).
_IMMUTABLE = (str, int, float, bool, type(None), bytes)


@attrs.frozen
class SharedPrediction:
    """A whole prediction, as its flight made it or the cache keeps it.

    Attributes:
        outputs: The output fields (each receiver gets its own copy).
        texts: The texts of its (last) LM answer: what a stream that reads it from the cache streams.
        usage: What its LM calls spent (saved tokens included, of calls that were shared below).
        usage_data: DSPy's usage entries of those calls, per model (for an application's tracker).
        lm_calls, cached_calls, shared_calls, attempts, lm_seconds: Its trace.
        answers: Its LM calls, each named by the LM that answered it (a fallback's, when one did).
        truncated: An LM answer of it stopped at its token limit.
        storable: Its adapter parsed every LM answer it received.
    """

    outputs: dict[str, Any]
    texts: Sequence[str]
    usage: Usage
    usage_data: Mapping[str, Sequence[Any]] = attrs.field(factory=dict)
    lm_calls: int = 0
    cached_calls: int = 0
    shared_calls: int = 0
    attempts: int = 0
    lm_seconds: float = 0.0
    answers: tuple[LMCall, ...] = ()
    truncated: bool = False
    storable: bool = False

    def answers_unpaid(self) -> list[LMCall]:
        """Its LM calls as a request that did not pay for them sees them: the same LMs, no tokens (a
        tenant pays nothing for an answer it was given)."""
        return [attrs.evolve(call, prompt_tokens=0, completion_tokens=0) for call in self.answers]

    @property
    def tokens(self) -> int:
        """Every token its LM answers were worth, spent or saved."""
        return self.usage.total_tokens + self.usage.saved_tokens


Answer = tuple[dict[str, Any], Usage, RequestTrace]


def own_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A receiver's own copy of shared outputs (strings and numbers shared, anything else copied)."""
    return {
        name: value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value)
        for name, value in outputs.items()
    }


# Per LM: its request parameters (as the key shows them), and the parameters they were read from.
_PARAMS: dict[int, tuple[dict[str, Any], str]] = {}


def _params_text(lm: TrioLM) -> str:
    kwargs = lm.kwargs
    cached = _PARAMS.get(id(lm))
    if cached is None or cached[0] != kwargs:
        shown = sorted((name, value) for name, value in kwargs.items() if name not in NOT_IN_KEY)
        cached = _PARAMS[id(lm)] = (dict(kwargs), _encoder.encode(shown))
    return cached[1]


def prediction_key(
    secret: bytes,
    fingerprint: str,
    *,
    adapter: str,
    lm_name: str,
    lm: TrioLM,
    values: Mapping[str, Any],
    scope: str,
    params: Mapping[str, Any] | None = None,
) -> str | None:
    """The hex digest that identifies one prediction of a pure program: the program's fingerprint
    (:func:`._dspy.predictor_fingerprint`), its adapter, its LM (the engine's name, the model, its
    request parameters but credentials and transport settings), the inputs, the request's own LM
    parameters (``params``) and the scope. Keyed like
    the LM calls' keys (:mod:`._call_key`), and never equal to one (theirs start otherwise). None when
    an input cannot be written out in full (:func:`._dspy.written_out`): such a prediction is not
    shared whole. Does no I/O."""
    try:
        inputs = _values_encoder.encode(values)
    except (TypeError, ValueError):  # a value of no key, or a cycle
        return None
    model = str(lm.model)
    text = (
        f"prediction|{len(lm_name)}:{lm_name}{len(model)}:{model}{len(adapter)}:{adapter}"
        f"{len(scope)}:{scope}{_params_text(lm)}\n{fingerprint}\n{inputs}"
    )
    if params:  # the request's own LM parameters (OpenAI's temperature, max_tokens, ...)
        text += f"\n{_encoder.encode(sorted(params.items()))}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), key=secret, digest_size=20).hexdigest()


# The name of a flight's task (given, so that Trio need not make one up for each flight).
_FLIGHT_TASK = f"{__name__}.SharedPredictions._run"


class _PredictionFlight(Flight[SharedPrediction]):
    """A prediction in flight, and whether some request of it lets its prediction be stored."""

    __slots__ = ("store",)

    def __init__(self, key: str, deadline: float, store: bool) -> None:
        super().__init__(key, streamed=False, deadline=deadline)
        self.store = store


class SharedPredictions:
    """The engine's predictions in flight, and its stored ones (in the sharing layer's memory cache).

    Args:
        sharing: The layer of LM calls: its configuration, secret, memory cache, nursery and counts.
    """

    def __init__(self, sharing: Sharing) -> None:
        self._sharing = sharing
        self._flights: dict[str, _PredictionFlight] = {}
        self._cache_on = sharing.config.backend != "off"
        sharing.other_flights.append(self)

    def __repr__(self) -> str:
        return f"<SharedPredictions [{len(self._flights)} in flight]>"

    def __len__(self) -> int:
        return len(self._flights)

    def scope_of(self, owner: str | None) -> str:
        """Who may share a prediction of a request of ``owner``."""
        return (owner or "") if self._sharing.config.scope == "key" else ""

    @property
    def secret(self) -> bytes:
        return self._sharing.secret

    # --- the cache -----------------------------------------------------------------------------------

    def cached(self, key: str) -> SharedPrediction | None:
        """The stored prediction of ``key``, or None. Never blocks."""
        memory = self._sharing.memory
        if memory is None:
            return None
        found = memory.get(key)
        return found if isinstance(found, SharedPrediction) else None

    def store(self, key: str, prediction: SharedPrediction) -> None:
        """Store ``prediction`` if it may be (parsed, within ``max_entry_bytes``). Never blocks."""
        memory = self._sharing.memory
        if memory is None or not prediction.storable:
            return
        size = len(_encoder.encode([prediction.outputs, list(prediction.texts)]).encode("utf-8", "replace"))
        if size <= self._sharing.config.max_entry_bytes:  # kept apart from what its maker returns
            memory.put(key, attrs.evolve(prediction, outputs=own_outputs(prediction.outputs)), size)

    def hit(self, found: SharedPrediction) -> Answer:
        """What a request answered by the stored ``found`` gets, counted as a cache hit."""
        counts, calls, tokens = self._sharing.counts, found.lm_calls, found.tokens
        counts["hit"] += calls
        counts["tokens_saved"] += tokens
        trace = RequestTrace(
            lm_calls=calls,
            cached_calls=calls,
            saved_tokens=tokens,
            answers=found.answers_unpaid(),
            truncated=found.truncated,
        )
        return own_outputs(found.outputs), Usage(saved_tokens=tokens), trace

    # --- flights -------------------------------------------------------------------------------------

    async def predict(
        self,
        key: str,
        make: Callable[[Request, AdapterName, None, bool], Awaitable[SharedPrediction]],
        request: Request,
        adapter: AdapterName,
        *,
        joined: float | None = None,
    ) -> Answer:
        """The prediction of ``key``: stored, the one in flight joined, or one started whose flight runs
        ``make(request, adapter, None, True)`` (the program, for ``request`` and those identical to it) in a
        task of the engine. Blocks until it is made, or the caller's own scope is cancelled (the caller
        leaves the flight; the last to leave cancels it).

        ``joined`` is when the caller began waiting (now, if not given): a waiter's time in its trace.

        Raises:
            Exception: a copy of what the program raised (its ``__context__`` kept).
            EngineClosedError: the engine is shutting down.
        """
        sharing = self._sharing
        memory = sharing.memory
        if memory is not None and isinstance(found := memory.get(key), SharedPrediction):
            return self.hit(found)
        if not sharing.config.single_flight:  # the cache alone: the program in the caller's task
            prediction = await make(request, adapter, None, True)
            if not request.no_store:
                self.store(key, prediction)
            return self._paid(prediction)
        if joined is None:
            joined = trio.current_time()
        while True:
            flight = self._flights.get(key)
            deadline = trio.current_effective_deadline()
            if flight is None or flight.scope.cancel_called:
                if sharing.closed:
                    raise EngineClosedError("the engine is shutting down")
                flight = self._flights[key] = _PredictionFlight(key, deadline, not request.no_store)
                waiter = flight.join(deadline, streams=False)
                sharing.nursery.start_soon(self._run, flight, make, request, adapter, name=_FLIGHT_TASK)
            else:
                flight.store = flight.store or not request.no_store
                waiter = flight.join(deadline, streams=False)
            try:
                prediction = await flight.receive(waiter, None)
            except FlightLost:
                await trio.lowlevel.checkpoint()  # raises the caller's own cancel, if that is why
                continue
            except Exception as exc:
                if flight.error is not None and exc is not flight.error:
                    exc.__context__ = flight.error.__context__  # what a parse failure's message reads
                raise
            return self._answered(flight, prediction, joined)

    def _answered(
        self, flight: Flight[SharedPrediction], prediction: SharedPrediction, joined: float
    ) -> Answer:
        """What one waiter of ``flight`` gets and counts."""
        if flight.answered == 1:  # the first to get it: it paid for it (its LM calls counted below)
            return self._paid(prediction)
        outputs = own_outputs(prediction.outputs)
        counts, calls, cached, tokens = (
            self._sharing.counts,
            prediction.lm_calls,
            prediction.cached_calls,
            prediction.tokens,
        )
        if self._cache_on:
            counts["hit"] += cached
            counts["miss"] += calls - cached
        counts["coalesced"] += calls - cached
        counts["tokens_saved"] += tokens
        trace = RequestTrace(
            lm_seconds=trio.current_time() - joined,
            lm_calls=calls,
            cached_calls=cached,
            shared_calls=calls - cached,
            saved_tokens=tokens,
            answers=prediction.answers_unpaid(),
            truncated=prediction.truncated,
        )
        return outputs, Usage(saved_tokens=tokens), trace

    @staticmethod
    def _paid(prediction: SharedPrediction) -> Answer:
        """What the request that paid for ``prediction`` gets: its usage (also in DSPy's tracker open
        here, if any) and its trace (its LM calls were counted as they were made)."""
        roll_up_usage(prediction.usage_data)
        trace = RequestTrace(
            lm_seconds=prediction.lm_seconds,
            lm_calls=prediction.lm_calls,
            attempts=prediction.attempts,
            cached_calls=prediction.cached_calls,
            shared_calls=prediction.shared_calls,
            saved_tokens=prediction.usage.saved_tokens,
            answers=list(prediction.answers),
            truncated=prediction.truncated,
        )
        return own_outputs(prediction.outputs), prediction.usage, trace

    async def _run(
        self,
        flight: _PredictionFlight,
        make: Callable[[Request, AdapterName, None, bool], Awaitable[SharedPrediction]],
        request: Request,
        adapter: AdapterName,
    ) -> None:
        """A flight's task: the program, then the prediction stored if it may be."""
        _request_sharing.detach()  # the flight serves many requests: it carries none's switches
        try:
            await flight.run(make(request, adapter, None, True))
        finally:
            # Before any waiter runs again: they find the flight gone.
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            if flight.completion is not None and flight.store:
                self.store(flight.key, flight.completion)
