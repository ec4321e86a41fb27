"""The browser playground, end to end in headless Chromium (Debian's package) driven by Playwright.

The server and the fake upstream run in a thread of their own (Playwright's sync API owns the test's
thread). Without Chromium these tests are skipped with a loud reason; `make test` and `.ci/run` install it.
"""

from __future__ import annotations

import queue
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from dspy_trio.engine import EngineConfig, LMConfig, OpenAISettings, RetryPolicy
from dspy_trio.engine.testing import Behavior, FakeUpstream, Fault, open_fake_upstream
from dspy_trio.web.server import open_server

from .web_helpers import settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

FIRST_TOKEN = "document.querySelector('#fields .text')?.textContent.length > 0"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="CHROMIUM NOT FOUND: the browser tests did NOT run. "
    "Install Debian's chromium (apt-get install chromium)",
)


class Service:
    """The served app and its fake upstream, in a Trio run on another thread."""

    def __init__(self, url: str, upstream: FakeUpstream, token: trio.lowlevel.TrioToken) -> None:
        self.url = url
        self.upstream = upstream
        self._token = token

    def run(self, fn: Any, *args: Any) -> Any:
        """Call ``fn(*args)`` in the service's Trio thread (for touching the fake upstream safely)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    started: queue.Queue[tuple[Service, trio.Event]] = queue.Queue()

    async def main() -> None:
        stop = trio.Event()
        async with open_fake_upstream(Behavior(first_token_delay=0.05, token_delay=0.05)) as upstream:
            lm = LMConfig(
                model="fake",
                retry=RetryPolicy(max_attempts=1),
                settings=OpenAISettings(api_base=upstream.url),
            )
            async with open_server(settings(engine=EngineConfig(lms={"default": lm}))) as server:
                started.put((Service(server.url, upstream, trio.lowlevel.current_trio_token()), stop))
                await stop.wait()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    running, stop = started.get(timeout=30)
    yield running
    running.run(stop.set)
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, service: Service) -> Iterator[Any]:
    page = browser.new_page()
    page.goto(service.url + "/")
    page.wait_for_selector("#status:has-text('Ready')")
    yield page
    page.close()


def test_the_page_lists_programs_and_builds_a_form_from_their_inputs(page: Any) -> None:
    assert page.locator("#program option").all_inner_texts() == ["default (Predict)"]
    assert page.locator("textarea[name=question]").count() == 1


@pytest.mark.parametrize("button", ["#stream", "#ws"], ids=["sse", "websocket"])
def test_a_stream_shows_tokens_as_they_arrive_then_the_result(page: Any, button: str) -> None:
    page.fill("textarea[name=question]", "What is Trio?")
    page.click(button)
    answer = page.locator("#fields .field[data-field=answer] .text")
    answer.wait_for()
    page.wait_for_function(FIRST_TOKEN)
    assert "usage" not in page.inner_text("#final"), "tokens appear before the result"
    page.wait_for_selector("#final:has-text('usage')", timeout=20_000)
    assert len(answer.inner_text().split()) == 16
    assert page.is_enabled("#stream")


@pytest.mark.parametrize("button", ["#stream", "#ws"], ids=["sse", "websocket"])
def test_stop_cancels_the_stream_and_the_upstream_connection_closes(
    page: Any, service: Service, button: str
) -> None:
    before = service.run(lambda: len(service.upstream.records))
    page.fill("textarea[name=question]", "Stop me")
    page.click(button)
    page.wait_for_function(FIRST_TOKEN)
    page.click("#stop")
    page.wait_for_selector("#status:has-text('Stopped')")
    assert "usage" not in page.inner_text("#final")

    def closed() -> bool:
        records = service.upstream.records[before:]
        return bool(records) and records[-1].client_closed_at is not None

    for _ in range(100):
        if service.run(closed):
            break
        page.wait_for_timeout(50)
    assert service.run(closed), "the fake upstream saw the connection close"


def test_errors_are_shown_readably(page: Any, service: Service) -> None:
    service.run(service.upstream.add_faults, Fault("server_error"))
    page.fill("textarea[name=question]", "This one fails")
    page.click("#predict")
    page.wait_for_selector("#error:not([hidden])")
    assert "upstream_server_error" in page.inner_text("#error")
    page.fill("#timeout", "-5")
    page.click("#predict")
    page.wait_for_selector("#error:has-text('invalid_body')")
    assert "timeout_secs" in page.inner_text("#error")


def test_the_metrics_view_updates(page: Any) -> None:
    page.wait_for_selector("#metric-values dt:has-text('requests')")
    assert page.locator("#metric-values dd").count() >= 5


def test_the_api_docs_render_with_no_network(browser: Any, service: Service) -> None:
    """``/docs`` (Swagger UI) loads everything from the service itself: with every other host cut off, it
    still lists the operations (it was blank offline when its script came from a CDN)."""
    page = browser.new_page()
    elsewhere: list[str] = []

    def only_the_service(route: Any) -> None:
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_service)
    page.goto(service.url + "/docs", timeout=0)  # no time limit: whether it renders is the question
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/programs/{name}/predict']", timeout=0)
    assert page.locator(".opblock").count() >= 12
    assert elsewhere == []
    page.close()
