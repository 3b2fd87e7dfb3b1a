"""The notebook pipeline and report helpers: conventions every notebook follows, and clear errors."""
from __future__ import annotations

import json

import jupytext
import pytest

from cgm_min import pipeline, report


@pytest.mark.parametrize("name", pipeline.notebook_names())
def test_notebook_has_one_parameters_cell(name):
    nb = jupytext.read(pipeline.NOTEBOOK_DIR / f"{name}.md")
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected exactly one cell tagged `parameters`, found {len(tagged)}"
    for var in ("PRESET", "SEED", "OUT_DIR"):
        assert f"{var} =" in tagged[0].source, f"{name}: the parameters cell does not set {var}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# "), \
        f"{name}: the first cell should be the chapter title"


def test_notebooks_are_the_books_chapters():
    toc = (pipeline.BOOK_DIR / "_toc.yml").read_text()
    for name in pipeline.notebook_names():
        assert f"notebooks/{name}" in toc, f"{name} is not in book/_toc.yml"


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        pipeline.execute_notebook(pipeline.notebook_names()[0], "huge", tmp_path)
    with pytest.raises(ValueError, match="unknown preset 'huge'.*this notebook knows"):
        report.choose_preset("huge", {"tiny": {}, "cpu": {}})


def test_unknown_notebook_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebook 99_missing.md"):
        pipeline.execute_notebook("99_missing", "tiny", tmp_path)
    with pytest.raises(ValueError, match="unknown notebooks"):
        pipeline.execute_all("tiny", tmp_path, only=["99_missing"])


def test_book_build_needs_executed_notebooks(tmp_path):
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "index.html").write_text("previous book")
    with pytest.raises(FileNotFoundError, match="executed notebooks missing"):
        pipeline.build_book(tmp_path)
    assert (tmp_path / "html" / "index.html").read_text() == "previous book"


def test_metrics_are_written_whole_and_finite(tmp_path):
    path = report.write_metrics(tmp_path, {"a": 1.5, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}
    with pytest.raises(ValueError, match="finite"):
        report.write_metrics(tmp_path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}, "a failed write must not touch the file"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary files may be left"
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        report.read_metrics(tmp_path / "nowhere")


def test_figure_cells_without_image_are_found(tmp_path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    shown = nbformat.v4.new_code_cell("plot()", metadata={"mystnb": {"figure": {"name": "fig-shown"}}})
    shown.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
    blank = nbformat.v4.new_code_cell("plot()", metadata={"mystnb": {"figure": {"name": "fig-blank"}}})
    nb.cells = [shown, blank, nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    assert pipeline.figures_without_image(tmp_path / "nb.ipynb") == ["fig-blank"]


def test_replace_dir_swaps_whole_folders_and_restores_on_failure(tmp_path):
    final = tmp_path / "html"
    first = tmp_path / "new1"
    first.mkdir()
    (first / "a.txt").write_text("one")
    assert report.replace_dir(first, final) == final and (final / "a.txt").read_text() == "one"
    second = tmp_path / "new2"
    second.mkdir()
    (second / "b.txt").write_text("two")
    report.replace_dir(second, final)
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    with pytest.raises(FileNotFoundError):
        report.replace_dir(tmp_path / "missing", final)           # the second rename fails
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"], "the previous folder is put back"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["html"], "no folder left aside"


def test_save_figure_refuses_a_name_outside_the_scheme(tmp_path):
    """A figure name without the fig-<chapter>-<what> scheme (the older names without "fig-" too) is a
    one-line ValueError naming it, and nothing is written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    try:
        for bad in ["toy_landscapes", "landscapes", "Fig-toy-x"]:
            with pytest.raises(ValueError, match=f"figure name '{bad}' does not follow fig-<chapter>-<what>") as err:
                report.save_figure(fig, tmp_path, bad)
            assert "\n" not in str(err.value), "the error is one line"
    finally:
        plt.close(fig)
    assert list(tmp_path.iterdir()) == [], "a refused name writes nothing"
