"""The page of `nmt serve` (nmt/web/index.html) in a real browser: Debian's Chromium driven by
Playwright against a real `nmt serve` on the tiny trained model. What the page shows must be what
`nmt translate` prints, and its heat map must be the server's attention, cell for cell."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: `make test` installs it (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: pip install -e '.[dev]'")

# Never Playwright's own browser download: the distribution's Chromium, headless, and nothing in
# the background that would reach the network.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NMT = Path(sys.executable).with_name("nmt")
SENTENCE = "Ein kleines Mädchen klettert in ein Spielhaus aus Holz."
# The server asks for this key, as one on a network would: the page must ask for it on a 401.
API_KEY = "page-test-key"
# One thread per process: the tests run two at a time on two cores.
ENV = {**{k: v for k, v in os.environ.items() if k != "NMT_API_KEY"}, "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Served:
    url: str
    cli_translation: str  # what `nmt translate` prints for SENTENCE: the page must show the same


@pytest.fixture(scope="module")
def served(trained_exp, tmp_path_factory):
    """A real `nmt serve` on the tiny model, with an API key, once /health answers; `nmt
    translate` runs on the same model while the server loads."""
    _, exp = trained_exp
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(NMT), "serve", "--model", str(exp), "--port", "0", "--threads", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env={**ENV, "NMT_API_KEY": API_KEY})
    try:
        done = subprocess.run([str(NMT), "translate", "--model", str(exp)], input=SENTENCE + "\n",
                              capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"nmt serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"nmt serve not answering within 90 s:\n{log.read_text()}"
            # --port 0: the port is the one its first line names
            found = re.search(r" on (http://\S+)", log.read_text())
            if found and healthy(found[1]):
                break
            time.sleep(0.2)
        yield Served(found[1], done.stdout.rstrip("\n"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, key: str | None):
    """A fresh browser profile on the page; with `key`, the page has it stored already."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    if key is not None:
        context.add_init_script(f"localStorage.setItem('nmt.apiKey', {key!r})")
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(url + "/")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server, API_KEY)
    page.wait_for_selector("[data-testid=model-option]", state="attached")
    page.get_by_test_id("live").uncheck()  # translate on the button only, one request per test step
    yield page
    page.context.close()
    assert not page.errors, f"JavaScript errors on the page: {page.errors}"


def translate(page, text: str) -> None:
    page.get_by_test_id("input").fill("")
    page.get_by_test_id("input").type(text)
    page.get_by_test_id("translate").click()
    page.wait_for_selector("[data-testid=results][data-state=done]", timeout=20_000)


def has_class(locator, name: str) -> bool:
    return name in (locator.get_attribute("class") or "").split()


