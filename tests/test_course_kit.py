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


# ----------------------------------------------------------------------------------------------- the lab
def lab_cells():
    return jupytext.read(pipeline.LAB_SOLUTION).cells


def test_student_lab_has_blanks_and_no_solution():
    solution = [c.source for c in lab_cells()]
    student = pipeline.student_lab()
    blanks = sum(c.source.count("raise NotImplementedError") for c in student.cells if c.cell_type == "code")
    assert blanks == sum(s.count("# BEGIN SOLUTION") for s in solution) >= 5
    text = "\n".join(c.source for c in student.cells)
    assert "SOLUTION" not in text and "*Your answer here.*" in text
    for src in solution:                                   # no line of a solution block is left
        for block in re.findall(r"# BEGIN SOLUTION\n(.*?)# END SOLUTION", src, re.S):
            for line in block.strip().splitlines():
                assert line.strip() not in {ln.strip() for ln in text.splitlines()} or len(line.strip()) < 12, line
    tags = [c.metadata.get("tags", []) for c in student.cells]
    for i, cell in enumerate(student.cells):
        if cell.cell_type == "code" and "raise NotImplementedError" in cell.source:
            later = [t for t in tags[i + 1:i + 3]]
            assert any("check" in t for t in later), f"blank in cell {i} has no check cell after it"


def test_student_lab_refuses_a_solution_without_blanks(tmp_path):
    bad = tmp_path / "lab.md"
    bad.write_text("# Lab\n\n```{code-cell} ipython3\nx = 1\n```\n")
    with pytest.raises(ValueError, match="no `# BEGIN SOLUTION` blocks"):
        pipeline.student_lab(bad)
    bad.write_text("# Lab\n\n```{code-cell} ipython3\n# BEGIN SOLUTION\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unmatched BEGIN/END SOLUTION"):
        pipeline.student_lab(bad)


# A plausible wrong answer for each blank: the lab's check after it must reject it.
WRONG = {
    "revert_ratio": "def revert_ratio(h_pt, h_ft, alpha):\n    return h_pt / (h_ft + h_pt)\n",
    "soft_mix": "def soft_mix(w_pt, w_ft, h_pt, h_ft, alpha):\n"
                "    return w_pt + revert_ratio(h_pt, h_ft, alpha) * (w_ft - w_pt)\n",
    "diag_fisher": "def diag_fisher(net, idx):\n"
                   "    loss = torch.nn.functional.cross_entropy(net(X[idx]), y[idx])\n"
                   "    names = [n for n, _ in net.named_parameters()]\n"
                   "    grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()])\n"
                   "    return {n: g ** 2 for n, g in zip(names, grads)}\n",
    "hard_mix_score": "def hard_mix_score(w_pt, w_ft, h_pt, h_ft, alpha):\n"
                      "    return (h_ft - alpha * h_pt) * (w_pt - w_ft) ** 2\n",
    "hard_mix": "def hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k):\n"
                "    return cgm.hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row=False)\n",
    "merge": "def merge(alpha):\n"
             "    return {n: soft_mix(state_pt[n], state_ft[n], h_pt[n], h_ft[n], alpha) if n.endswith('weight')\n"
             "            else state_ft[n] for n in state_ft}\n",
}


def test_lab_checks_reject_wrong_answers(tmp_path, monkeypatch):
    """Run the solution's cells in this process up to the last blank; before each check cell, run it once
    more with the wrong answer above put in place of the function just written: it must fail."""
    import matplotlib
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    caught, defined = set(), []
    for cell in lab_cells():
        if cell.cell_type != "code":
            continue
        tags = cell.metadata.get("tags", [])
        if "check" in tags:
            for name in defined:
                trial = dict(ns)
                exec(WRONG[name], trial)
                with pytest.raises(AssertionError):
                    exec(cell.source, trial)
                caught.add(name)
            defined = []
        exec(cell.source, ns)
        if "parameters" in tags:
            ns["OUT_DIR"] = str(tmp_path / "results")
        defined += [n for n in WRONG if re.search(rf"^def {n}\(", cell.source, re.M)]
        if caught == set(WRONG):
            break
    assert caught == set(WRONG), f"no check ran against {sorted(set(WRONG) - caught)}"


@pytest.mark.slow
def test_lab_solution_passes_its_checks(tmp_path):
    """The solution, run as students run it (a Jupyter kernel, papermill), passes every check of the lab in
    under ten minutes, and saves its figure for slides."""
    import json
    import time
    start = time.perf_counter()
    executed = pipeline.execute_lab(tmp_path)
    seconds = time.perf_counter() - start
    nb = json.loads(executed.read_text())
    checks = [c for c in nb["cells"] if "check" in c.get("metadata", {}).get("tags", [])]
    assert len(checks) >= 5
    for cell in checks:
        out = "".join("".join(o.get("text", "")) for o in cell["outputs"] if o["output_type"] == "stream")
        assert out.startswith("ok"), f"a check did not pass: {cell['source'][:80]!r} printed {out!r}"
    assert seconds < 600, f"the lab took {seconds:.0f} s"
    assert (tmp_path / "results" / pipeline.LAB_NAME / "fig-lab-tradeoff.svg").is_file()


@pytest.mark.parametrize("path", [pipeline.NOTEBOOK_DIR / f"{n}.md" for n in pipeline.notebook_names()]
                         + [pipeline.LAB_SOLUTION], ids=lambda p: p.stem)
def test_shown_code_fits_the_page(path):
    """Code a reader sees (cells not tagged remove-cell or remove-input) has lines of at most 100
    characters: at 1280 px the book shows 100 characters of code on a line."""
    long = []
    for i, cell in enumerate(jupytext.read(path).cells):
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and not {"remove-cell", "remove-input"} & set(tags):
            long += [f"cell {i}: {len(line)} characters: {line[:60]}" for line in cell.source.splitlines()
                     if len(line) > 100]
    assert not long, f"{path.name}: code lines wider than the page:\n" + "\n".join(long[:10])


def test_saved_files_are_readable_like_any_new_file(tmp_path, figure):
    """Written through a private temporary file, but left with the permissions open() would give (a book
    served by a web server must be readable by it)."""
    import os
    mask = os.umask(0o022)
    try:
        path = report.save_figure(figure, tmp_path, "fig-toy-mode")
    finally:
        os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in tmp_path.iterdir()), \
        {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert path.is_file()
