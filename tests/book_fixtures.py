"""The built book, shared by the test modules that read it (test_book.py, test_pdf.py): built once per
test session from the tiny run, with the PDF when headless Chromium is there. A failed build is not
retried by every test that needs it: they all report the first failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cgm_min import pipeline

CHROMIUM = pipeline.find_chromium()
_built: dict[Path, Path | BaseException] = {}


def chromium_or_skip(without: str = "") -> str:
    """The headless Chromium the test needs; without one the test is skipped, or fails when
    CGM_REQUIRE_BROWSER is set. `without` says what is not checked then."""
    if CHROMIUM is None:
        if os.environ.get("CGM_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (CGM_REQUIRE_BROWSER is set) but was not found")
        pytest.skip("headless chromium not installed (Debian package `chromium`)" + (f": {without}" if without else ""))
    return CHROMIUM


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
