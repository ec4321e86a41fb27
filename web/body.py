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
from .errors import HTTPError
from .keepalive import body_headers
from .settings import ServiceSettings


def too_large(settings: ServiceSettings) -> HTTPError:
    """The refusal of a body larger than ``max_body_bytes`` (as werkzeug's 413 is answered)."""
    return HTTPError(
        413,
        f"the request body is larger than {settings.max_body_bytes} bytes",
        type="invalid_request_error",
        code="body_too_large",
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
        raise too_large(settings)
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
                raise too_large(settings)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    raise HTTPError(
        408,
        f"the request body did not arrive within the request's timeout of {head.timeout:g}s",
        type="timeout_error",
        code="body_timeout",
    )


__all__ = ["read_body", "too_large"]
