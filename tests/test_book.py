"""The built book: offline build with -W, internal links resolve, nothing of the build machine leaks into the
pages or the notebooks they serve, and in headless Chromium at 1280 px every page renders its equations
(no raw TeX left), loads every figure at no more than its natural size and not so much smaller that its
text cannot be read, logs no JavaScript error, reaches
for no network, and has no code cell, output or equation wider than the page. A full-page screenshot of
every page is saved in build/test-artifacts/ (or $CGM_ARTIFACTS)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from book_fixtures import CHROMIUM, built_book, chromium_or_skip
from bs4 import BeautifulSoup

from cgm_min import pipeline

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("CGM_ARTIFACTS") or pipeline.ROOT / "build" / "test-artifacts")
WIDTH = 1280
CHAPTERS = [f"notebooks/{n}.html" for n in pipeline.notebook_names()]
# Pages that must show rendered math and at least one figure.
MATH_PAGES = ["derivation.html", *CHAPTERS]
FIGURE_PAGES = CHAPTERS


def toc_pages() -> list[str]:
    """Every page of book/_toc.yml in book order, as the built file names."""
    toc = yaml.safe_load((pipeline.BOOK_DIR / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
    return [f"{f}.html" for f in files]


# Every page of the table of contents, and the pages Sphinx makes: the index, the proof index, the search.
EVERY_PAGE = [*toc_pages(), "genindex.html", "prf-prf.html", "search.html"]


@pytest.fixture(scope="module")
def book(tiny_run) -> Path:
    return built_book(tiny_run)


def pages(book: Path) -> list[Path]:
    return sorted(p for p in book.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def test_book_has_every_chapter(book):
    names = {str(p.relative_to(book)) for p in pages(book)}
    for expected in ["index.html", "teaching.html", "lab/lab_cgm.html", "glossary.html", "contributing.html",
                     *MATH_PAGES, *EVERY_PAGE]:
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


def test_reference_apparatus(book):
    """A non-empty index, a proof index by titles, author-year bibliography labels, the PDF linked from the
    front page's side bar, the slide figures gathered into one folder and listed on the teaching page."""
    def main_text(name):
        soup = BeautifulSoup((book / name).read_text(encoding="utf-8"), "html.parser")
        return soup.find("main").get_text(" ", strip=True)
    index = BeautifulSoup((book / "genindex.html").read_text(encoding="utf-8"), "html.parser")
    entries = index.select("main table.indextable a")
    assert len(entries) >= 10, f"the index has {len(entries)} entries; chapters add them with {{index}}"
    proofs = main_text("prf-prf.html")
    assert "Proposition:" in proofs and not re.search(r"\bprop-[a-z]", proofs), \
        f"the proof index should list titles, not labels: {proofs[:300]}"
    labels = {li.get_text(strip=True).strip("[]") for li in BeautifulSoup((book / "bibliography.html").read_text(
        encoding="utf-8"), "html.parser").select("main .citation .label")}
    assert labels and all(re.fullmatch(r"[^\[\]]+, \d{4}[a-z]?", lab) for lab in labels), \
        f"bibliography labels are not author-year: {sorted(labels)[:5]}"
    cited = {re.sub(r"\s+", " ", a.get_text()).strip() for p in pages(book) for a in BeautifulSoup(
             p.read_text(encoding="utf-8"), "html.parser").select('main a[href*="bibliography.html#"]')}
    assert cited and cited <= labels, f"cited in the text but not so in the bibliography: {sorted(cited - labels)[:5]}"
    front = (book / "intro.html").read_text(encoding="utf-8")
    if CHROMIUM is not None:
        assert f'href="{pipeline.BOOK_PDF}"' in front, "the front page should link the whole-book PDF"
    slides = book.parent / "slides"
    vector = sorted(p.stem for p in slides.glob("fig-*.svg"))
    pngs = sorted(p.stem for p in (book.parent / "results").glob("*/fig-*.png"))
    assert vector == pngs, "every chapter figure should be in slides/ as SVG"
    assert (slides / pipeline.SLIDES_ZIP).is_file()
    teaching = main_text("teaching.html")
    assert all(name in teaching for name in pngs), "the teaching page lists every slide figure"


