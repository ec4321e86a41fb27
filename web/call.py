"""A call to the service, as one value: built once, below the framework, and handed down explicitly.

::

    call = Call(new_request_id(), label, owner, arrived, route, program, timeout_header)  # the door
    until = call.deadline(settings, data.timeout_secs)       # a handler, once the body is parsed
    frame = call.frame("a", trio.current_time(), "default")   # one /v1/ws frame: a call of its own

Like Hypercorn's ``scope``, a :class:`Call` is made once per request by the front door
(:mod:`dspy_trio.web.door`) from the request's head, and every layer above reads it there: the handler
(the app passes it as an argument), the engine (its ``request_id`` and ``owner``), the response's headers
and the log line (the door again). Nothing about a request lives in ``quart.g``.

:func:`new_request_id` is the only place request ids are minted (the engine's batch items derive theirs,
``{id}-{index}``). A client's ``X-Request-ID`` is a *label*: echoed back and logged, never used to route or
cancel.

The call is frozen; what the answer learns on its way (the engine's timings for ``Server-Timing``, a
refusal's code for the log line) is written to its :class:`CallNotes`, which the door reads when the
answer starts.
"""

from __future__ import annotations

import re
import secrets

import attrs

from dspy_trio.engine import Timings

from .deadline import RequestDeadline
from .routing import Route
from .settings import ServiceSettings

# A client label: what X-Request-ID may be (a /v1/ws frame's id is checked by its model).
LABEL = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch


def new_request_id() -> str:
    """A fresh server request id: 32 random hex digits."""
    return secrets.token_hex(16)


def label_of(raw: str | None) -> str | None:
    """A client's ``X-Request-ID`` as a label, or None when absent or not a valid label."""
    if raw is None or LABEL.fullmatch(raw) is None:
        return None
    return raw


@attrs.define(slots=True)
class CallNotes:
    """What a call's answer learned while it was made, for its headers and its log line.

    Attributes:
        timings: The engine's timings of a prediction (``Server-Timing``'s ``queue`` and ``lm``).
        lms: The LMs that answered the prediction's calls (``Server-Timing``'s ``lm`` description: a
            fallback's name when the first LM failed).
        refused: The error code of a refusal by the web layer (401, 404, 405, 413, 415, 422, ...), which
            the door logs as one request line; refusals by the engine are logged by the engine.
        cache_status: A prediction's ``Cache-Status`` (:mod:`dspy_trio.web.cache_control`).
    """

    timings: Timings | None = None
    lms: tuple[str, ...] = ()
    refused: str | None = None
    cache_status: str | None = None


@attrs.frozen(eq=False)
class Call:
    """One call: an HTTP request, a WebSocket, a ``/ws`` question or a ``/v1/ws`` frame.

    Attributes:
        request_id: The server's id (:func:`new_request_id`): the only id that routes, cancels and logs.
        label: The client's label (a valid ``X-Request-ID``, a frame's ``id``), or None.
        owner: The API key that made it (``""`` without keys): only that key may cancel it.
        arrived: When its head (or frame) arrived, on Trio's clock: its deadline counts from here.
        route: The route its path matched, or None (the app answers 404).
        program: The program its route runs (from the path, or a frame's ``program``), or None.
        timeout_header: ``X-Request-Timeout`` as sent; :meth:`deadline` parses it (a body's
            ``timeout_secs`` wins over it).
        refusal: The door's refusal (401, 429) for the app to answer when the app must shape it (CORS);
            None otherwise.
        notes: What the answer learns on its way (:class:`CallNotes`).
        no_cache, no_store: ``Cache-Control``'s switches for the engine (a WebSocket's handshake's
            apply to all its requests; a ``/v1/ws`` frame may add its own ``cache_control``).
        tenant: The tenant of its key (never the key), whose share, limits and budget it counts
            against; None without keys (the engine's ``default`` tenant).
    """

    request_id: str
    label: str | None
    owner: str
    arrived: float
    route: Route | None
    program: str | None = None
    timeout_header: str | None = None
    refusal: Exception | None = None
    notes: CallNotes = attrs.field(factory=CallNotes)
    no_cache: bool = False
    no_store: bool = False
    tenant: str | None = None

    def deadline(
        self, settings: ServiceSettings, asked: float | None = None, *, param: str = "timeout_secs"
    ) -> RequestDeadline:
        """The call's deadline: ``asked`` (a body's or frame's ``timeout_secs``, named ``param``), else
        ``X-Request-Timeout``, else the default, capped; counted from :attr:`arrived`.

        Raises:
            HTTPError: 422 ``invalid_timeout``.
        """
        return RequestDeadline.start(
            settings, arrived=self.arrived, asked=asked, header=self.timeout_header, param=param
        )

    def frame(
        self,
        label: str | None,
        arrived: float,
        program: str | None,
        *,
        no_cache: bool = False,
        no_store: bool = False,
    ) -> Call:
        """A call made on this call's WebSocket (a question, a frame): a new id, the socket's owner and
        tenant, the handshake's cache switches, and the frame's own (``no_cache``, ``no_store``) on top."""
        return Call(
            new_request_id(),
            label,
            self.owner,
            arrived,
            self.route,
            program,
            no_cache=self.no_cache or no_cache,
            no_store=self.no_store or no_store,
            tenant=self.tenant,
        )

    def runs(self) -> str:
        """The program the call runs (for the handlers of routes that run one)."""
        if self.program is None:
            raise LookupError(f"{self.route.path if self.route else 'no route'} runs no program")
        return self.program


__all__ = ["LABEL", "Call", "CallNotes", "label_of", "new_request_id"]
