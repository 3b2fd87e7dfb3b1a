"""The whole-book PDF: built offline with the book (headless Chromium prints Jupyter Book's single-page
build), it opens, has every page of the table of contents with its title in the PDF's outline and its
text, has no unrendered math and leaks no machine path."""
from __future__ import annotations

import os
import re
import unicodedata

import pytest
from book_fixtures import built_book, chromium_or_skip
from bs4 import BeautifulSoup

from cgm_min import pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pdf(tiny_run):
    chromium_or_skip("the book is built without PDF")
    try:
        import pypdf
    except ImportError:
        if os.environ.get("CGM_REQUIRE_BROWSER"):
            pytest.fail("pypdf is required to check the PDF (the `test` extra installs it)")
        pytest.skip("pypdf not installed")
    book = built_book(tiny_run)
    path = book / pipeline.BOOK_PDF
    assert path.is_file(), f"no {pipeline.BOOK_PDF} in the built book"
    reader = pypdf.PdfReader(path)
    text = "\n".join(page.extract_text() or "" for page in reader.pages)
    return book, reader, text


def toc_titles(book) -> list[str]:
    """The title (first heading) of every page the book's side bar lists, in book order."""
    soup = BeautifulSoup((book / "intro.html").read_text(encoding="utf-8"), "html.parser")
    titles = [soup.find("main").find("h1").get_text(" ", strip=True).rstrip("#").strip()]
    for a in soup.select("nav.bd-docs-nav a.reference.internal"):
        href = a["href"].split("#")[0]
        if not href or href == "intro.html":
            continue
        page = BeautifulSoup((book / href).read_text(encoding="utf-8"), "html.parser")
        titles.append(page.find("main").find("h1").get_text(" ", strip=True).rstrip("#").strip())
    return titles


def flat_outline(reader, items=None) -> list[str]:
    out = []
    for item in reader.outline if items is None else items:
        if isinstance(item, list):
            out += flat_outline(reader, item)
        else:
            out.append(item.title)
    return out


def squash(text: str) -> str:
    """Letters and digits only, lower case, ligatures undone ("ﬁ" -> "fi"): PDF text extraction splits and
    joins words its own way."""
    return re.sub(r"[^0-9a-z]", "", unicodedata.normalize("NFKC", text).lower())


def test_pdf_opens_and_has_every_chapter(pdf):
    book, reader, text = pdf
    assert len(reader.pages) >= 20, f"only {len(reader.pages)} pages"
    titles = toc_titles(book)
    assert len(titles) >= len(pipeline.notebook_names()) + 5
    outline = [squash(t) for t in flat_outline(reader)]
    missing = [t for t in titles if not any(squash(t) in entry for entry in outline)]
    assert not missing, f"chapters missing from the PDF's outline: {missing}"
    text = squash(text)
    missing = [t for t in titles if squash(t) not in text]
    assert not missing, f"chapter titles missing from the PDF's text: {missing}"


def test_pdf_has_rendered_math_and_no_machine_paths(pdf):
    book, reader, text = pdf
    # Sphinx writes math as \( ... \) and \[ ... \] for MathJax: a delimiter left in the text is math that
    # was not rendered (TeX inside code cells, such as a matplotlib label, has no such delimiters).
    raw = re.findall(r"\\\(|\\\)|\\\[|\\\]|\$\$", text)
    assert not raw, f"unrendered math in the PDF: {raw[:5]}"
    assert not pipeline.machine_paths(text), f"machine paths in the PDF: {pipeline.machine_paths(text)[:3]}"
