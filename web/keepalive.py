"""An ASGI wrapper that keeps HTTP/1.1 keep-alive connections usable after an early answer.

Root cause of the wedge (Hypercorn 0.18 + Quart-Trio 0.12, measured): Hypercorn's h11 protocol recycles a
keep-alive connection (``_maybe_recycle``: start the next request cycle, restart the idle timer, or close
the socket) *inside the application's last* ``send()`` call, so in the application's task. On that path it
also hands the application ``http.disconnect``; Quart-Trio's message reader receives it and cancels the
request's nursery, which holds that very ``send()``. The next checkpoint in ``_maybe_recycle`` raises
``Cancelled``, and the connection is left with no request stream, no idle timer and no close. When the
request body was already read this happens to pass (no checkpoint is reached); when the app answered
before the body arrived (401, 404, 405, 413, 400 with the body in its own TCP segment, as httpx sends it),
or when the connection must close (the client's ``Connection: close``), the next request on the socket
never gets an answer and the socket stays open forever. A plain ASGI app is not cancelled, so it is fine.

The fix, in one place for every route:

1. The final ``http.response.body`` message is sent in a shielded, time-bounded scope, so Hypercorn's
   recycling runs to its end (next cycle + idle timer, or close).
2. An answer sent before the request body arrived waits for the body first (bounded by the body size
   limit and a time limit), so the connection can be reused; when the body is larger than the limit or
   does not come in time, the answer carries ``Connection: close`` and the server closes the socket.
   A 408 (the wait for the body already ended: RFC 9110 section 15.5.9) closes at once, unheld.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope

# The most time the last send of a response may take while shielded (it writes a few bytes to a socket).
_FINAL_SEND_LIMIT = 10.0


def body_headers(scope: Any) -> tuple[int | None, bool]:
    """The declared ``Content-Length`` (None if absent or not a number), and whether a body follows."""
    declared: int | None = None
    chunked = False
    for name, value in scope.get("headers", ()):
        lowered = name.lower()
        if lowered == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
        elif lowered == b"transfer-encoding":
            chunked = True
    return declared, chunked or (declared or 0) > 0


async def drain_body(
    scope: Any, receive: ASGIReceiveCallable, *, max_bytes: int, max_wait: float
) -> bool | None:
    """Read (never parse) the request body of an answer given without it, so the connection can serve
    the next request. Blocks for the body, at most ``max_wait`` seconds.

    Returns:
        Whether all of it came within ``max_bytes`` and ``max_wait`` (else the connection must close);
        None if the client left.
    """
    declared, has_body = body_headers(scope)
    if not has_body:
        return True
    if declared is not None and declared > max_bytes:
        return False
    received = 0
    with trio.move_on_after(max_wait):
        while True:
            message: Any = await receive()
            if message["type"] == "http.disconnect":
                return None
            received += len(message.get("body", b""))
            if received > max_bytes:
                return False
            if not message.get("more_body", False):
                return True
    return False


class KeepAliveGuard:
    """Wrap an ASGI app so that early answers never wedge an HTTP/1.1 keep-alive connection.

    Args:
        app: The ASGI application (the Quart-Trio app).
        max_body_bytes: The largest body worth draining; a larger one gets ``Connection: close``.
        drain_timeout: The most seconds an early answer waits for the rest of the request body.
    """

    def __init__(self, app: ASGIFramework, *, max_body_bytes: int, drain_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain_timeout = drain_timeout

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Plain flags, and an Event only when an early answer has to wait: this runs for every request.
        body_done = settled = False  # the whole body arrived (or the client left) / ... or too much did
        waiter: trio.Event | None = None
        received = 0
        declared, has_body = body_headers(scope)
        if not has_body:
            body_done = settled = True
        elif declared is not None and declared > self.max_body_bytes:
            settled = True

        async def tracked_receive() -> ASGIReceiveEvent:
            nonlocal received, body_done, settled
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_done = True
                if body_done or received > self.max_body_bytes:
                    settled = True
            elif message["type"] == "http.disconnect":
                body_done = settled = True
            if settled and waiter is not None:
                waiter.set()
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal waiter, settled
            if message["type"] == "http.response.start" and not body_done:
                # An answer before the body arrived: wait for the body (bounded) so the connection
                # stays usable, or tell the client the connection closes. An answer that says so itself
                # (the front door's refusal, after its own bounded read) is not held again.
                closing = any(
                    name.lower() == b"connection" and value.lower() == b"close"
                    for name, value in message.get("headers", ())
                )
                if closing or message["status"] == 408:  # a 408 gave up on the body already
                    settled = True
                if not settled:
                    waiter = trio.Event()
                    with trio.move_on_after(self.drain_timeout):
                        await waiter.wait()
                if not body_done and not closing:
                    message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Hypercorn recycles or closes the connection inside this call: let it finish.
                with trio.CancelScope(shield=True) as final:
                    final.deadline = trio.current_time() + _FINAL_SEND_LIMIT
                    await send(message)
                return
            await send(message)

        await self.app(scope, tracked_receive, guarded_send)


__all__ = ["KeepAliveGuard", "body_headers"]
