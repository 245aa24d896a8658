"""Take docs/serve.png, the picture of `nmt serve`'s page in README: a real server on a trained
experiment, the page in headless Chromium, one German sentence translated, one target word
pointed at so that the heat map shows its row and the source words it attends to.

    .venv/bin/python docs/screenshot.py exp/de-en
    .venv/bin/python docs/screenshot.py exp/de-en --sentence "Zwei Männer spielen Fußball." --word 2

It drives the distribution's Chromium (apt-get install chromium), never Playwright's own download.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing in the background that would reach the network or slow the start.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"screenshot: nmt serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"screenshot: no answer from {url}/health within {seconds:.0f} s")


def shoot(url: str, sentence: str, word: int | None, out: Path, width: int) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 760}, device_scale_factor=1)
        page.goto(url + "/")
        page.wait_for_selector("[data-testid=model-option]", state="attached")
        page.get_by_test_id("live").uncheck()
        page.get_by_test_id("input").fill(sentence)
        page.get_by_test_id("translate").click()
        page.wait_for_selector("[data-testid=results][data-state=done]")
        words = page.locator("[data-testid=translation] [data-tgt-index]")
        if words.count():
            words.nth(min(word if word is not None else words.count() // 2, words.count() - 1)).hover()
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="a trained experiment directory or checkpoint")
    parser.add_argument("--sentence", default="Ein kleines Mädchen klettert in ein Spielhaus aus Holz.")
    parser.add_argument("--word", type=int, default=None,
                        help="the target word to point at, 0-based (default: the middle one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serve.png")
    parser.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"screenshot: {CHROMIUM} not found (apt-get install chromium)")

    port = free_port()
    nmt = Path(sys.executable).with_name("nmt")
    env = {k: v for k, v in os.environ.items() if k != "NMT_API_KEY"}  # on 127.0.0.1, no key asked
    server = subprocess.Popen([str(nmt), "serve", "--model", str(args.experiment), "--port", str(port)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        shoot(url, args.sentence, args.word, args.out, args.width)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"screenshot: wrote {args.out}")


if __name__ == "__main__":
    main()