def test_side_bar_links_the_pdf_the_build_wrote(book):
    """Every page's side bar links the whole-book PDF the build wrote (a nested page too), and a book built
    without Chromium has neither the PDF nor a link to it."""
    for name in ["intro.html", "notebooks/01_toy_quadratics.html"]:
        soup = BeautifulSoup((book / name).read_text(encoding="utf-8"), "html.parser")
        links = [a["href"] for a in soup.select("nav.cgm-book-links a.cgm-pdf")]
        if CHROMIUM is None:
            assert not links and not (book / pipeline.BOOK_PDF).exists(), f"{name}: a PDF without Chromium"
            continue
        assert len(links) == 1, f"{name}: {len(links)} PDF links in the side bar"
        target = (book / name).parent / unquote(links[0])
        assert target.resolve() == (book / pipeline.BOOK_PDF).resolve() and target.is_file(), \
            f"{name}: the side bar links {links[0]}, not the PDF the build wrote ({pipeline.BOOK_PDF})"


# ------------------------------------------------------------------ what the book serves leaks nothing
PROGRESS = re.compile(r"\d+%\|[^|\n]*\||\d+(\.\d+)?\s?(it|s)/(s|it)\]|\x1b\[")


def test_no_machine_paths_or_stderr_in_site_or_downloads(book):
    leaks = []
    for path in sorted(book.rglob("*")):
        if path.suffix not in (".html", ".ipynb", ".js", ".txt", ".md", ".json") or "mathjax" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found = pipeline.machine_paths(text)
        if found:
            leaks.append(f"{path.relative_to(book)}: machine path {found[0]}")
        if path.suffix in (".html", ".ipynb") and PROGRESS.search(text):
            leaks.append(f"{path.relative_to(book)}: progress output {PROGRESS.search(text).group(0)!r}")
    served = sorted(book.rglob("*.ipynb"))
    assert len(served) >= len(CHAPTERS), f"the book serves {len(served)} notebooks for download"
    for path in served:
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        streams = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "stream"]
        if any(o["name"] == "stderr" for o in streams):
            leaks.append(f"{path.relative_to(book)}: a stderr stream")
        if any("\r" in "".join(o["text"]) for o in streams):
            leaks.append(f"{path.relative_to(book)}: a carriage-return progress line")
        tags = [t for c in code for t in c.get("metadata", {}).get("tags", [])]
        if "lab" not in path.parts and (tags.count("parameters") != 1 or "injected-parameters" in tags):
            leaks.append(f"{path.relative_to(book)}: the parameters are not shown exactly once")
    assert not leaks, "the book leaks:\n" + "\n".join(leaks[:30])


def test_no_text_glitches(book):
    """No doubled reference prefix ("Eq. Eq.", the role writes "Eq."), and no table cell cut short with an
    ellipsis (shorten on purpose instead)."""
    glitches = []
    for page in pages(book):
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        main = soup.find("main")
        if main is None:
            continue
        text = re.sub(r"\s+", " ", main.get_text(" "))
        glitches += [f"{page.relative_to(book)}: {m.group(0)!r}" for m in
                     re.finditer(r"\b(Eq|Fig|Figure|Table)\.? \1\b", text)]
        glitches += [f"{page.relative_to(book)}: cell cut short: {td.get_text(strip=True)[-40:]!r}"
                     for td in main.select("table td, table th")
                     if re.search(r"(\u2026|\.\.\.)$", td.get_text(strip=True))]
    assert not glitches, "\n".join(glitches[:20])


