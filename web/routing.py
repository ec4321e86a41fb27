"""Routes as values: what an endpoint is, and a table that finds a path's route.

::

    route = Route("/v1/programs/{name}/predict", "POST", program_predict, program="{name}",
                  answer="...", refusals={404, 429})
    table = RouteTable([route, ...])
    table.match("/v1/programs/default/predict")   # (route, {"name": "default"}), or None

Everything the service knows about an endpoint is on its :class:`Route`: the path and methods the app
registers its handler under (:mod:`dspy_trio.web.app`), whether it is open or needs a key (:func:`
dspy_trio.web.auth.authorize`), which program it runs (the front door, :mod:`dspy_trio.web.door`,
refuses an overload there before the framework runs), its wire formats (content negotiation) and what
/openapi.json says it answers (:mod:`dspy_trio.web.openapi`). The service's own table is
:data:`dspy_trio.web.routes.ROUTES`.

Paths are written as in OpenAPI: ``{name}`` is one path segment, ``{name:path}`` the rest of the path.
:meth:`RouteTable.match` matches whole paths only (a ``\\n`` at the end is not ignored, as a regex
``$`` would) and is a dict lookup for the paths without parameters, which is most requests' path.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs

# A handler is called by the app as ``handler(service, call, **path_parameters)`` (plus ``data=`` for a
# JSON body, see dspy_trio.web.http.json_body); None: served by Quart or an extension (static files, docs).
Handler = Callable[..., Awaitable[Any]]

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")


class Wire(enum.Enum):
    """A wire format a route answers in (each has one encoder: :mod:`dspy_trio.web.formats`)."""

    JSON = ("json", "application/json")
    V1_SSE = ("v1-sse", "text/event-stream")  # event: status | delta | final | error
    SEED_SSE = ("seed-sse", "text/event-stream")  # data: <token> ..., data: [DONE]
    BATCH_SSE = ("batch-sse", "text/event-stream")  # event: item ..., event: done
    NDJSON = ("ndjson", "application/x-ndjson")  # one batch item per line, then {"done": true}
    CHAT = ("chat", "application/json")  # OpenAI's chat.completion
    CHAT_SSE = ("chat-sse", "text/event-stream")  # chat.completion.chunk ..., data: [DONE]
    MCP = ("mcp", "application/json")  # JSON-RPC, or SSE of its notifications and the result
    SEED_WS = ("seed-ws", "text")  # a token per text frame, then [DONE]
    WS_FRAMES = ("ws-frames", "text")  # /v1/ws JSON frames, labelled by the client's ids
    TEXT = ("text", "text/plain")
    HTML = ("html", "text/html")
    PROMETHEUS = ("prometheus", "text/plain; version=0.0.4")

    @property
    def media_type(self) -> str:
        return self.value[1]


def _methods(value: str | Iterable[str]) -> frozenset[str]:
    return frozenset({value.upper()} if isinstance(value, str) else {method.upper() for method in value})


def _statuses(value: Iterable[int]) -> frozenset[int]:
    return frozenset(value)


@attrs.frozen
class Route:
    """One endpoint of the service.

    Attributes:
        path: The path template, OpenAPI style (``/v1/programs/{name}/predict``).
        methods: The methods it answers (a WebSocket: ``GET``).
        handler: ``handler(service, call, **parameters)``; None when Quart or an extension serves it.
        open: Open to anyone (no API key): the probes, the playground, the API's description.
        program: The program it runs: a name (``"default"``) or a path parameter (``"{name}"``); None
            for routes that run none.
        per_item: The program runs item by item (a batch): each item is admitted on its own, so the door
            never refuses the whole call for an overload.
        websocket: A WebSocket endpoint.
        formats: The wire formats of its answers, the preferred first (content negotiation).
        answer: What a success answers (the OpenAPI document's 200).
        refusals: The statuses it can refuse with, besides 401 (listed for every route that needs a key).
        openai: It speaks OpenAI's API: bad input is a 400 (never a 422), an unknown program an unknown
            model (404 ``model_not_found``).
        asgi: Its handler speaks ASGI itself, below the framework: the front door calls it as
            ``handler(service, call, scope, receive, send)`` (``/mcp``, whose transport is the MCP SDK's).
        lean: The same answer as ``handler``'s, in ASGI below the framework
            (:func:`dspy_trio.web.lean.below_quart`): the front door calls it for the route's methods
            unless CORS is configured, when the app (quart-cors) must shape every answer.
    """

    path: str
    methods: frozenset[str] = attrs.field(converter=_methods)
    handler: Handler | None
    open: bool = attrs.field(default=False, kw_only=True)
    program: str | None = attrs.field(default=None, kw_only=True)
    per_item: bool = attrs.field(default=False, kw_only=True)
    websocket: bool = attrs.field(default=False, kw_only=True)
    formats: tuple[Wire, ...] = attrs.field(default=(Wire.JSON,), kw_only=True)
    answer: str = attrs.field(default="", kw_only=True)
    refusals: frozenset[int] = attrs.field(default=frozenset(), converter=_statuses, kw_only=True)
    openai: bool = attrs.field(default=False, kw_only=True)
    asgi: bool = attrs.field(default=False, kw_only=True)
    lean: Callable[..., Awaitable[None]] | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        program = self.program
        if program is not None and program.startswith("{") and program.strip("{}") not in self.parameters:
            raise ValueError(f"{self.path}: the program names {self.program}, not a parameter of the path")

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of the path's parameters, in order."""
        return tuple(match.group(1) for match in _PARAMETER.finditer(self.path))

    @property
    def endpoint(self) -> str:
        """The name the app registers the handler under (its function's name; also the operationId)."""
        return getattr(self.handler, "__name__", self.path)

    @property
    def quart_rule(self) -> str:
        """The path as a Quart (werkzeug) rule: ``/v1/programs/<name>/predict``."""
        return _PARAMETER.sub(
            lambda m: f"<path:{m.group(1)}>" if m.group(2) else f"<{m.group(1)}>", self.path
        )

    @property
    def template(self) -> str:
        """The path as the OpenAPI document writes it (``{filename:path}`` becomes ``{filename}``)."""
        return _PARAMETER.sub(lambda m: "{" + m.group(1) + "}", self.path)

    @property
    def keyed(self) -> bool:
        """Whether a request needs an API key (when keys are configured)."""
        return not self.open

    @property
    def refused_at_the_door(self) -> bool:
        """Whether the front door refuses an overloaded call of this route before the framework runs."""
        return self.program is not None and not self.per_item and not self.websocket

    def program_of(self, parameters: Mapping[str, str]) -> str | None:
        """The program a call of this route runs, given its path parameters."""
        if self.program is None or not self.program.startswith("{"):
            return self.program
        return parameters.get(self.program[1:-1])

    def statuses(self) -> frozenset[int]:
        """Every status the route answers with: 200, its refusals, and 401 if it needs a key."""
        return self.refusals | {200} | ({401} if self.keyed else set())


class RouteTable:
    """The routes of a service, found by path.

    Args:
        routes: The routes; a path appears once (its methods are on its one route).

    Raises:
        ValueError: two routes have the same path.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[str, Route] = {}
        self._patterns: list[tuple[str, re.Pattern[str], Route]] = []
        seen: set[str] = set()
        for route in self.routes:
            if route.template in seen:
                raise ValueError(f"two routes for {route.template}")
            seen.add(route.template)
            if not route.parameters:
                self._exact[route.path] = route
                continue
            prefix = route.path[: route.path.index("{")]
            pattern = ""
            last = 0
            for match in _PARAMETER.finditer(route.path):
                pattern += re.escape(route.path[last : match.start()])
                pattern += f"(?P<{match.group(1)}>{'.+' if match.group(2) else '[^/]+'})"
                last = match.end()
            pattern += re.escape(route.path[last:])
            self._patterns.append((prefix, re.compile(pattern, re.DOTALL), route))
        # The most specific first: a longer literal prefix wins (/static/swagger-ui/{name} before
        # /static/{filename:path}).
        self._patterns.sort(key=lambda entry: -len(entry[0]))
        self._by_template = {route.template: route for route in self.routes}

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def match(self, path: str) -> tuple[Route, Mapping[str, str]] | None:
        """The route of ``path`` and its parameters, or None. Never looks at the method."""
        route = self._exact.get(path)
        if route is not None:
            return route, {}
        for prefix, pattern, route in self._patterns:
            if path.startswith(prefix) and (found := pattern.fullmatch(path)) is not None:
                return route, found.groupdict()
        return None

    def by_template(self, template: str) -> Route | None:
        """The route the OpenAPI document writes as ``template`` (``/v1/programs/{name}/predict``)."""
        return self._by_template.get(template)


__all__ = ["Handler", "Route", "RouteTable", "Wire"]
