"""/openapi.json over a real server: a valid OpenAPI 3.1 document that says what the service does; every
refusal a client can provoke has its status documented for that operation, a JSON body naming the
problem, and leaves the keep-alive connection usable."""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

import attrs
import httpx
import pytest
import trio
from openapi_spec_validator import validate

from dspy_trio.engine import EngineConfig, LMConfig, RetryPolicy, UpstreamServerError

from .helpers import CountingLM, FailingLM, wait_until
from .web_helpers import running, settings

KEY = {"Authorization": "Bearer k"}
JSON = {**KEY, "Content-Type": "application/json"}
DEEP = "[" * 50 + "]" * 50


def documented(document: dict[str, Any], template: str, method: str) -> set[int]:
    return {int(status) for status in document["paths"][template][method.lower()]["responses"]}


def local_port(response: httpx.Response) -> int:
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


async def test_the_document_is_valid_and_says_what_the_code_does() -> None:
    service = settings(api_keys=("k",), max_batch_items=5)
    async with running(service) as server, httpx.AsyncClient(base_url=server.url, headers=KEY) as client:
        document = (await client.get("/openapi.json")).json()
    validate(document)
    posts = [op for ops in document["paths"].values() for method, op in ops.items() if method == "post"]
    assert len(posts) == 8
    assert all(op["requestBody"]["required"] is True for op in posts)  # a bodiless POST gets 415
    batch = document["paths"]["/v1/programs/{name}/batch"]["post"]
    items = batch["requestBody"]["content"]["application/json"]["schema"]["properties"]["items"]
    assert items["maxItems"] == 5  # the configured max_batch_items: one more gets 413
    assert "413" in batch["responses"]
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["message", "type", "code", "param"]
    refusal = document["paths"]["/predict"]["post"]["responses"]["429"]
    assert refusal["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "Retry-After" in refusal["headers"]
    assert "Retry-After" in document["paths"]["/ready"]["get"]["responses"]["503"]["headers"]
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert document["paths"]["/v1/programs"]["get"]["security"] == [{"bearer": []}]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "422" not in chat["responses"]  # OpenAI's API: bad input is 400
    assert "unsupported_parameter" in chat["responses"]["400"]["description"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(body["required"])
    assert "404" in document["paths"]["/v1/models/{model}"]["get"]["responses"]
    mcp = document["paths"]["/mcp"]
    assert set(mcp) == {"post", "delete"}
    assert mcp["post"]["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "jsonrpc",
        "method",
    ]
    assert mcp["post"]["security"] == [{"bearer": []}]
    assert {"401", "403", "406", "413", "415"} <= set(mcp["post"]["responses"])
    assert "/redocs" not in document["paths"]
    assert "/static/swagger-ui/{name}" not in document["paths"]
    for ops in document["paths"].values():
        for op in ops.values():
            assert "``" not in op["summary"]  # Markdown, not reStructuredText
            assert op["summary"].endswith((".", ")")), op["summary"]  # a whole first sentence


def conforms(document: dict[str, Any], template: str, method: str, response: httpx.Response) -> None:
    """``response`` has a status the operation documents, and its JSON body the schema documented for it."""
    import jsonschema

    documented = document["paths"][template][method.lower()]["responses"][str(response.status_code)]
    schema = documented["content"]["application/json"]["schema"]
    jsonschema.validate(response.json(), {**schema, "components": document["components"]})


async def test_the_mcp_operations_say_what_the_sdk_answers() -> None:
    async with running(settings(api_keys=("k",))) as server, httpx.AsyncClient(base_url=server.url) as client:
        document = (await client.get("/openapi.json", headers=KEY)).json()
        mcp = document["paths"]["/mcp"]
        session = {p["name"]: p for p in mcp["delete"]["parameters"] if p["in"] == "header"}["Mcp-Session-Id"]
        assert session["required"] is True
        post_headers = {p["name"]: p["required"] for p in mcp["post"]["parameters"] if p["in"] == "header"}
        assert post_headers == {"Mcp-Session-Id": False, "MCP-Protocol-Version": False}
        assert "202" in mcp["post"]["responses"]  # a notification, accepted
        accepts = {**JSON, "Accept": "application/json, text/event-stream"}
        # The SDK's own refusals are JSON-RPC errors: no session, an unknown session, a message that is not
        # JSON-RPC, an unknown method of the current revision.
        answers = [
            ("DELETE", await client.delete("/mcp", headers=KEY)),
            ("DELETE", await client.delete("/mcp", headers={**KEY, "Mcp-Session-Id": "nope"})),
            ("POST", await client.post("/mcp", content=b"[1]", headers=accepts)),
            (
                "POST",
                await client.post(
                    "/mcp",
                    content=b'{"jsonrpc": "2.0", "id": 1, "method": "no/such"}',
                    headers={**accepts, "MCP-Protocol-Version": "2026-07-28"},
                ),
            ),
        ]
        for method, response in answers:
            assert response.status_code in (400, 404), response.text
            conforms(document, "/mcp", method, response)
        # The service's own refusals there are in its error shape.
        refused = await client.post("/mcp", content=b"{}", headers={**KEY, "Content-Type": "text/plain"})
        assert refused.status_code == 415
        conforms(document, "/mcp", "POST", refused)


class Refusal(NamedTuple):
    """A request the web layer refuses: what it is, and what the answer must say."""

    request: str  # "METHOD /path"
    body: bytes | None
    status: int
    code: str
    says: str  # in the message
    headers: dict[str, str] = JSON


def template(document: dict[str, Any], path: str) -> str:
    """The document's path template that ``path`` matches (``/v1/programs/x/predict`` ...)."""
    for candidate in document["paths"]:
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", candidate), path):
            return str(candidate)
    raise AssertionError(f"{path} is not in the document")


NO_KEY = {"Content-Type": "application/json"}
CHAT = b'{"model": "default", "messages": [{"role": "user", "content": "q"}]}'
WEB_REFUSALS = [
    Refusal("POST /predict", None, 415, "unsupported_media_type", "Content-Type: application/json", KEY),
    Refusal(
        "POST /stream",
        b'{"question": "q"}',
        415,
        "unsupported_media_type",
        "JSON",
        {**KEY, "Content-Type": "text/plain"},
    ),
    Refusal("POST /predict", b"", 400, "bad_request", "the body is empty: send a JSON object"),
    Refusal(
        "POST /predict",
        b"{bad",
        400,
        "bad_request",
        "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2",
    ),
    Refusal("POST /predict", b'{"question": "q"', 400, "bad_request", "line 1, column 17"),
    Refusal(
        "POST /predict", b'{"question": "\xff"}', 400, "bad_request", "not UTF-8: byte 0xff at position 14"
    ),
    Refusal(
        "POST /predict",
        b'{"question": 1' + b"0" * 5000 + b"}",
        400,
        "bad_request",
        "cannot be read as JSON: Exceeds the limit (4300 digits)",
    ),
    Refusal("POST /predict", DEEP.encode(), 400, "too_deeply_nested", "deeper than 32 levels"),
    Refusal("POST /predict", b"[]", 422, "invalid_body", "a JSON object, got an array"),
    Refusal("POST /predict", b'"q"', 422, "invalid_body", "a JSON object, got a string"),
    Refusal(
        "POST /predict", b'{"question": 5}', 422, "invalid_body", "question: Input should be a valid string"
    ),
    Refusal("POST /predict", b'{"question": "q", "extra": 1}', 422, "invalid_body", "extra: Extra inputs"),
    Refusal("POST /predict", b'{"question": "q", "timeout_secs": "5"}', 422, "invalid_body", "timeout_secs:"),
    Refusal(
        "POST /predict",
        b'{"question": "q"}',
        422,
        "invalid_timeout",
        "X-Request-Timeout must be a positive number",
        {**JSON, "X-Request-Timeout": "soon"},
    ),
    Refusal(
        "POST /predict", b'{"question": "q"}', 401, "invalid_api_key", "Authorization: Bearer KEY", NO_KEY
    ),
    Refusal(
        "POST /predict",
        json.dumps({"question": "x" * 7000}).encode(),
        413,
        "body_too_large",
        "larger than 6000 bytes",
    ),
    Refusal("POST /v1/programs/nope/predict", b'{"inputs": {}}', 404, "unknown_program", "nope"),
    Refusal(
        "POST /v1/programs/default/predict",
        b'{"inputs": {"nope": 1}}',
        422,
        "invalid_input",
        "unknown input field 'nope'",
    ),
    Refusal(
        "POST /v1/programs/default/predict",
        json.dumps({"inputs": {"question": "x" * 200}}).encode(),
        413,
        "input_too_large",
        "100 characters",
    ),
    Refusal(
        "POST /v1/programs/default/stream",
        b'{"inputs": {}}',
        422,
        "invalid_input",
        "missing input field 'question'",
    ),
    Refusal("POST /v1/programs/nope/stream", b'{"inputs": {}}', 404, "unknown_program", "nope"),
    Refusal(
        "POST /v1/programs/default/batch",
        json.dumps({"items": [{}] * 6}).encode(),
        413,
        "batch_too_large",
        "at most 5 items",
    ),
    Refusal(
        "POST /v1/programs/default/batch",
        b'{"items": []}',
        422,
        "invalid_body",
        "items: List should have at least 1 item",
    ),
    Refusal("POST /v1/programs/nope/batch", b'{"items": [{}]}', 404, "unknown_program", "nope"),
    Refusal("DELETE /v1/requests/abc", None, 404, "unknown_request", "no request 'abc' is in flight", KEY),
    Refusal("GET /v1/models/nope", None, 404, "model_not_found", "'nope' does not exist", KEY),
    Refusal("POST /mcp", b"{}", 401, "invalid_api_key", "a valid API key is required", NO_KEY),
    Refusal("POST /mcp", DEEP.encode(), 400, "too_deeply_nested", "deeper than 32"),
    Refusal("POST /mcp", b'{"x": "' + b"y" * 7000 + b'"}', 413, "body_too_large", "larger than 6000 bytes"),
    Refusal(
        "POST /mcp", b"{}", 403, "origin_not_allowed", "origin", {**JSON, "Origin": "https://evil.example"}
    ),
    Refusal("GET /v1/models", None, 401, "invalid_api_key", "a valid API key is required", {}),
    Refusal("POST /v1/chat/completions", None, 415, "unsupported_media_type", "Content-Type", KEY),
    Refusal("POST /v1/chat/completions", b"{bad", 400, "bad_request", "not valid JSON"),
    Refusal("POST /v1/chat/completions", DEEP.encode(), 400, "too_deeply_nested", "deeper than 32"),
    Refusal(
        "POST /v1/chat/completions", b'{"model": "default"}', 400, "invalid_body", "messages: Field required"
    ),
    Refusal(
        "POST /v1/chat/completions", CHAT.replace(b'"default"', b'"nope"'), 404, "model_not_found", "nope"
    ),
    Refusal(
        "POST /v1/chat/completions", CHAT[:-1] + b', "n": 3}', 400, "unsupported_parameter", "n must be 1"
    ),
    Refusal("POST /v1/chat/completions", CHAT[:-1] + b', "timeout": 0}', 400, "invalid_body", "timeout"),
    Refusal(
        "POST /v1/chat/completions",
        CHAT,
        400,
        "invalid_timeout",
        "X-Request-Timeout must be a positive number",
        {**JSON, "X-Request-Timeout": "soon"},
    ),
    Refusal(
        "POST /v1/chat/completions",
        json.dumps({"model": "default", "messages": [{"role": "user", "content": "x" * 200}]}).encode(),
        413,
        "input_too_large",
        "100 characters",
    ),
    Refusal(
        "POST /v1/chat/completions",
        json.dumps({"model": "default", "messages": [{"role": "user", "content": "x" * 7000}]}).encode(),
        413,
        "body_too_large",
        "larger than 6000 bytes",
    ),
    Refusal("GET /v1/programs", None, 401, "invalid_api_key", "a valid API key is required", {}),
    Refusal("GET /metrics", None, 401, "invalid_api_key", "a valid API key is required", {}),
]


async def test_every_refusal_of_the_web_layer_is_documented_named_and_keeps_the_connection() -> None:
    service = settings(api_keys=("k",), max_batch_items=5, max_body_bytes=6000, max_input_chars=100)
    async with running(service) as server, httpx.AsyncClient(base_url=server.url) as client:
        document = (await client.get("/openapi.json", headers=KEY)).json()
        for refusal in WEB_REFUSALS:
            method, path = refusal.request.split()
            response = await client.request(method, path, headers=refusal.headers, content=refusal.body)
            case = (refusal.request, (refusal.body or b"")[:40], response.text[:300])
            assert response.status_code == refusal.status, case
            error = response.json()["error"]
            assert error["code"] == refusal.code, case
            assert refusal.says in error["message"], case
            assert refusal.status in documented(document, template(document, path), method), case
            after = await client.get("/health")
            if response.headers.get("connection") != "close":
                assert local_port(after) == local_port(response), case  # the same connection serves on


async def test_every_refusal_of_the_engine_is_documented() -> None:
    """429, 499, 502, 503 and 504 come from the engine: each is a documented status of the operation."""
    base = EngineConfig(lms={"default": LMConfig()})
    engine = EngineConfig(
        lms={"default": LMConfig(), "failing": LMConfig(retry=RetryPolicy(max_attempts=1))},
        programs={
            "default": base.programs["default"],
            "failing": attrs.evolve(base.programs["default"], lm="failing"),
        },
        max_in_flight=1,
        max_queued=0,
        drain_timeout=600.0,
    )
    lms = {
        "default": CountingLM(first_token_delay=600.0),
        "failing": FailingLM(UpstreamServerError("the provider broke", status=500)),
    }
    seen: dict[int, str] = {}
    answers: list[httpx.Response] = []
    async with (
        running(settings(engine=engine), lms=lms) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        in_flight = server.state.engine.statistics  # type: ignore[union-attr]

        async def occupy() -> None:  # the only slot, for as long as it is not cancelled
            async with httpx.AsyncClient(base_url=server.url) as other:
                answers.append(await other.post("/predict", json={"question": "hold the slot"}))

        document = (await client.get("/openapi.json")).json()
        failing = await client.post("/v1/programs/failing/predict", json={"inputs": {"question": "q"}})
        seen[failing.status_code] = "/v1/programs/{name}/predict"
        late = await client.post("/predict", json={"question": "q", "timeout_secs": 0.01})
        seen[late.status_code] = "/predict"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(occupy)
            await wait_until(lambda: in_flight().in_flight == 1, seconds=math.inf)
            body = {"inputs": {"question": "q"}}
            overloaded = await client.post("/v1/programs/default/predict", json=body)
            seen[overloaded.status_code] = "/v1/programs/{name}/predict"
            [request] = server.state.engine._ledger._active.values()  # type: ignore[union-attr]
            request_id = request.request_id
            assert (await client.delete(f"/v1/requests/{request_id}")).status_code == 200
        seen[answers[0].status_code] = "/predict"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(occupy)  # holds the drain open
            await wait_until(lambda: in_flight().in_flight == 1, seconds=math.inf)
            server.shutdown()
            await wait_until(lambda: server.state.draining, seconds=math.inf)
            draining = await client.post("/stream", json={"question": "q"})
            seen[draining.status_code] = "/stream"
            nursery.cancel_scope.cancel()
    assert set(seen) == {429, 499, 502, 503, 504}, seen
    for status, template in seen.items():
        assert status in documented(document, template, "post"), (status, template)


@pytest.mark.parametrize("path", ["/redocs", "/scalar"])
async def test_no_docs_page_that_needs_a_cdn(path: str) -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get(path)).status_code == 404


async def test_swagger_ui_files_come_from_the_package() -> None:
    async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
        page = (await client.get("/docs")).text
        assert "/static/swagger-ui/swagger-ui-bundle.js" in page
        assert "https://" not in page
        script = await client.get("/static/swagger-ui/swagger-ui-bundle.js")
        assert script.status_code == 200
        assert "SwaggerUIBundle" in script.text
        assert (await client.get("/static/swagger-ui/swagger-ui.css")).status_code == 200
        for other in ("index.html", "..%2Fflask_swagger_ui.py", "oauth2-redirect.html"):
            assert (await client.get(f"/static/swagger-ui/{other}")).status_code == 404


async def test_with_api_keys_the_docs_open_and_the_api_stays_closed() -> None:
    """As the playground: /docs and /openapi.json load without a key (Swagger UI's "Authorize" then takes
    the key for the calls it makes); every operation still needs it."""
    async with running(settings(api_keys=("k",))) as server, httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/openapi.json")).json()["components"]["securitySchemes"]
        assert (await client.get("/static/swagger-ui/swagger-ui.css")).status_code == 200
        assert (await client.get("/v1/programs")).status_code == 401
        assert (await client.get("/docs/../v1/programs")).status_code == 401
        assert (await client.post("/predict", json={"question": "q"})).status_code == 401
