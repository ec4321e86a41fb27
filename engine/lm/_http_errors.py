"""Translating failures of a provider into the engine's error tree (the adapter edge), and what each
side learns of them.

A client of the service reads an error's ``message``; the server's log gets the details. So a message is
written here in our own words — the status and what it means, a fixed phrase per transport failure —
and never quotes the upstream: an upstream's error text can quote the credentials it received (a 401
``Incorrect API key provided: sk-...``, a proxy's page dumping the request headers), and a foreign
exception's text can quote the upstream's bytes (h11 quotes a malformed header line). The upstream's
words and the exception's text go to the ``dspy_trio.engine.lm`` log at WARNING, redacted (``_redact``) and
cut to 500 characters.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

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
from ._body import BadResponse
from ._redact import Redactor

log = logging.getLogger("dspy_trio.engine.lm")

# What a status says, in a client's words (a 5xx not listed here "failed").
_STATUS_WORDS = {
    400: "it rejected the request",
    401: "it refused the credentials: check the LM's api_key",
    402: "it asks for payment",
    403: "it refused access",
    404: "it has no such model or endpoint",
    408: "it timed out reading the request",
    409: "it reported a conflict",
    413: "it found the request too large",
    422: "it could not process the request",
    429: "it is rate limiting requests",
}

# httpx's failures in the transports' own words (the lean transport's are in ``_transport._errors``).
_HTTPX_WORDS: tuple[tuple[type[Exception], str], ...] = (
    (httpx.ConnectTimeout, "no connection to the upstream in time"),
    (httpx.ReadTimeout, "the upstream stayed silent past the read timeout"),
    (httpx.WriteTimeout, "the upstream did not take the request in time"),
    (httpx.PoolTimeout, "no free connection to the upstream in time"),
    (httpx.TimeoutException, "the upstream did not answer in time"),
    (httpx.ConnectError, "could not connect to the upstream"),
    (httpx.ReadError, "the connection to the upstream broke while reading"),
    (httpx.WriteError, "the connection to the upstream broke while sending"),
    (httpx.RemoteProtocolError, "the upstream broke HTTP or closed the connection mid-answer"),
    (httpx.DecodingError, "the upstream's answer could not be decoded"),
    (httpx.TooManyRedirects, "the upstream redirected too many times"),
)


def failure(
    cls: type[UpstreamError], model: str, public: str, detail: str, redact: Redactor, **fields: Any
) -> UpstreamError:
    """An engine error ``cls`` whose message (what clients read) is ``public``; ``detail`` — the
    upstream's words, or a foreign exception's text — is logged, redacted, and kept nowhere else."""
    if detail and detail != public:
        log.warning("%s: %s: %s", model, public, redact.excerpt(detail))
    else:
        log.warning("%s: %s", model, public)
    return cls(f"{model}: {public}", model=model, **fields)


@contextmanager
def transport_errors(model: str, redact: Redactor) -> Iterator[None]:
    """Translate httpx failures (and the body decoder's :class:`BadResponse`) raised inside the block;
    ``httpx.RequestError`` (anything else that went wrong with the request) last. ``trio.Cancelled``
    passes through."""
    try:
        yield
    except BadResponse as exc:
        raise failure(UpstreamResponseError, model, exc.public, str(exc), redact) from exc
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
        # Our own request cannot be sent (a URL without http(s), a header value h11 refuses): no retry
        # can help, so this is not a (retryable) connection failure.
        raise ConfigError(f"{model}: the request cannot be sent: {redact.excerpt(str(exc))}") from exc
    except (httpx.TimeoutException, httpx.DecodingError, httpx.TooManyRedirects, httpx.RequestError) as exc:
        public = next(
            (words for kind, words in _HTTPX_WORDS if isinstance(exc, kind)),
            "the request to the upstream failed",
        )
        cls: type[UpstreamError] = UpstreamConnectionError
        if isinstance(exc, httpx.TimeoutException):
            cls = UpstreamTimeoutError
        elif isinstance(exc, (httpx.DecodingError, httpx.TooManyRedirects)):
            cls = UpstreamResponseError
        raise failure(cls, model, public, f"{type(exc).__name__}: {exc}", redact) from exc


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    Returns None when neither header is present or parseable. Never negative. A delay is a finite
    decimal number in ASCII (RFC 9110's ``delay-seconds``, and the fractions and exponents providers
    send): not ``inf``, ``nan``, ``1e400`` or a non-ASCII digit such as ``\u0663``, all of which
    ``float()`` would take. A field repeated in the response (a provider's and a proxy's) arrives
    joined by ``", "`` (RFC 9110 section 5.3; both transports present it so): the wait is the longest
    delay listed. A value that is garbage falls through from ``retry-after-ms`` to ``Retry-After``, and
    from there to None. How long is too long is the retry policy's decision
    (``RetryPolicy.max_retry_after``).
    """
    if (ms := _delay(headers.get("retry-after-ms"))) is not None:
        return ms / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    if (seconds := _delay(value)) is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_DELAY = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _delay(value: str | None) -> float | None:
    """The longest of the comma-separated delays in ``value``; None unless every one is a delay."""
    if value is None:
        return None
    delays = [part.strip() for part in value.split(",")]
    if not all(_DELAY.fullmatch(delay) for delay in delays):
        return None
    longest = max(float(delay) for delay in delays)
    return max(0.0, longest) if math.isfinite(longest) else None


def _provider_words(body: str) -> str:
    """What the provider said in an error body: its JSON error's type and message, or the body. (A body
    over 64 KiB is not an API's error object: it is not parsed, since parsing multiplies memory.)"""
    if len(body) > 65536:
        return body
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return " ".join(str(error.get(key)) for key in ("type", "code", "message") if error.get(key))
    if isinstance(error, str):
        return error
    return body


def status_words(status: int) -> str:
    """What a client reads of an error status: ``the upstream answered HTTP 401: it refused ...``."""
    words = _STATUS_WORDS.get(status, "it failed" if status >= 500 else "it refused the request")
    return f"the upstream answered HTTP {status}: {words}"


def status_error(
    model: str, status: int, headers: Mapping[str, str], body: str, redact: Redactor
) -> UpstreamError:
    """The engine error for a provider response with an error ``status``: a message that says the
    status and what it means, the provider's words to the log (see the module docstring). Every
    retryable status (429, and 5xx such as 503 and Anthropic's 529) carries the provider's
    ``Retry-After``."""
    public = status_words(status)
    detail = _provider_words(body)
    retry_after = parse_retry_after(headers)
    if status == 429:
        return failure(UpstreamRateLimitedError, model, public, detail, redact, retry_after=retry_after)
    if status >= 500:
        return failure(
            UpstreamServerError, model, public, detail, redact, status=status, retry_after=retry_after
        )
    return failure(UpstreamResponseError, model, public, detail, redact, status=status)
