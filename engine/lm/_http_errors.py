"""Translating HTTP failures of a provider into the engine's error tree (the adapter edge)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx

from .._errors import (
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
    except httpx.RequestError as exc:
        raise UpstreamConnectionError(f"{model}: {type(exc).__name__}: {exc}", model=model) from exc


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    Returns None when neither header is present or parseable. Never negative.
    """
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
