"""The rendered book, read in a real browser: `python3 dev.py check-book` (after `python3 dev.py book`).

Serves `_build/html` on localhost, opens every page in headless Chromium (Debian's `chromium`, driven
by Playwright) at a laptop's width, waits for MathJax, and fails on what a reader would meet:

* raw TeX left in the text after MathJax ran (``\\(``, ``$$``, ``\\frac``...), or a MathJax error;
* an image that did not load;
* anything wider than its column: the page scrolling sideways, or a box (code, output, table,
  formula) with its own horizontal scrollbar;
* an internal link to a page or an anchor that does not exist.

A full-page screenshot of each page is saved under `_build/screenshots/` for people to look at.
Not collected by the normal test run (the file name does not start with test_): it needs the built
site and a browser.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("DSA_CHROMIUM", "/usr/bin/chromium")
PAGES = sorted(p.relative_to(SITE).as_posix() for p in (SITE / "book").glob("*.html"))
RAW_TEX = ("\\(", "\\[", "$$", "\\frac", "\\mathrm", "\\texttt", "\\sum", "\\left", "^{", "_{")

# the visible text of the article, without code (code may hold `$` or backslashes on purpose)
PROSE = """() => {
  const article = (document.querySelector('article') || document.body).cloneNode(true);
  article.querySelectorAll('pre, code, .highlight, mjx-container, script, style').forEach(e => e.remove());
  return article.innerText;
}"""
LAYOUT = """() => {
  const article = document.querySelector('article') || document.body;
  const boxes = [...article.querySelectorAll('*')].filter(e => e.clientWidth > 0
      && e.scrollWidth > e.clientWidth + 1 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX));
  return {
    page: document.documentElement.scrollWidth > window.innerWidth + 1,
    boxes: boxes.map(e => e.tagName.toLowerCase() + ': ' + (e.innerText || '').slice(0, 70).replace(/\\s+/g, ' ')),
    images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
    mathErrors: document.querySelectorAll('mjx-merror').length,
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  };
}"""


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").is_file():
        pytest.fail("no built book: run `python3 dev.py book` first")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per file served would bury the results
            pass

    handler = functools.partial(Quiet, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set DSA_CHROMIUM)")
    with sync_playwright() as playwright:
        # flags for a sandboxed machine without network: no background requests, no GPU
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()


def _anchors(path: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))


def _broken_links(page_path: str, hrefs: list[str]) -> list[str]:
    broken = []
    base = f"http://site/{page_path}"
    for href in hrefs:
        url = urlparse(urljoin(base, href))
        if url.scheme not in ("http", "https") or url.netloc != "site":
            continue  # external (none is fetched: the check runs offline), mailto, javascript
        target = SITE / unquote(url.path.lstrip("/"))
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"{href} (no file {target.relative_to(SITE)})")
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _anchors(target):
            broken.append(f"{href} (no anchor #{url.fragment})")
    return broken


@pytest.mark.parametrize("page_path", PAGES)
def test_page_reads_well(site, browser, page_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(site + page_path, wait_until="load")
        # MathJax typesets after load; its startup promise settles when the page is done
        page.evaluate("() => (window.MathJax && MathJax.startup && MathJax.startup.promise) || true")
        page.wait_for_timeout(300)
        prose = page.evaluate(PROSE)
        layout = page.evaluate(LAYOUT)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / (Path(page_path).stem + ".png")), full_page=True)
    finally:
        page.close()
    problems = []
    raw = sorted({tex for tex in RAW_TEX if tex in prose})
    if raw:
        problems.append(f"raw TeX in the text after MathJax: {raw}")
    if layout["mathErrors"]:
        problems.append(f"{layout['mathErrors']} MathJax errors")
    if layout["images"]:
        problems.append(f"images that did not load: {layout['images']}")
    if layout["page"]:
        problems.append("the page scrolls sideways")
    if layout["boxes"]:
        problems.append("boxes wider than the column: " + "; ".join(layout["boxes"][:5]))
    broken = _broken_links(page_path, layout["links"])
    if broken:
        problems.append("broken internal links: " + "; ".join(broken[:5]))
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


def test_every_chapter_is_checked():
    assert len(PAGES) >= 11, f"expected the intro and chapters 0-9 under _build/html/book, found {PAGES}"
