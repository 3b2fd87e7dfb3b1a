"""The built book, shared by the test modules that read it (test_book.py, test_pdf.py): built once per
test session from the tiny run, with the PDF when headless Chromium is there. A failed build is not
retried by every test that needs it: they all report the first failure."""
from __future__ import annotations

from pathlib import Path

from cgm_min import pipeline

CHROMIUM = pipeline.find_chromium()
_built: dict[Path, Path | BaseException] = {}


def built_book(tiny_run: Path) -> Path:
    if tiny_run not in _built:
        try:
            _built[tiny_run] = pipeline.build_book(tiny_run, pdf=CHROMIUM is not None)
        except Exception as exc:  # noqa: BLE001 (re-raised below, for this test and every later one)
            _built[tiny_run] = exc
    result = _built[tiny_run]
    if isinstance(result, BaseException):
        raise RuntimeError(f"the book build failed: {result}") from result
    return result
