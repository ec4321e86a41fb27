"""Engine errors as HTTP: one status per error class, bodies in OpenAI's error shape.

``{"error": {"message": ..., "type": ..., "code": ..., "param": ...}}``; never a stack trace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

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

if TYPE_CHECKING:
    from .call import Call
    from .settings import ServiceSettings


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


def body_too_large(max_bytes: int) -> HTTPError:
    """The refusal of a request body larger than ``max_bytes`` (however it was found out)."""
    return HTTPError(
        413,
        f"the request body is larger than {max_bytes} bytes",
        type="invalid_request_error",
        code="body_too_large",
    )


_WERKZEUG_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_answer(
    call: Call, error: Exception, settings: ServiceSettings, method: str = "POST", path: str = ""
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers of the answer to an error raised while answering ``call``,
    in OpenAI's shape (``method`` and ``path`` name the request in werkzeug's generic messages); a
    refusal by the web layer is noted on the call for the front door's log line.

    Raises:
        Exception: ``error`` itself when it is not one the service answers (a redirect of the router,
            a bug): the caller answers it as an internal error.
    """
    if isinstance(error, EngineError):
        return engine_error_response(error)
    if isinstance(error, HTTPError):
        call.notes.refused = error.code
        return http_error_response(error)
    if isinstance(error, HTTPException) and not isinstance(error, RoutingException):
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = body_too_large(settings.max_body_bytes).message
        elif message == type(error).description:  # werkzeug's generic text: say what is known
            message = f"{error.name.lower()}: {method} {path}"
        kind = "invalid_request_error" if status < 500 else "server_error"
        extra: dict[str, str] = {}
        if status == 405 and (valid := getattr(error, "valid_methods", None)):
            extra["Allow"] = ", ".join(sorted(valid))
        body = error_body(message, type=kind, code=_WERKZEUG_CODES.get(status, "http_error"))
        call.notes.refused = body["error"]["code"]
        return status, body, extra
    if isinstance(error, UnicodeDecodeError):
        call.notes.refused = "bad_request"
        body = error_body(
            "the request body must be UTF-8 JSON", type="invalid_request_error", code="bad_request"
        )
        return 400, body, {}
    raise error
