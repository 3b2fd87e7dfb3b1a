"""The course kit: figures saved for the page and for slides under one naming scheme."""
from __future__ import annotations

import re

import jupytext
import pytest

from cgm_min import pipeline, report


@pytest.fixture
def figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([0, 1, 2], [1.0, 0.5, 0.8], label="a line")
    ax.set_title("a title")
    ax.legend()
    yield fig
    plt.close(fig)


def test_save_figure_writes_png_for_the_page_and_vector_files_for_slides(tmp_path, figure):
    path = report.save_figure(figure, tmp_path, "fig-toy-example")
    assert path == tmp_path / "fig-toy-example.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig-toy-example.pdf").read_bytes()[:5] == b"%PDF-"
    svg = (tmp_path / "fig-toy-example.svg").read_text()
    assert "<svg" in svg and "<dc:date>" not in svg, "the SVG must carry no date (reruns write the same bytes)"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fig-toy-example.pdf", "fig-toy-example.png", "fig-toy-example.svg"], "no temporary files may be left"
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report.save_figure(figure, tmp_path, "fig-toy-example")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first, "a rerun must write the same bytes"


def test_save_figure_png_only_and_bad_names(tmp_path, figure):
    report.save_figure(figure, tmp_path, "fig-merge-fronts", slides=())
    assert [p.name for p in tmp_path.iterdir()] == ["fig-merge-fronts.png"]
    for bad in ["fig-toy", "fig-toys-x", "fig-toy-Landscape", "fig-toy-a_b", "fig-toy-a--b"]:
        with pytest.raises(ValueError, match="fig-<chapter>-<what>"):
            report.save_figure(figure, tmp_path, bad)
    with pytest.raises(ValueError, match="unknown slide formats"):
        report.save_figure(figure, tmp_path, "fig-toy-x", slides=("eps",))
    assert [p.name for p in tmp_path.iterdir()] == ["fig-merge-fronts.png"], "a refused name writes nothing"


SAVE_CALL = re.compile(r"save_figure\(\s*[^,]+,\s*[^,]+,\s*(f?)[\"']([^\"']+)[\"']")


@pytest.mark.parametrize("name", pipeline.notebook_names())
def test_notebook_figures_follow_the_naming_scheme(name):
    """Every figure a chapter saves is named fig-<chapter>-<what>, and every labelled figure cell too."""
    text = (pipeline.NOTEBOOK_DIR / f"{name}.md").read_text()
    saved = SAVE_CALL.findall(text)
    bad = [n for f, n in saved if not f and not report.FIGURE_NAME.fullmatch(n)]
    assert not bad, f"{name}: figure names outside fig-<chapter>-<what>: {bad}"
    nb = jupytext.read(pipeline.NOTEBOOK_DIR / f"{name}.md")
    labels = [c.metadata["mystnb"]["figure"].get("name", "") for c in nb.cells
              if "figure" in c.metadata.get("mystnb", {})]
    bad = [n for n in labels if not report.FIGURE_NAME.fullmatch(n)]
    assert not bad, f"{name}: figure labels outside fig-<chapter>-<what>: {bad}"
