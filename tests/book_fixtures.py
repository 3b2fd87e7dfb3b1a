"""The built book, shared by the test modules that read it (test_book.py, test_pdf.py): built once per
test session from the tiny run, with the PDF when headless Chromium is there."""
from __future__ import annotations

import functools
from pathlib import Path

from cgm_min import pipeline

CHROMIUM = pipeline.find_chromium()


@functools.lru_cache(maxsize=None)
def built_book(tiny_run: Path) -> Path:
    return pipeline.build_book(tiny_run, pdf=CHROMIUM is not None)
