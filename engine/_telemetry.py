"""Request logs and optional OpenTelemetry spans.

One JSON line per request on the ``engine.requests`` logger at INFO: request id, program, model, kind,
outcome, error code, timings, attempts and tokens; the inputs and outputs only when the engine's
``log_text`` is on (privacy by default). Spans are made only when ``opentelemetry-api`` is installed (and
do nothing until an SDK is configured): one around each request and one around each LM attempt, carrying
the request id, which links them to the log line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

request_log = logging.getLogger("engine.requests")

_otel_trace: Any
try:
    import opentelemetry.trace as _otel_trace
except ImportError:  # pragma: no cover - exercised when the optional dependency is absent
    _otel_trace = None


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` around the block when OpenTelemetry is available, else nothing."""
    if _otel_trace is None:
        yield None
        return
    tracer = _otel_trace.get_tracer("dspy_trio")
    clean = {k: v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(name, attributes=clean) as current:
        yield current


def log_request(record: dict[str, Any]) -> None:
    """Write one request's log line (JSON) at INFO."""
    request_log.info(json.dumps(record, default=str, separators=(",", ":")))