def test_page_shows_the_cli_translation_and_its_attention(page, served):
    cli_translation = served.cli_translation
    translate(page, SENTENCE)
    result = page.get_by_test_id("result")
    assert result.count() == 1
    assert result.get_by_test_id("translation").text_content() == cli_translation

    # The heat map: a cell per (target word, source word), each row a distribution.
    n_src = result.get_by_test_id("src-head").count()
    n_tgt = result.get_by_test_id("tgt-head").count()
    assert n_src == len(SENTENCE.split())  # source words are the sentence's words, pieces merged
    assert n_tgt >= len(cli_translation.split()) > 0
    cells = result.get_by_test_id("cell").evaluate_all(
        "cells => cells.map(c => [+c.dataset.row, +c.dataset.col, +c.dataset.weight])")
    assert sorted((r, c) for r, c, _ in cells) == [(r, c) for r in range(n_tgt) for c in range(n_src)]
    weights = [[0.0] * n_src for _ in range(n_tgt)]
    for r, c, w in cells:
        weights[r][c] = w
    for row in weights:
        assert min(row) >= 0 and abs(sum(row) - 1) < 1e-3, row

    # Pointing at a target word highlights its row and marks the source word it attends to most.
    words = result.locator("[data-testid=translation] [data-testid=tgt-word]")
    assert words.count() == len(cli_translation.split())
    for k in sorted({0, words.count() - 1}):
        word = words.nth(k)
        row = int(word.get_attribute("data-tgt-index"))
        word.hover()
        strongest = max(range(n_src), key=lambda c: weights[row][c])
        src_words = result.get_by_test_id("src-word")
        assert [has_class(src_words.nth(c), "highlight") for c in range(n_src)] == \
            [c == strongest for c in range(n_src)]
        assert has_class(result.locator(f"[data-testid=src-head][data-col='{strongest}']"), "highlight")
        highlighted = result.locator("[data-testid=cell].highlight").evaluate_all(
            "cells => cells.map(c => +c.dataset.row)")
        assert highlighted == [row] * n_src
        assert has_class(word, "highlight")

    # ... and so does pointing at a row of the heat map: the word of the translation lights up.
    last = words.nth(words.count() - 1)
    first_row = int(words.nth(0).get_attribute("data-tgt-index"))
    result.locator(f"[data-testid=tgt-head][data-tgt-index='{first_row}']").hover()
    assert has_class(words.nth(0), "highlight") and (words.count() == 1 or not has_class(last, "highlight"))
    page.mouse.move(1, 1)  # away: nothing stays highlighted
    assert result.locator(".highlight").count() == 0


def test_page_shows_nbest_and_server_errors(page):
    page.get_by_test_id("nbest").fill("2")
    translate(page, "Zwei Hunde spielen im Schnee.\nEin Mann schläft.")
    results = page.get_by_test_id("result")
    assert results.count() == 2
    for i in range(2):
        hyps = results.nth(i).get_by_test_id("hypothesis")
        assert hyps.count() == 2
        # best first: choosing the second shows it as the translation, with its own heat map
        hyps.nth(1).click()
        card = page.locator(f"[data-testid=result][data-index='{i}']")
        assert card.get_by_test_id("translation").text_content() == \
            card.locator("[data-testid=hypothesis][data-hyp-index='1'] span").nth(1).text_content() \
            or card.get_by_test_id("translation").get_attribute("data-empty") == "true"

    # A request the server refuses (n-best over the beam) is its one-line message, not a crash.
    page.get_by_test_id("beam").fill("1")
    page.get_by_test_id("translate").click()
    page.wait_for_selector("[data-testid=results][data-state=error]")
    error = page.get_by_test_id("error")
    assert error.is_visible() and "nbest" in error.text_content() and "\n" not in error.text_content()


def test_page_asks_for_the_api_key_on_401_and_keeps_it(browser, server):
    page = open_page(browser, server, None)
    key_form, error = page.get_by_test_id("key-form"), page.get_by_test_id("error")
    key_form.wait_for()  # GET /models answered 401
    assert "API key" in error.text_content()
    assert page.get_by_test_id("model-option").count() == 0

    page.get_by_test_id("api-key").fill("not-the-key")
    page.get_by_test_id("api-key").press("Enter")
    page.wait_for_function("document.getElementById('error').textContent.includes('refused')")
    assert key_form.is_visible()

    page.get_by_test_id("api-key").fill(API_KEY)
    page.get_by_test_id("api-key").press("Enter")
    page.wait_for_selector("[data-testid=model-option]", state="attached")
    assert not key_form.is_visible() and not error.is_visible()
    page.get_by_test_id("live").uncheck()
    translate(page, "Ein Mann schläft.")
    assert page.get_by_test_id("result").count() == 1

    page.reload()  # the key is kept: no question the second time
    page.wait_for_selector("[data-testid=model-option]", state="attached")
    assert not key_form.is_visible()
    assert page.evaluate("localStorage.getItem('nmt.apiKey')") == API_KEY
    page.context.close()
    assert not page.errors, f"JavaScript errors on the page: {page.errors}"
