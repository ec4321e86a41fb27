"""The route table (web/routing.py, the service's in web/routes.py) is the one list of endpoints: the
app registers its handlers from it, the front door reads which routes run a program (the overload
refusal) and which are open (authentication), and /openapi.json reads each route's answers and
refusals. A route added to the table is followed by all of them, with nothing else changed."""

from __future__ import annotations

import re
from typing import Any

import attrs
import httpx
import pytest
import trio
from quart import Response

from dspy_trio.web.app import create_app
from dspy_trio.web.call import Call
from dspy_trio.web.http import json_response
from dspy_trio.web.routes import ROUTES
from dspy_trio.web.routing import Route, RouteTable, Wire
from dspy_trio.web.service import Service

from .helpers import CountingLM
from .test_web_gate import _hold_the_slot, _overloaded
from .web_helpers import running, settings

KEY = {"Authorization": "Bearer k"}


async def fake_run(service: Service, call: Call, name: str) -> Response:
    """A fake endpoint that runs nothing: it says which call it was handed."""
    return json_response({"name": name, "program": call.program, "owner": call.owner, "id": call.request_id})


async def fake_open(service: Service, call: Call) -> Response:
    """A fake open endpoint."""
    return json_response({"owner": call.owner})


FAKE = Route(
    "/v1/fake/{name}/run",
    "POST",
    fake_run,
    program="{name}",
    answer='`{"name", "program", "owner", "id"}`.',
    refusals={404, 429},
)
OPEN_FAKE = Route("/v1/fake-open", "GET", fake_open, open=True, answer="`{}`.")
WITH_FAKES = (*ROUTES, FAKE, OPEN_FAKE)


