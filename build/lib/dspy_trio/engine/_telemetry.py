"""Request logs and optional OpenTelemetry spans.

One JSON line per request on the ``engine.requests`` logger at INFO: request id, program, model, kind,
outcome, error code, timings, attempts and tokens; the inputs and outputs only when the engine's
``log_text`` is on (privacy by default). Spans are made only when ``opentelemetry-api`` is installed and
an SDK's tracer provider is configured (otherwise :func:`span` costs one check): one around each
request and one around each LM attempt, carrying the request id, which links them to the log line.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

request_log = logging.getLogger("dspy_trio.engine.requests")

_otel_trace: Any
_NO_PROVIDERS: tuple[type, ...] = ()
try:
    import opentelemetry.trace as _otel_trace

    # What get_tracer_provider() returns until an SDK's provider is set: spans from them do nothing.
    _NO_PROVIDERS = (_otel_trace.ProxyTracerProvider, _otel_trace.NoOpTracerProvider)
except ImportError:  # pragma: no cover - exercised when the optional dependency is absent
    _otel_trace = None


_NO_SPAN: AbstractContextManager[Any] = nullcontext()
_UNKNOWN = object()
_PROVIDER_VARIABLE = "OTEL_PYTHON_TRACER_PROVIDER"  # a provider OpenTelemetry loads on first use


def _tracing_configured() -> bool:
    """Whether an SDK's tracer provider is set (or named in the environment, which OpenTelemetry then
    loads). With neither, no provider object is fetched and nothing is made."""
    provider = getattr(_otel_trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is None and _PROVIDER_VARIABLE not in os.environ:
        return False
    return not isinstance(_otel_trace.get_tracer_provider(), _NO_PROVIDERS)


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A span named ``name`` around the block when OpenTelemetry is installed and a tracer provider is
    configured; else a shared do-nothing context (no span objects, no attribute dict: a check per call)."""
    if _otel_trace is None or not _tracing_configured():
        return _NO_SPAN
    tracer = _otel_trace.get_tracer("dspy_trio")
    clean = {k: v for k, v in attributes.items() if v is not None}
    return tracer.start_as_current_span(name, attributes=clean)  # type: ignore[no-any-return]


def log_request(record: dict[str, Any]) -> None:
    """Write one request's log line (JSON) at INFO."""
    request_log.info(json.dumps(record, default=str, separators=(",", ":")))
