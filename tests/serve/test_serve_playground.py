"""The playground page in headless Chromium: a streamed answer, each token coloured by its exit."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright import sync_api

CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "Once upon a time"
# A depth budget makes `auto` mix both exits even in an untrained family.
REQUEST = {"model": "auto", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "budget": 0.6}


def test_page_is_served_at_root_and_playground(live, http):
    for path in ("/", "/playground"):
        status, page = http.get(live.url, path)
        assert status == 200 and "<title>familial playground</title>" in page


@pytest.mark.reference
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_playground_streams_an_answer_coloured_by_exit(live, http, tmp_path):
    status, reference = http.post(live.url, "/v1/completions", REQUEST)
    assert status == 200
    query = urlencode({**{k: REQUEST[k] for k in ("model", "prompt", "max_tokens", "temperature", "budget")},
                       "autorun": 1})
    shot = Path(os.environ.get("FAMILIAL_SCREENSHOTS", tmp_path)) / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(f"{live.url}/?{query}")
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            tokens = page.eval_on_selector_all("#answer span.token", """spans => spans.map(s =>
                [s.textContent, s.dataset.exit, getComputedStyle(s).backgroundColor])""")
            legend = dict(page.eval_on_selector_all("#legend .legend-item", """items => items.map(i =>
                [i.dataset.exit, getComputedStyle(i.querySelector('.swatch')).backgroundColor])"""))
            stats = page.inner_text("#stats")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert "".join(text for text, _, _ in tokens) == reference["choices"][0]["text"]
    assert {exit for _, exit, _ in tokens} == {str(e) for e in reference["familial"]["exits"]} == {"1", "3"}
    assert set(legend) == {"1", "3"} and legend["1"] != legend["3"]
    assert all(colour == legend[exit] for _, exit, colour in tokens)
    assert "24 tokens" in stats and "tokens/s" in stats
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.reference
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_playground_asks_for_the_api_key_of_a_keyed_server(family_dir, serve):
    from familial.infer.engine import Engine
    from familial.serve.guard import ClientPolicy

    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=2, max_seq_len=128)
    query = urlencode({"model": "exit-1", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "autorun": 1})
    with serve(engine, policy=ClientPolicy(api_key="s3cret", loopback_only=True)) as live, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            # Asked on the page: the /v1 routes answered 401, so the key field shows.
            page.goto(f"{live.url}/?{query}")
            page.wait_for_selector("#apikey", state="visible", timeout=120_000)
            page.fill("#apikey", "s3cret")
            page.dispatch_event("#apikey", "change")
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            asked = page.inner_text("#stats")
            # Given in the link's fragment, which the browser never sends to the server.
            page = browser.new_page()
            page.goto(f"{live.url}/?{query}#key=s3cret")
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            linked = page.inner_text("#stats")
            assert "#key" not in page.url
        finally:
            browser.close()
    assert "5 tokens" in asked and "5 tokens" in linked
