"""A request body read below the framework (the routes answered below Quart, ``/mcp``): within the size
limit, by the deadline the request's head names.

::

    raw = await read_body(scope, receive, settings, head)   # None: the client left
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable

from .deadline import RequestDeadline
from .errors import HTTPError, body_too_large
from .keepalive import body_headers
from .settings import ServiceSettings


def not_sent_as_json() -> HTTPError:
    """The refusal of a body not sent as ``Content-Type: application/json``."""
    return HTTPError(
        415,
        "send the body as JSON with Content-Type: application/json",
        type="invalid_request_error",
        code="unsupported_media_type",
    )


def body_timeout(head: RequestDeadline | None) -> HTTPError:
    """The refusal of a body that did not arrive by the deadline its request's head named."""
    timeout = f" of {head.timeout:g}s" if head is not None else ""
    return HTTPError(
        408,
        f"the request body did not arrive within the request's timeout{timeout}",
        type="timeout_error",
        code="body_timeout",
    )


async def read_body(
    scope: Any, receive: ASGIReceiveCallable, settings: ServiceSettings, head: RequestDeadline
) -> bytes | None:
    """The request body, once it is all there. Blocks until then, at most until the head's deadline.
    (Refused part-way, the rest is left to the keep-alive guard, which closes the connection.)

    Returns:
        The body; None if the client left.

    Raises:
        HTTPError: 413 ``body_too_large`` (a ``Content-Length`` above the limit at once, a body that
            grows past it when it does); 408 ``body_timeout``.
    """
    declared, _ = body_headers(scope)
    if declared is not None and declared > settings.max_body_bytes:
        raise body_too_large(settings.max_body_bytes)
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_at(head.at):
        while True:
            message: Any = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise body_too_large(settings.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    raise body_timeout(head)


__all__ = ["body_timeout", "not_sent_as_json", "read_body"]
