"""Engine errors as HTTP: one status per error class, bodies in OpenAI's error shape.

``{"error": {"message": ..., "type": ..., "code": ..., "param": ...}}``; never a stack trace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dspy_trio.engine import (
    CircuitOpenError,
    ClusterUnavailableError,
    DeadlineExceededError,
    DeadlineUnmeetableError,
    EngineClosedError,
    EngineError,
    InvalidInputError,
    OverloadedError,
    ProgramError,
    RequestAbandonedError,
    RequestCancelledError,
    SlowConsumerError,
    UnknownProgramError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamTimeoutError,
)


class HTTPError(Exception):
    """An error of the HTTP layer itself (bad JSON, auth, size limits), with its status (and, for a
    refusal the client should retry, the seconds to wait: ``Retry-After``; any other header the
    answer must carry in ``headers``, e.g. a 426's ``Upgrade``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers = dict(headers or {})


# Most specific first.
_STATUS: list[tuple[type[EngineError], int, str]] = [
    (UnknownProgramError, 404, "not_found_error"),
    (InvalidInputError, 422, "invalid_request_error"),
    (DeadlineUnmeetableError, 503, "service_unavailable_error"),
    (OverloadedError, 429, "rate_limit_error"),
    (EngineClosedError, 503, "service_unavailable_error"),
    (ClusterUnavailableError, 503, "service_unavailable_error"),
    (RequestCancelledError, 499, "cancelled_error"),
    (RequestAbandonedError, 499, "cancelled_error"),
    (DeadlineExceededError, 504, "timeout_error"),
    (SlowConsumerError, 408, "timeout_error"),
    (UpstreamRateLimitedError, 429, "rate_limit_error"),
    (UpstreamTimeoutError, 504, "upstream_error"),
    (CircuitOpenError, 503, "upstream_error"),
    (UpstreamError, 502, "upstream_error"),
    (ProgramError, 502, "upstream_error"),
]


def status_of(error: EngineError) -> tuple[int, str]:
    """The HTTP status and OpenAI error ``type`` for an engine error."""
    for cls, status, kind in _STATUS:
        if isinstance(error, cls):
            return status, kind
    return 500, "server_error"


_MAX_RETRY_AFTER = 86_400.0


def error_body(message: str, *, type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def engine_error_response(error: EngineError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers (``Retry-After``) for an engine error."""
    status, kind = status_of(error)
    param = error.field if isinstance(error, InvalidInputError) else None
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if status in (429, 503) or isinstance(error, EngineClosedError):
        headers["Retry-After"] = _retry_after_header(retry_after)
    return status, error_body(error.message, type=kind, code=error.code, param=param), headers


def _retry_after_header(seconds: float | None) -> str:
    """Whole seconds (RFC 9110), at least 1 and at most a day; 1 when unknown or not a finite number,
    so an upstream's absurd value (``Retry-After: inf``) stops here."""
    if seconds is None or not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(min(seconds, _MAX_RETRY_AFTER))))


def http_error_response(error: HTTPError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers (``Retry-After``, the error's own) for an error of the HTTP
    layer."""
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = _retry_after_header(error.retry_after)
    body = error_body(error.message, type=error.type, code=error.code, param=error.param)
    return error.status, body, headers