# --------------------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser():
    with pipeline.offline_chromium(chromium_or_skip()) as b:
        yield b


RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\frac|\\alpha|\\lambda")

# A notebook figure is drawn at 110 dpi (report.set_style): one 11 inches wide (two panels, the widest the
# page conventions allow) is shown at 1280 px about 1.65 times smaller than drawn. A figure shrunk more than
# this has text too small to read at 100 % zoom (a 15-inch figure: 2.2 times).
MAX_SHRINK = 1.75

# Run in the page after MathJax: open every toggle (hidden code counts too), then measure.
MEASURE = """() => {
  document.querySelectorAll('details').forEach(d => d.open = true);
  document.querySelectorAll('.toggle-hidden, .toggle-details__summary').forEach(e => e.click && e.click());
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const right = article.getBoundingClientRect().right;
  const kinds = {
    'code cell': 'div.cell_input pre',
    'output': 'div.cell_output pre, div.cell_output div.output, div.cell_output table',
    'equation': 'mjx-container[display="true"], div.math',
    'code block': 'article div.highlight pre',
    'table': 'article table'};
  const wide = [], flagged = [];
  for (const [kind, selector] of Object.entries(kinds)) {
    for (const el of document.querySelectorAll(selector)) {
      if (flagged.some(f => f.contains(el))) continue;      // reported once, by its outermost box
      const box = el.getBoundingClientRect();
      if (box.width === 0 && box.height === 0) continue;
      const scrolls = el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible';
      const past = box.right > right + 1;
      if (scrolls || past) {
        flagged.push(el);
        const text = (el.innerText || el.textContent || '').trim().split('\\n')[0].slice(0, 70);
        wide.push(`${kind}: ${Math.max(el.scrollWidth, Math.round(box.right - box.left))} px in a `
                  + `${Math.round(scrolls ? el.clientWidth : right - box.left)} px box: ${text}`);
      }
    }
  }
  const shown = i => i.getBoundingClientRect().width;
  const loaded = Array.from(document.querySelectorAll('main img')).filter(i => i.complete && i.naturalWidth > 0);
  const upscaled = loaded.filter(i => shown(i) > i.naturalWidth + 1)
    .map(i => `${i.getAttribute('src')}: ${i.naturalWidth} px shown at ${Math.round(shown(i))} px`);
  const shrunk = loaded.filter(i => shown(i) > 0 && i.naturalWidth > MAX_SHRINK * shown(i))
    .map(i => `${i.getAttribute('src')}: ${i.naturalWidth} px shown at ${Math.round(shown(i))} px`);
  const images = Array.from(document.querySelectorAll('main img')).map(
    i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));
  return {wide, upscaled, shrunk, images};
}""".replace("MAX_SHRINK", str(MAX_SHRINK))


def inspect_page(browser, path: Path, screenshot: Path | None = None, math: bool = False) -> dict:
    """Open `path` at 1280 px; returns what went wrong: JavaScript errors, network requests, overflowing
    elements, upscaled or broken images and (with `math`) raw TeX left."""
    errors, external = [], []
    page = pipeline.offline_page(browser, refused=external, viewport={"width": WIDTH, "height": 900})
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    found = {"math": None, "raw_tex": []}
    if math:
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20000)
        page.evaluate("() => MathJax.startup.promise")
        found["math"] = page.locator("mjx-container").count()
        text = page.evaluate("""() => { const m = document.querySelector('main') || document.body;
            const c = m.cloneNode(true); c.querySelectorAll('pre, code, mjx-container, script, .highlight')
            .forEach(e => e.remove()); return c.innerText; }""")
        found["raw_tex"] = RAW_TEX.findall(text)
    page.wait_for_timeout(300)                           # late scripts (search, toggles) have run
    found.update(page.evaluate(MEASURE))
    found["errors"], found["external"] = errors, external
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return found


