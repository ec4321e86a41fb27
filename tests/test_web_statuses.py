"""Status-only checks of the HTTP edge through Quart's test client: no sockets, no Hypercorn (the request
edge's socket-level behaviour, keep-alive and streaming, is tested over real sockets elsewhere)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
from quart.typing import TestClientProtocol as QuartClient

from dspy_trio.engine import EngineConfig, RateLimit
from dspy_trio.web.app import create_app

from .web_helpers import FAST, settings


@pytest.fixture
async def client() -> AsyncIterator[QuartClient]:
    app = create_app(attrs.evolve(settings(), api_keys=("k",)))
    async with app.test_app() as test_app:
        yield test_app.test_client()


KEY = {"Authorization": "Bearer k"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [
        ("POST", "/predict", {}, {"question": "q"}, 401, "invalid_api_key"),
        ("POST", "/v1/programs/nope/predict", KEY, {"inputs": {}}, 404, "unknown_program"),
        ("GET", "/predict", KEY, None, 405, "method_not_allowed"),
        ("POST", "/predict", KEY, {"question": "q", "timeout_secs": "5"}, 422, None),
        ("POST", "/predict", KEY, {"question": "\ud800"}, 422, None),
        ("DELETE", "/v1/requests/not-mine", KEY, None, 404, "unknown_request"),
    ],
)
async def test_refusals_are_json_with_their_status(
    client: QuartClient,
    method: str,
    path: str,
    headers: dict[str, str],
    body: object,
    status: int,
    code: str | None,
) -> None:
    response = await client.open(path, method=method, headers=headers, json=body)
    assert response.status_code == status
    error = (await response.get_json())["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code


async def test_a_prediction_and_health_answer(client: QuartClient) -> None:
    assert (await client.get("/health")).status_code == 200
    response = await client.post("/predict", json={"question": "What is Trio?"}, headers=KEY)
    assert response.status_code == 200
    assert (await response.get_json())["answer"]


async def test_a_quota_wait_that_cannot_fit_is_a_429_with_retry_after_not_a_504() -> None:
    """1 request a minute: the second request's wait for quota cannot end before its 5 s deadline, so it
    is refused at once with 429 ``rate_limit_wait`` and a Retry-After (the wait), not cut at 5 s."""
    lm = attrs.evolve(FAST, rate_limit=RateLimit(rpm=1))
    app = create_app(settings(engine=EngineConfig(lms={"default": lm})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await client.post("/predict", json={"question": "q"})).status_code == 200
        refused = await client.post("/predict", json={"question": "q"}, headers={"X-Request-Timeout": "5"})
        assert refused.status_code == 429
        assert (await refused.get_json())["error"]["code"] == "rate_limit_wait"
        assert 55 <= float(refused.headers["Retry-After"]) <= 60
