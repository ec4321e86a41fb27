"""Counters of request outcomes, snapshotted as a frozen value."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._admission import AdmissionStatistics
from ._errors import Outcome
from ._upstream import UpstreamStatistics


@attrs.frozen
class EngineStatistics:
    """A snapshot of an engine.

    Every request the engine was given is counted exactly once, when it ends, under one outcome:

    - ``succeeded``: returned a result.
    - ``failed``: ended with a typed error (upstream, program, slow consumer).
    - ``timed_out``: its deadline passed (the caller's effective deadline when it was accepted, or an
      engine time limit).
    - ``abandoned``: its caller's scope was cancelled before its deadline (a client disconnected, a
      consumer left a stream early).
    - ``cancelled``: the engine cancelled it on purpose (``dspy_trio.engine.cancel(request_id)``, fail-fast
    batch).
    - ``shut_down``: the engine's drain or close ended it.
    - ``rejected``: refused at admission (queue full, engine closing); nothing ran.
    - ``invalid``: refused for bad input (unknown program, bad fields); nothing ran.

    So ``requests_total == in_flight + queued + the eight outcomes`` at every moment.

    Attributes:
        errors_by_code: Requests that ended with a typed error, by the error's ``code``.
        in_flight, queued, max_in_flight, max_queued: Admission state and limits.
        closing: Whether the engine is refusing new requests.
        stream_deltas_dropped: Field deltas dropped by the ``drop`` backpressure policy.
        stream_deltas_coalesced: Field deltas merged into earlier ones by coalescing.
        upstreams: Per upstream (LM name): adaptive limit, retries by cause, rate-limit waits.
        seconds_total: Summed duration of the requests that ended after being accepted (every
            outcome but ``rejected`` and ``invalid``).
    """

    succeeded: int
    failed: int
    timed_out: int
    abandoned: int
    cancelled: int
    shut_down: int
    rejected: int
    invalid: int
    in_flight: int
    queued: int
    max_in_flight: int
    max_queued: int
    errors_by_code: Mapping[str, int]
    closing: bool
    stream_deltas_dropped: int = 0
    stream_deltas_coalesced: int = 0
    seconds_total: float = 0.0
    upstreams: Mapping[str, UpstreamStatistics] = attrs.field(factory=dict)

    @property
    def requests_total(self) -> int:
        return (
            self.succeeded
            + self.failed
            + self.timed_out
            + self.abandoned
            + self.cancelled
            + self.shut_down
            + self.rejected
            + self.invalid
            + self.in_flight
            + self.queued
        )

    @property
    def ended(self) -> int:
        """Accepted requests that have ended, whatever their outcome."""
        return (
            self.succeeded + self.failed + self.timed_out + self.abandoned + self.cancelled + self.shut_down
        )

    @classmethod
    def from_counters(
        cls,
        outcomes: Mapping[Outcome, int],
        errors: Mapping[str, int],
        *,
        admission: AdmissionStatistics,
        closing: bool,
        stream_deltas_dropped: int = 0,
        stream_deltas_coalesced: int = 0,
        seconds_total: float = 0.0,
        upstreams: Mapping[str, UpstreamStatistics] | None = None,
    ) -> EngineStatistics:
        return cls(
            succeeded=outcomes.get("succeeded", 0),
            failed=outcomes.get("failed", 0),
            timed_out=outcomes.get("timed_out", 0),
            abandoned=outcomes.get("abandoned", 0),
            cancelled=outcomes.get("cancelled", 0),
            shut_down=outcomes.get("shut_down", 0),
            rejected=outcomes.get("rejected", 0),
            invalid=outcomes.get("invalid", 0),
            in_flight=admission.in_flight,
            queued=admission.queued,
            max_in_flight=admission.max_in_flight,
            max_queued=admission.max_queued,
            errors_by_code=dict(errors),
            closing=closing,
            stream_deltas_dropped=stream_deltas_dropped,
            stream_deltas_coalesced=stream_deltas_coalesced,
            seconds_total=seconds_total,
            upstreams=dict(upstreams or {}),
        )
