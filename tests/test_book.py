"""The built book: offline build with -W, internal links resolve, and in headless Chromium the equations
render (no raw TeX left), every figure loads and no page reaches for the network. Saves screenshots to
build/test-artifacts/."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from bs4 import BeautifulSoup

from cgm_min import pipeline

pytestmark = pytest.mark.slow
ARTIFACTS = pipeline.ROOT / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Pages that must show rendered math and at least one figure.
MATH_PAGES = ["derivation.html", "notebooks/01_toy_quadratics.html", "notebooks/02_hard_mixing.html",
              "notebooks/03_curvature.html", "notebooks/04_miniature_world.html",
              "notebooks/05_merging_experiment.html", "notebooks/06_paper_figures.html"]
FIGURE_PAGES = MATH_PAGES[1:]


@pytest.fixture(scope="module")
def book(tiny_run) -> Path:
    return pipeline.build_book(tiny_run)


def pages(book: Path) -> list[Path]:
    return sorted(p for p in book.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def test_book_has_every_chapter(book):
    names = {str(p.relative_to(book)) for p in pages(book)}
    for expected in ["index.html", "intro.html", "notation.html", "derivation.html", "api.html",
                     "bibliography.html", "reproducing.html", *MATH_PAGES]:
        assert expected in names, f"{expected} missing from the built book"


def test_internal_links_resolve(book):
    broken = []
    for page in pages(book):
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for tag, attr in (("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")):
            for el in soup.find_all(tag):
                url = el.get(attr)
                if not url or urlparse(url).scheme in ("http", "https", "mailto", "data", "javascript"):
                    continue
                parts = urlparse(url)
                path, anchor = parts.path, parts.fragment
                target = (page.parent / unquote(path)).resolve() if path else page
                if not target.exists():
                    broken.append(f"{page.relative_to(book)}: {url} (no file)")
                elif anchor and target.suffix == ".html":
                    ids = set(re.findall(r'id="([^"]+)"', target.read_text(encoding="utf-8")))
                    if unquote(anchor) not in ids:
                        broken.append(f"{page.relative_to(book)}: {url} (no anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:30])


def test_figures_are_numbered_and_cited(book):
    html = (book / "notebooks" / "01_toy_quadratics.html").read_text(encoding="utf-8")
    assert 'id="fig-toy-landscapes"' in html
    derivation = (book / "derivation.html").read_text(encoding="utf-8")
    assert "#fig-toy-landscapes" in derivation, "the derivation should cite the regenerated Fig. 2"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CGM_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (CGM_REQUIRE_BROWSER is set) but was not found")
        pytest.skip("headless chromium not installed (Debian package `chromium`)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\frac|\\alpha|\\lambda")


@pytest.mark.parametrize("name", MATH_PAGES)
def test_page_renders_in_browser(book, browser, name):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    external = []
    page.route("**/*", lambda route: (external.append(route.request.url), route.abort())
               if not route.request.url.startswith("file:") else route.continue_())
    page.goto((book / name).as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20000)
    page.evaluate("() => MathJax.startup.promise")
    n_math = page.locator("mjx-container").count()
    assert n_math > 0, f"{name}: no rendered equations (mjx-container) found"
    text = page.evaluate("""() => { const m = document.querySelector('main') || document.body;
        const c = m.cloneNode(true); c.querySelectorAll('pre, code, mjx-container, script, .highlight')
        .forEach(e => e.remove()); return c.innerText; }""")
    leftover = RAW_TEX.findall(text)
    assert not leftover, f"{name}: raw TeX left in the rendered page: {leftover[:5]}"
    images = page.evaluate("""() => Array.from(document.querySelectorAll('main img')).map(
        i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))""")
    if name in FIGURE_PAGES:
        assert images, f"{name}: no figures"
    bad = [i["src"] for i in images if not i["ok"]]
    assert not bad, f"{name}: figures that did not load: {bad}"
    assert not external, f"{name}: the page tried to reach the network: {external[:5]}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / (name.replace("/", "_").replace(".html", ".png"))), full_page=False)
    page.close()
