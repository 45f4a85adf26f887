"""The playground in headless Chromium (Debian's, never a downloaded build): type, select, run, see masks drawn.

`make test` installs Debian's chromium when it is missing. Set MASKSERVE_SKIP_BROWSER=1 to skip this on a
machine that cannot have it; without that a missing browser fails the test rather than hiding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from tests.integration.conftest import FLAGS
from tests.live import live_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser


@contextmanager
def playground(browser_path: str, app: FastAPI, task: str, text: str) -> Iterator[Page]:
    """A live server for ``app`` and Chromium on its /playground, with the task chosen and the text typed."""
    from playwright.sync_api import sync_playwright

    with live_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/playground")
            page.select_option("#task", task)
            page.fill("#text", text)
            yield page
        finally:
            browser.close()


def exclude_selection(page: Page, start: int, end: int) -> None:
    """Select characters start..end in the textarea and press "Exclude selection"."""
    page.eval_on_selector("#text", f"el => {{ el.focus(); el.setSelectionRange({start}, {end}); }}")
    page.click("#add-exclude")


def test_playground_draws_the_attention_mask(
    browser_path: str, llama_settings: Settings, tiny_llama: LoadedModel
) -> None:
    text = "the dog sees the red ball. the cat likes some bread. the teacher visits"
    with playground(browser_path, create_app(llama_settings, loaded=tiny_llama), "generate", text) as page:
        page.fill("#max-new", "4")
        # select "the cat likes some bread." in the textarea and exclude it
        exclude_selection(page, text.index("the cat"), text.index(". the teacher") + 1)
        assert "exclude" in page.inner_text("#spans")
        page.click("#run")
        page.wait_for_function("document.getElementById('mask-canvas').dataset.cellsTotal !== '0'", timeout=30000)
        assert page.inner_text("#error") == ""
        canvas = page.locator("#mask-canvas")
        allowed = int(canvas.get_attribute("data-cells-allowed") or 0)
        total = int(canvas.get_attribute("data-cells-total") or 0)
        n = int(total**0.5)
        assert n * n == total  # a square prompt mask: one row and one column per token
        # causal would open n(n+1)/2 cells; the excluded span closes some of them
        assert 0 < allowed < n * (n + 1) // 2
        assert "causal" in page.inner_text("#mask-caption")
        assert '"generated_text"' in page.inner_text("#result")
        # the canvas really has dark (open) pixels drawn
        dark = page.evaluate(
            """() => { const c = document.getElementById('mask-canvas');
               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
               let k = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 60) k++; return k; }"""
        )
        assert dark > 0
        # the server's pictures: the attention mask PNG, and the output masks per decode step after a generation
        page.wait_for_function("document.getElementById('mask-png').naturalWidth > 0", timeout=30000)
        page.wait_for_function(
            "!document.getElementById('output-png').hidden && document.getElementById('output-png').naturalWidth > 0",
            timeout=30000,
        )
        # the dry run (POST /v1/masks) draws the same mask without decoding
        page.click("#dry-run")
        page.wait_for_function("document.getElementById('result').textContent.includes('dry run')", timeout=30000)
        assert int(canvas.get_attribute("data-cells-allowed") or 0) == allowed


def test_playground_fill_mask_with_exclusion_draws_mask_and_weights(
    browser_path: str, bert_settings: Settings, tiny_bert: LoadedModel
) -> None:
    text = "the cat likes some bread. the [MASK] sees the red ball."
    with playground(browser_path, create_app(bert_settings, loaded=tiny_bert), "fill-mask", text) as page:
        exclude_selection(page, 0, text.index(" the [MASK]"))
        page.check("#show-weights")
        page.click("#run")
        page.wait_for_function("document.getElementById('weights-canvas').dataset.cellsTotal !== '0'", timeout=30000)
        assert page.inner_text("#error") == ""
        assert '"token_str"' in page.inner_text("#result")
        mask = page.locator("#mask-canvas")
        allowed = int(mask.get_attribute("data-cells-allowed") or 0)
        total = int(mask.get_attribute("data-cells-total") or 0)
        assert "bidirectional" in page.inner_text("#mask-caption")
        assert 0 < allowed < total  # bidirectional would open every cell; the exclusion closes some
        weights = page.locator("#weights-canvas")
        nonzero = int(weights.get_attribute("data-cells-nonzero") or 0)
        assert int(weights.get_attribute("data-cells-total") or 0) == total
        assert nonzero == allowed  # weight exactly where the mask is open: none on the excluded keys