async def test_the_door_refuses_an_overload_on_a_new_program_route() -> None:
    lm = CountingLM(first_token_delay=30.0)
    async with (
        running(_overloaded(), lms={"default": lm}, routes=WITH_FAKES) as server,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        holder = await _hold_the_slot(server, nursery)
        refused = await client.post("/v1/fake/default/run", content=b"{}")
        rejected = server.state.engine.statistics().rejected  # type: ignore[union-attr]
        unknown = await client.post("/v1/fake/nope/run", content=b"{}")  # the engine knows no "nope"
        holder.cancel()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "overloaded"
    assert rejected == 1
    assert unknown.status_code == 200
    assert unknown.json()["program"] == "nope"


async def test_authentication_follows_the_table() -> None:
    async with (
        running(settings(api_keys=("k",)), routes=WITH_FAKES) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        assert (await client.post("/v1/fake/default/run")).status_code == 401
        keyed = await client.post("/v1/fake/default/run", headers=KEY)
        assert keyed.status_code == 200
        assert keyed.json()["owner"] == "k"
        assert keyed.json()["program"] == "default"
        assert keyed.json()["id"] == keyed.headers["x-server-request-id"]
        opened = await client.get("/v1/fake-open")
        assert opened.status_code == 200
        assert opened.json() == {"owner": ""}


async def test_the_openapi_document_follows_the_table() -> None:
    async with (
        running(settings(api_keys=("k",)), routes=WITH_FAKES) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        document = (await client.get("/openapi.json")).json()
    fake = document["paths"]["/v1/fake/{name}/run"]["post"]
    assert {int(status) for status in fake["responses"]} == {200, 401, 404, 429}
    assert fake["responses"]["200"]["description"] == FAKE.answer
    assert fake["security"] == [{"bearer": []}]
    assert "Retry-After" in fake["responses"]["429"]["headers"]
    assert fake["summary"] == "A fake endpoint that runs nothing: it says which call it was handed."
    opened = document["paths"]["/v1/fake-open"]["get"]
    assert set(opened["responses"]) == {"200"}
    assert "security" not in opened


def test_every_route_the_app_serves_is_in_the_table() -> None:
    """Nothing is served that the door, authentication and the document do not know about."""
    app = create_app(settings())
    table = RouteTable(ROUTES)
    for rule in app.url_map.iter_rules():
        found = table.match(re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"x", rule.rule))
        assert found is not None, rule.rule
        route, _ = found
        assert set(rule.methods or ()) - {"HEAD", "OPTIONS"} <= route.methods, rule.rule


@pytest.mark.parametrize(
    ("path", "template", "params"),
    [
        ("/predict", "/predict", {}),
        ("/v1/programs/default/predict", "/v1/programs/{name}/predict", {"name": "default"}),
        ("/v1/programs/a.b-c/batch", "/v1/programs/{name}/batch", {"name": "a.b-c"}),
        ("/v1/requests/abc", "/v1/requests/{request_id}", {"request_id": "abc"}),
        ("/static/swagger-ui/swagger-ui.css", "/static/swagger-ui/{name}", {"name": "swagger-ui.css"}),
        ("/static/js/app.js", "/static/{filename:path}", {"filename": "js/app.js"}),
        ("/v1/programs/default/predict\n", None, None),  # the regex "$" trap: no match
        ("/v1/programs//predict", None, None),
        ("/v1/programs/a/b/predict", None, None),
        ("/predict/", None, None),
        ("/nowhere", None, None),
    ],
)
def test_the_table_matches_whole_paths_only(path: str, template: str | None, params: Any) -> None:
    found = RouteTable(ROUTES).match(path)
    if template is None:
        assert found is None
        return
    assert found is not None
    route, matched = found
    assert (route.path, dict(matched)) == (template, params)


def test_which_routes_run_a_program_and_which_are_open() -> None:
    table = {(route.path, method): route for route in ROUTES for method in route.methods}
    runs = {key: route.program for key, route in table.items() if route.program is not None}
    assert runs == {
        ("/predict", "POST"): "default",
        ("/predict/stream", "POST"): "default",
        ("/stream", "POST"): "default",
        ("/v1/programs/{name}/predict", "POST"): "{name}",
        ("/v1/programs/{name}/stream", "POST"): "{name}",
        ("/v1/programs/{name}/batch", "POST"): "{name}",
        ("/ws", "GET"): "default",
    }
    assert table[("/v1/programs/{name}/batch", "POST")].per_item  # admitted item by item, never at the door
    opened = sorted(route.path for route in ROUTES if route.open)
    assert opened == [
        "/",
        "/docs",
        "/health",
        "/openapi.json",
        "/ready",
        "/static/swagger-ui/{name}",
        "/static/{filename:path}",
    ]
    batch = table[("/v1/programs/{name}/batch", "POST")]
    assert batch.formats == (Wire.JSON, Wire.BATCH_SSE, Wire.NDJSON)


def test_a_route_names_its_program_by_a_path_parameter_it_has() -> None:
    with pytest.raises(ValueError, match="name"):
        Route("/v1/x/{other}/run", "POST", fake_run, program="{name}")
    route = attrs.evolve(FAKE, refusals=frozenset())
    assert route.program_of({"name": "p"}) == "p"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("//predict", b'{"question": "q"}'),
        ("//v1/programs/default/predict", b'{"inputs": {"question": "q"}}'),
        ("///v1/programs/default/batch", b'{"items": [{"question": "q"}]}'),
    ],
)
async def test_a_path_the_door_finds_no_route_for_is_not_served_by_a_handler(path: str, body: bytes) -> None:
    """werkzeug strips the leading slashes of a path before matching it; the front door matches the
    path as sent. A handler Quart found for a call the door gave no route (no program, no overload
    check) ran and failed with a 500: it is a 404, as the door sees it."""
    from .test_web_keepalive import _port
    from .test_web_protocol import parse_responses

    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        async with stream:
            await stream.send_all(request)
            received = b""
            with trio.fail_after(30):  # a hang guard
                while not (answers := parse_responses(received)):
                    received += await stream.receive_some(65536)
    [(status, headers, answer)] = answers
    assert status == 404, answer
    assert headers["content-type"] == "application/json"
    assert b'"code":"not_found"' in answer