def assert_page_is_clean(name: str, found: dict, figures: bool = False) -> None:
    problems = [f"JavaScript error: {e}" for e in found["errors"]]
    problems += [f"reached for the network: {u}" for u in found["external"][:5]]
    problems += [f"wider than the page: {w}" for w in found["wide"]]
    problems += [f"figure upscaled (blurry): {u}" for u in found["upscaled"]]
    problems += [f"figure shrunk more than {MAX_SHRINK}x (text unreadable): {u}" for u in found["shrunk"]]
    problems += [f"figure did not load: {i['src']}" for i in found["images"] if not i["ok"]]
    if found["math"] is not None:
        if found["math"] == 0:
            problems.append("no rendered equations (mjx-container)")
        problems += [f"raw TeX left: {t}" for t in found["raw_tex"][:5]]
    if figures and not found["images"]:
        problems.append("no figures")
    assert not problems, f"{name} at {WIDTH} px:\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("name", EVERY_PAGE)
def test_page_in_browser(book, browser, name):
    shot = ARTIFACTS / (name.replace("/", "_").replace(".html", ".png"))
    found = inspect_page(browser, book / name, screenshot=shot, math=name in MATH_PAGES)
    assert_page_is_clean(name, found, figures=name in FIGURE_PAGES)


def test_search_shows_snippets_offline(book, browser):
    """Search from a book opened from disk: hits come with a snippet of their page, and no error."""
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto((book / "search.html").as_uri() + "?q=curvature")
    page.wait_for_function("() => document.querySelectorAll('#search-results li p.context').length > 0",
                           timeout=20000)
    snippets = page.locator("#search-results li p.context").all_inner_texts()
    page.close()
    assert snippets and any("curvature" in s.lower() for s in snippets), snippets[:3]
    assert not errors, errors


def test_browser_check_catches_a_broken_page(book, browser, tmp_path):
    """The checks can fail: a copy of a chapter with a long code line, a wide equation, a JavaScript error,
    a figure stretched past its natural width and one far too wide for the page is reported on each count."""
    src = book / "notebooks" / "01_toy_quadratics.html"
    soup = BeautifulSoup(src.read_text(encoding="utf-8"), "html.parser")
    article = soup.select_one("article.bd-article") or soup.find("main")
    broken = BeautifulSoup(
        '<div class="cell_input"><pre style="white-space: pre; overflow-x: auto">'
        + "x = [" + ", ".join(str(i) for i in range(200)) + "]</pre></div>"
        + '<div class="math notranslate nohighlight">\\[' + " + ".join(f"w_{{{i}}}" for i in range(120))
        + "\\]</div>"
        + f'<img src="../{next(book.glob("_images/*.png")).relative_to(book).as_posix()}" '
        'style="width: 4000px; max-width: none">'
        + '<img src="../_images/_broken_wide.png">'
        + "<script>undefinedFunctionOfABrokenPage();</script>", "html.parser")
    article.append(broken)
    page = book / "notebooks" / "_broken_for_test.html"
    wide = book / "_images" / "_broken_wide.png"        # a figure drawn 20 inches wide at 110 dpi
    from PIL import Image
    Image.new("RGB", (2200, 300), "white").save(wide)
    try:
        page.write_text(str(soup), encoding="utf-8")
        found = inspect_page(browser, page, screenshot=tmp_path / "broken.png", math=True)
    finally:
        page.unlink()
        wide.unlink()
    assert any(w.startswith("code cell") for w in found["wide"]), found["wide"]
    assert any(w.startswith("equation") for w in found["wide"]), found["wide"]
    assert any("undefinedFunctionOfABrokenPage" in e for e in found["errors"]), found["errors"]
    assert found["upscaled"], "a stretched figure was not reported"
    assert any("_broken_wide.png" in s for s in found["shrunk"]), "a 20-inch figure was not reported"
    with pytest.raises(AssertionError, match="wider than the page"):
        assert_page_is_clean("broken", found)
