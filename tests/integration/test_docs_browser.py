"""/docs and /redoc in headless Chromium (Debian's) with every request off the loopback aborted: the pages render
from the service's own files, Swagger UI lists every operation of the OpenAPI document, and "Try it out" runs one.

`make test` installs Debian's chromium; MASKSERVE_SKIP_BROWSER=1 skips this, as for the playground's test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from tests.integration.conftest import FLAGS
from tests.live import live_server

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = pytest.mark.browser


@contextmanager
def offline_page(browser_path: str, url: str, blocked: list[str]) -> Iterator[Page]:
    """Chromium with a page on which any request not to 127.0.0.1 is aborted and recorded in ``blocked``."""
    from playwright.sync_api import sync_playwright

    def only_loopback(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=FLAGS)
        try:
            context = browser.new_context()
            context.route("**/*", only_loopback)
            page = context.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_swagger_ui_lists_every_operation_and_runs_one_offline(
    browser_path: str,
    llama_settings: Settings,
    tiny_llama: LoadedModel,
) -> None:
    app = create_app(llama_settings, loaded=tiny_llama)
    paths = app.openapi()["paths"]
    expected = sorted((method.upper(), path) for path, item in paths.items() for method in item)
    blocked: list[str] = []
    with live_server(app) as url, offline_page(browser_path, f"{url}/docs", blocked) as page:
        page.wait_for_selector(".opblock", timeout=30000)
        listed = page.eval_on_selector_all(
            ".opblock",
            """els => els.map(el => [el.querySelector('.opblock-summary-method').textContent.trim(),
                                     el.querySelector('.opblock-summary-path').getAttribute('data-path')])""",
        )
        assert sorted(tuple(op) for op in listed) == expected
        assert len(expected) > 10

        # "Try it out" -> "Execute" on GET /v1/models: the real request runs from the page and answers 200
        block = page.locator("#operations-service-models_v1_models_get, .opblock-get:has([data-path='/v1/models'])")
        block.first.locator(".opblock-summary").click()
        block.first.locator("button.try-out__btn").click()
        block.first.locator("button.execute").click()
        page.wait_for_selector(".live-responses-table .response-col_status", timeout=30000)
        status = block.first.locator(".live-responses-table .response .response-col_status").first.inner_text()
        assert status.strip() == "200"
        body = block.first.locator(".live-responses-table .response-col_description .microlight").first.inner_text()
        assert '"object": "list"' in body
    assert blocked == []


def test_redoc_renders_offline(
    browser_path: str,
    llama_settings: Settings,
    tiny_llama: LoadedModel,
) -> None:
    app = create_app(llama_settings, loaded=tiny_llama)
    summaries = [op["summary"] for item in app.openapi()["paths"].values() for op in item.values() if "summary" in op]
    blocked: list[str] = []
    with live_server(app) as url, offline_page(browser_path, f"{url}/redoc", blocked) as page:
        page.wait_for_selector("h1", timeout=30000)
        assert "maskserve" in page.inner_text("h1")
        # ReDoc writes each operation's summary in its menu (collapsed tags hide some) and as its section's heading
        page.wait_for_selector("h2", timeout=30000)
        headings = page.eval_on_selector_all("h2", "els => els.map(el => el.textContent.trim())")
        missing = [s for s in summaries if s not in headings]
        assert missing == []
    assert blocked == []
