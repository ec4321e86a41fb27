"""The events of a stream, in the order a consumer sees them.

Zero or more :class:`StatusEvent` and :class:`FieldDelta` events, then exactly one terminal event:
:class:`FinalEvent` (the complete prediction) or :class:`ErrorEvent` (a typed error). Nothing follows it.
"""

from __future__ import annotations

import attrs

from ._errors import EngineError
from ._result import PredictionResult


@attrs.frozen
class StatusEvent:
    """A change in the request's state: ``running`` once it holds a slot (after ``queued`` seconds)."""

    stage: str
    queued: float = 0.0


@attrs.frozen
class FieldDelta:
    """New text of one output field of one predictor.

    Attributes:
        predictor: The predictor's name in the program (``self`` for a lone ``Predict``, ``predict`` for
            ``ChainOfThought``, attribute paths such as ``polish.predict`` in custom modules).
        field: The output field (``answer``, ``reasoning``, ...).
        text: The text added since the field's previous delta.
        call: Which LM call of the predictor the text comes from, counted from 0 within the request: a
            module that calls one predictor twice (a refinement loop) streams both answers, and the
            outputs are rebuilt from the deltas of the predictor's last call.
    """

    predictor: str
    field: str
    text: str
    call: int = 0

    def same_field(self, other: FieldDelta) -> bool:
        return self.predictor == other.predictor and self.field == other.field and self.call == other.call


@attrs.frozen
class FinalEvent:
    """The stream's successful end: the complete prediction, whatever was dropped on the way.

    Attributes:
        result: Outputs, usage and timings, as :meth:`Engine.predict` returns them.
        dropped: Deltas dropped by the ``drop`` backpressure policy.
        coalesced: Deltas merged into earlier ones.
    """

    result: PredictionResult
    dropped: int = 0
    coalesced: int = 0


@attrs.frozen
class ErrorEvent:
    """The stream's unsuccessful end, with the error that ended it."""

    error: EngineError


StreamEvent = StatusEvent | FieldDelta | FinalEvent | ErrorEvent
