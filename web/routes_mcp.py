"""``/mcp``: the MCP endpoint (:mod:`dspy_trio.web.mcp`), handed the raw request by the front door."""

from __future__ import annotations

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .call import Call
from .mcp import answer_refusal
from .service import Service, not_ready


async def mcp_endpoint(
    service: Service, call: Call, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """MCP over Streamable HTTP: each program a tool (``tools/list``, ``tools/call``)."""
    endpoint = service.mcp
    if endpoint is None:  # not started yet
        call.notes.refused = "not_ready"
        await answer_refusal(send, not_ready())
        return
    await endpoint(call, scope, receive, send)


__all__ = ["mcp_endpoint"]
