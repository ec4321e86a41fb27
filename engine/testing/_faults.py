"""What a test tells the fake upstream to do: the faults it applies, one per request, and its pacing."""

from __future__ import annotations

from typing import Literal, get_args

import attrs

FaultKind = Literal[
    "rate_limit",
    "server_error",
    "unavailable",
    "overloaded",
    "hang",
    "disconnect",
    "malformed",
    "endless_event",
    "endless_stream",
    "bomb",
    "nested",
    "html",
    "bad_utf8",
    "surrogate",
    "echo_key",
]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)


@attrs.frozen
class Fault:
    """One misbehaviour, applied to the next request that arrives.

    Attributes:
        kind: ``rate_limit`` (429), ``server_error`` (500), ``unavailable`` (503), ``overloaded``
            (529, Anthropic's), ``hang`` (never answer), ``disconnect`` (close the connection after
            ``after_tokens`` stream tokens, or at once when not streaming), ``malformed`` (a broken JSON
            body or stream chunk). Hostile answers: ``endless_event`` (a stream's ``data:`` lines never
            end an event; a JSON body never ends), ``endless_stream`` (valid deltas forever, one every
            ``token_delay``), ``bomb`` (the answer compressed with ``encoding``, inflating to ``size``
            bytes, sent in one write), ``nested`` (JSON ``size`` arrays deep, default 10,000, as the
            body or as one stream event), ``html`` (a ``status`` HTML page quoting the request's
            headers), ``bad_utf8`` (invalid UTF-8 in the completion text; on a stream, in the token
            after ``after_tokens``), ``surrogate`` (the same place holds ``\\ud800``: valid UTF-8 and
            valid JSON, but a lone surrogate once parsed), ``echo_key`` (a ``status`` error quoting the
            credentials received; on a stream with ``after_tokens``, an error event after that many
            tokens).
        retry_after: Seconds sent as ``Retry-After`` with 429/503.
        retry_after_ms: Milliseconds sent as ``retry-after-ms`` with 429/503.
        after_tokens: For ``disconnect``, ``malformed``, ``bad_utf8``, ``surrogate`` and ``echo_key`` on
            streams: good tokens sent first.
        status: The status of ``html`` (200) and ``echo_key`` (401).
        size: Bytes a ``bomb`` inflates to (100 MB); depth of ``nested`` (10,000).
        encoding: The ``Content-Encoding`` of a ``bomb``: ``gzip`` and ``deflate`` are real; any other
            label is sent over gzip bytes.
    """

    kind: FaultKind = attrs.field(validator=attrs.validators.in_(FAULT_KINDS))
    retry_after: float | None = None
    retry_after_ms: float | None = None
    after_tokens: int = 0
    status: int | None = None
    size: int | None = None
    encoding: str = "gzip"


@attrs.define
class Behavior:
    """How the fake upstream paces answers (seconds on Trio's clock).

    Attributes:
        latency: Time before a non-streaming answer.
        first_token_delay: Time before a stream's first token.
        token_delay: Time between stream tokens.
        words_per_field: Length of generated text fields.
        idle_timeout: Close a kept-alive connection that carried no request for this long, as real
            servers do (None: keep it open). The close is a half-close (``send_eof``), so the moment the
            *client* closes its end is seen and recorded in :attr:`FakeUpstream.idle_closes`.
    """

    latency: float = 0.0
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    words_per_field: int = 16
    idle_timeout: float | None = None
