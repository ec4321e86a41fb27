"""The OpenAPI document (``/openapi.json``) and its Swagger UI (``/docs``), served without a network.

quart-schema builds the paths and the request bodies from the registered routes and their pydantic
models; this module completes the document from the route table (:data:`dspy_trio.web.routes.ROUTES`),
which says what the code does where the models cannot:

- every request body is ``required`` (a POST without one gets 415);
- every operation lists the statuses it can answer (the route's ``refusals``, and 401 unless it is
  ``open``), each refusal with the error shape (``Error``) and its codes, ``Retry-After`` where it is sent,
  the media types of its success (its wire formats), and the batch's ``maxItems`` as configured
  (``max_batch_items``; more get 413);
- ``/mcp``, which Quart does not serve, from its row: its headers (``Mcp-Session-Id``, which ``DELETE``
  needs, and ``MCP-Protocol-Version``), a notification's 202, and the MCP SDK's own refusals (400, 404) in
  JSON-RPC's error shape (``JsonRpcError``) besides the service's;
- with API keys configured, the bearer scheme (Swagger UI's "Authorize") on every route that needs one;
- summaries are the first sentence of each handler's docstring.

Swagger UI's script and stylesheet ship in a PyPI package (``flask-swagger-ui``, MIT, which vendors
``swagger-ui-dist``) and are served from ``/static/swagger-ui/``, so ``/docs`` works offline. quart-schema's
ReDoc and Scalar pages, which load their scripts from CDNs, are not served.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from quart import Response, current_app, send_from_directory
from quart_schema import hide
from quart_schema.openapi import OpenAPIProvider
from werkzeug.exceptions import NotFound

from .routing import Route, Wire

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An error in OpenAI's shape; never a stack trace.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "param"],
            "properties": {
                "message": {"type": "string", "description": "What was wrong, naming the field or limit."},
                "type": {"type": "string", "examples": ["invalid_request_error"]},
                "code": {"type": "string", "examples": ["invalid_body"]},
                "param": {"type": ["string", "null"], "description": "The field at fault, if one is."},
            },
        }
    },
}

# A route that runs a program takes the cache switches; one that answers a prediction in one JSON body
# says in ``Cache-Status`` what the cache and single-flight did (see web/cache_control.py).
_CACHE_CONTROL = {
    "name": "Cache-Control",
    "in": "header",
    "required": False,
    "description": "`no-cache`: join no identical call in flight and read no cached answer (a fresh "
    "upstream call); `no-store`: store none of this request's answers. Other directives are ignored.",
    "schema": {"type": "string", "examples": ["no-cache", "no-store", "no-cache, no-store"]},
}
_CACHE_STATUS = {
    "Cache-Status": {
        "description": "RFC 9211: `dspy-trio; hit` (every LM call answered from the cache), "
        "`dspy-trio; fwd=miss` (`fwd=partial`: some were; `fwd=bypass`: the cache is off; "
        "`fwd=request`: the request said `no-cache`), with `; collapsed` when an LM call shared an "
        "identical call in flight.",
        "schema": {"type": "string", "examples": ["dspy-trio; hit", "dspy-trio; fwd=miss; collapsed"]},
    }
}

_RETRY_AFTER = {
    "Retry-After": {"description": "Whole seconds to wait before retrying.", "schema": {"type": "integer"}}
}

# What each status means, with the error codes it carries.
_REFUSALS: dict[int, str] = {
    400: "The body is not UTF-8 JSON (`bad_request`; the message says where), or is nested deeper than "
    "the limit (`too_deeply_nested`).",
    401: "API keys are configured and this request has none, or a wrong one (`invalid_api_key`).",
    404: "No such program (`unknown_program`).",
    413: "The body, the inputs' text or the batch is larger than its limit (`body_too_large`, "
    "`input_too_large`, `batch_too_large`).",
    415: (
        "No body, or not sent as `Content-Type: application/json` (`unsupported_media_type`), or sent with a"
        " `Content-Encoding` (`unsupported_content_encoding`)."
    ),
    422: "A field is invalid; `param` names it (`invalid_body`, `invalid_input`, `invalid_timeout`, "
    "`invalid_unicode`).",
    429: "Overloaded (`overloaded`), or the upstream's rate limit: retry after `Retry-After`.",
    499: "Cancelled by `DELETE /v1/requests/{id}` (`cancelled`).",
    502: "The LM provider or the program failed (`upstream_error`, ...).",
    503: "Starting or draining (`not_ready`, `engine_closed`): retry after `Retry-After`, "
    "another replica should answer.",
    504: "Past the request's timeout (`deadline_exceeded`).",
}
_WITH_RETRY_AFTER = {429, 503}
# The routes that speak OpenAI's API say some statuses in OpenAI's words.
_OPENAI_REFUSALS: dict[int, str] = {
    400: "Bad input; `param` names the field (`invalid_body`, `invalid_value`, `invalid_input`, "
    "`unsupported_parameter`, `history_not_supported`, `invalid_timeout`, `invalid_unicode`), or a body "
    "that is not UTF-8 JSON (`bad_request`) or nested deeper than the limit (`too_deeply_nested`).",
    404: "No program of that name (`model_not_found`).",
    408: "The request body did not arrive within the request's timeout (`body_timeout`).",
    502: "The LM provider or the program failed (`upstream_error`, ...), or the outputs do not satisfy "
    "`response_format`'s schema (`output_schema_mismatch`).",
}


# The MCP endpoint's statuses (its JSON-RPC errors have the SDK's shape; the web layer's refusals ours).
_MCP_REFUSALS: dict[int, str] = {
    415: "A POST not sent as `Content-Type: application/json` (`unsupported_media_type`).",
    400: "Not a JSON-RPC message (a JSON-RPC error), or JSON nested deeper than the limit "
    "(`too_deeply_nested`).",
    403: "A browser's `Origin` that is neither the server's own nor a configured CORS origin "
    "(`origin_not_allowed`).",
    404: "A session that does not exist, or was opened with another key (a JSON-RPC error).",
    406: "A POST whose `Accept` does not take both `application/json` and `text/event-stream` "
    "(`not_acceptable`).",
    408: "The request body did not arrive within the request's timeout (`body_timeout`).",
}
# The SDK answers some refusals itself, in JSON-RPC's error shape (the HTTP status from the error's code).
_JSON_RPC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A JSON-RPC 2.0 error, as the MCP SDK answers a message it cannot take.",
    "required": ["jsonrpc", "error"],
    "properties": {
        "jsonrpc": {"const": "2.0"},
        "id": {"type": ["string", "integer", "null"]},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "integer", "examples": [-32600]},
                "message": {"type": "string", "description": "What was wrong."},
                "data": {},
            },
        },
    },
}
_MCP_SDK_STATUSES = {400, 404}  # not JSON-RPC, no session or an unknown one, an unknown method
_MCP_SESSION = {
    "name": "Mcp-Session-Id",
    "in": "header",
    "description": "The session `initialize` opened (the handshake era; its answer's `Mcp-Session-Id`).",
    "schema": {"type": "string"},
}
_MCP_VERSION = {
    "name": "MCP-Protocol-Version",
    "in": "header",
    "required": False,
    "description": "The protocol revision; one of the current revision's makes the request a single "
    "exchange without a session.",
    "schema": {"type": "string", "examples": ["2026-07-28", "2025-11-25"]},
}
_MCP_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": "One JSON-RPC 2.0 request or notification of the Model Context Protocol "
                "(`tools/list`, `tools/call`, `server/discover`, `initialize`, `notifications/cancelled`, "
                "...).",
                "required": ["jsonrpc", "method"],
                "properties": {
                    "jsonrpc": {"const": "2.0"},
                    "id": {"type": ["string", "integer"]},
                    "method": {"type": "string"},
                    "params": {"type": "object"},
                },
            }
        }
    },
}


def _asgi_operations(route: Route) -> dict[str, Any]:
    """The operations of a route Quart does not serve (``/mcp``), from its row."""
    operations: dict[str, Any] = {}
    doc = " ".join((route.handler.__doc__ or "").split()) if route.handler else ""
    for method in sorted(route.methods):
        operation: dict[str, Any] = {
            "summary": _first_sentence(doc),
            "description": doc,
            "operationId": f"{route.endpoint}_{method.lower()}",
            "responses": _responses(route),
        }
        if method == "POST":
            operation["requestBody"] = _MCP_BODY
            operation["parameters"] = [{**_MCP_SESSION, "required": False}, _MCP_VERSION]
        else:  # DELETE: ends the session it names
            operation["parameters"] = [{**_MCP_SESSION, "required": True}]
        operations[method.lower()] = operation
    return operations


def _mcp_responses(method: str, responses: dict[str, Any]) -> None:
    """What the MCP SDK adds to a route's statuses: a notification's 202, its JSON-RPC errors."""
    if method == "POST":
        responses["202"] = {"description": "A notification or a response, accepted (no body)."}
    for status in _MCP_SDK_STATUSES & set(map(int, responses)):
        content = responses[str(status)]["content"]["application/json"]
        content["schema"] = {"anyOf": [content["schema"], {"$ref": "#/components/schemas/JsonRpcError"}]}


def _responses(route: Route) -> dict[str, Any]:
    success: dict[str, Any] = {"description": route.answer}
    media_types = [wire.media_type for wire in route.formats if "/" in wire.media_type]
    if media_types:
        success["content"] = {media_type: {} for media_type in dict.fromkeys(media_types)}
    responses: dict[str, Any] = {"200": success}
    for status in sorted(route.statuses() - {200}):
        notes = _REFUSALS
        if route.openai and status in _OPENAI_REFUSALS:
            notes = _OPENAI_REFUSALS
        elif route.asgi and status in _MCP_REFUSALS:
            notes = _MCP_REFUSALS
        response: dict[str, Any] = {
            "description": notes[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in _WITH_RETRY_AFTER:
            response["headers"] = _RETRY_AFTER
        responses[str(status)] = response
    return responses


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


class ServiceOpenAPI(OpenAPIProvider):
    """quart-schema's document, completed with the service's statuses, limits and security."""

    def schema(self) -> dict[str, Any]:
        document = super().schema()
        service = current_app.extensions["dspy_trio"]
        settings, routes = service.settings, service.routes
        for route in routes:
            if route.asgi and route.handler is not None:
                document.setdefault("paths", {})[route.template] = _asgi_operations(route)
        components = document.setdefault("components", {})
        components.setdefault("schemas", {})["Error"] = _ERROR_SCHEMA
        if any(route.asgi for route in routes):
            components["schemas"]["JsonRpcError"] = _JSON_RPC_ERROR_SCHEMA
        if len(settings.keys):
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                parts = (operation.get("summary"), operation.get("description"))
                text = " ".join(" ".join(p for p in parts if p).split()).replace("``", "`")  # as Markdown
                operation["summary"] = _first_sentence(text)
                operation["description"] = text
                if "requestBody" in operation:
                    operation["requestBody"]["required"] = True
                route = routes.by_template(path)
                if route is not None and method.upper() in route.methods:
                    operation["responses"] = _responses(route)
                    if route.asgi:
                        _mcp_responses(method.upper(), operation["responses"])
                    if len(settings.keys) and route.keyed:
                        operation["security"] = [{"bearer": []}]
                    if route.program is not None and not route.websocket:  # it runs LM calls
                        operation.setdefault("parameters", []).append(_CACHE_CONTROL)
                        if Wire.JSON in route.formats and not route.per_item:
                            operation["responses"]["200"]["headers"] = _CACHE_STATUS
                elif not operation.get("responses"):
                    operation["responses"] = {"default": {"description": "See docs/http-api.md."}}
        batch = document["paths"].get("/v1/programs/{name}/batch", {}).get("post")
        if batch is not None:
            body = batch["requestBody"]["content"]["application/json"]["schema"]
            body["properties"]["items"]["maxItems"] = settings.max_batch_items
        return document


# --- Swagger UI's assets, from the package that ships them -----------------------------------------

_SWAGGER_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "VERSION"})


def swagger_ui_dir() -> Path | None:
    """Where ``flask-swagger-ui`` keeps ``swagger-ui-dist``'s files (found without importing it)."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "dist"
    return directory if (directory / "swagger-ui-bundle.js").is_file() else None


@hide
async def swagger_ui_asset(service: object, call: object, name: str) -> Response:
    """A file of Swagger UI (``/docs`` loads them from here, not from a CDN)."""
    directory = swagger_ui_dir()
    if directory is None or name not in _SWAGGER_FILES:
        raise NotFound()
    response = await send_from_directory(directory, name)
    response.cache_control.max_age = 86_400
    return response


SWAGGER_JS_URL = "/static/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS_URL = "/static/swagger-ui/swagger-ui.css"

__all__ = ["SWAGGER_CSS_URL", "SWAGGER_JS_URL", "ServiceOpenAPI", "swagger_ui_asset"]
