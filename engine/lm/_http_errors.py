"""Translating HTTP failures of a provider into the engine's error tree (the adapter edge)."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx

from .._errors import (
    ConfigError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)


@contextmanager
def transport_errors(model: str) -> Iterator[None]:
    """Translate httpx failures raised inside the block; the most specific first, ``httpx.RequestError``
    (anything else that went wrong with the request) last. ``trio.Cancelled`` passes through."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeoutError(f"{model}: no answer in time ({type(exc).__name__})", model=model) from exc
    except (httpx.DecodingError, httpx.TooManyRedirects) as exc:
        error: UpstreamError = UpstreamResponseError(f"{model}: {type(exc).__name__}: {exc}", model=model)
        raise error from exc
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
        # Our own request cannot be sent (a URL without http(s), a header value h11 refuses): no retry
        # can help, so this is not a (retryable) connection failure.
        raise ConfigError(f"{model}: the request cannot be sent: {type(exc).__name__}: {exc}") from exc
    except httpx.RequestError as exc:
        raise UpstreamConnectionError(f"{model}: {type(exc).__name__}: {exc}", model=model) from exc


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    Returns None when neither header is present or parseable. Never negative. A value that is not a
    finite number (``inf``, ``Infinity``, ``nan``, ``1e400``) is ignored like any other garbage: it
    falls through from ``retry-after-ms`` to ``Retry-After``, and from there to None. How long is too
    long is the retry policy's decision (``RetryPolicy.max_retry_after``).
    """
    if (ms := _finite(headers.get("retry-after-ms"))) is not None:
        return max(0.0, ms / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    if (seconds := _finite(value)) is not None:
        return max(0.0, seconds)
    if _number_like(value):
        return None  # "inf", "nan", "1e400": a number, but not one to wait for
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _finite(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _number_like(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _provider_message(body: str) -> str:
    import json

    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:500]
    if isinstance(error, str):
        return error[:500]
    return body[:200]


def status_error(model: str, status: int, headers: Mapping[str, str], body: str) -> UpstreamError:
    """The engine error for a provider response with an error ``status``. Every retryable status
    (429, and 5xx such as 503 and Anthropic's 529) carries the provider's ``Retry-After``."""
    message = f"{model}: HTTP {status}: {_provider_message(body)}"
    retry_after = parse_retry_after(headers)
    if status == 429:
        return UpstreamRateLimitedError(message, model=model, status=status, retry_after=retry_after)
    if status >= 500:
        return UpstreamServerError(message, model=model, status=status, retry_after=retry_after)
    return UpstreamResponseError(message, model=model, status=status)
