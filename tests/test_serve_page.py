"""The web page in a real browser: Debian's Chromium (headless, driven by playwright) loads the page from
a live server, picks an image, sees the slice grid drawn and the token counts, asks twice and sees the
streamed answers. Skipped where Chromium is not installed (.ci/run installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (the dev extra)")
pytest.importorskip("fastapi", reason="the server needs the serve extra")

from playwright.sync_api import sync_playwright  # noqa: E402

from llava_uhd.serve.app import create_app  # noqa: E402
from llava_uhd.serve.build import build_server  # noqa: E402
from serve_helpers import EXAMPLE, running  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="no chromium on this machine (apt-get install chromium)"
)
def test_the_page_plans_asks_and_streams():
    engine, batcher = build_server(None, max_new_tokens=8, device="cpu")
    try:
        with running(create_app(engine, batcher)) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('synthdoc')")
            page.set_input_files("#file", str(EXAMPLE))
            page.wait_for_function("document.getElementById('plan').dataset.tokens !== undefined")
            assert "3 x 2 grid" in page.inner_text("#plan") and "258 image tokens" in page.inner_text("#plan")
            # the grid is drawn over the image: red pixels on a slice boundary (a third of the width)
            red = page.evaluate(
                """() => { const c = document.getElementById('grid'); const x = Math.round(c.width / 3);
                   const d = c.getContext('2d').getImageData(x - 2, Math.round(c.height / 4), 5, 1).data;
                   let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 3] > 0) n++; return n; }"""
            )
            assert red > 0
            for question, turns in (("How many shapes are there?", 1), ("And now?", 2)):
                page.fill("#question", question)
                page.click("#send")
                page.wait_for_function(
                    f"document.querySelectorAll('.turn.usage').length >= {turns}", timeout=60_000
                )
            answers = page.locator(".turn.assistant").all_inner_texts()
            assert len(answers) == 2 and all(a.strip() for a in answers)
            assert not page.locator(".turn.error").count()
            usage = page.locator(".turn.usage").all_inner_texts()
            assert (
                "258 image tokens" in usage[0] and "258 image tokens" in usage[1]
            )  # the image stays in turn 1
            browser.close()
    finally:
        batcher.close()
