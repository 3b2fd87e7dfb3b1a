"""The book build's machinery on fabricated inputs (fast): executed notebooks cleaned for show and download,
the slide folder, the machine-path finder, the offline headless Chromium that prints the PDF."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml
from book_fixtures import chromium_or_skip

from cgm_min import pipeline


def executed_notebook(run_dir):
    """What papermill leaves: the source's parameters cell, the injected one, stderr progress bars, a stdout
    progress line redrawn with carriage returns, machine paths in outputs and in papermill's metadata."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"PRESET": "tiny", "SEED": 0, "OUT_DIR": "results/x"},
                                "input_path": f"{run_dir}/tmpabc/x.ipynb", "output_path": f"{run_dir}/x.ipynb"}
    params = nbformat.v4.new_code_cell('PRESET = "cpu"  # tiny, cpu or paper\nSEED = 0\nOUT_DIR = "results/x"',
                                       metadata={"tags": ["parameters", "remove-cell"]})
    injected = nbformat.v4.new_code_cell('# Parameters\nPRESET = "tiny"\nSEED = 0\nOUT_DIR = "results/x"\n',
                                         metadata={"tags": ["injected-parameters"],
                                                   "papermill": {"duration": 0.1}})
    work = nbformat.v4.new_code_cell("run()", metadata={"execution": {"iopub.status.busy": "2026"}})
    work.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="50%|#####     | 5/10 [00:01<00:01, 4.2it/s]\r"),
        nbformat.v4.new_output("stream", name="stdout", text="step 1\rstep 2\rdone\n\x1b[1mbold\x1b[0m\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": f"PosixPath('{run_dir}/results/x/m.json')"},
                               execution_count=1),
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), params, injected, work]
    return nb


def test_clean_executed_shows_parameters_once_and_strips_what_is_not_a_result(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "x.ipynb"
    nbformat.write(executed_notebook(run_dir.resolve()), path)
    pipeline.clean_executed(path, run_dir)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 2, "the injected parameters cell must be merged into the source's"
    assert code[0].source == 'PRESET = "tiny"  # tiny, cpu or paper\nSEED = 0\nOUT_DIR = "results/x"'
    assert code[0].metadata["tags"] == ["parameters", "remove-cell"]
    outputs = code[1].outputs
    assert [o.output_type for o in outputs] == ["stream", "execute_result"], "stderr must be gone"
    assert outputs[0].text == "done\nbold\n", "what a terminal shows last, without colour codes"
    assert outputs[1].data["text/plain"] == "PosixPath('results/x/m.json')"
    text = nbformat.writes(nb)
    assert str(tmp_path) not in text and not pipeline.machine_paths(text)
    assert "execution" not in code[1].metadata and "papermill" not in code[0].metadata
    before = nbformat.writes(nb)
    pipeline.clean_executed(path, run_dir)
    assert nbformat.writes(nbformat.read(path, as_version=4)) == before, "cleaning twice changes nothing"


def test_machine_paths_are_found():
    tmp, home = tempfile.gettempdir(), str(Path.home())
    here = str(pipeline.ROOT / "build" / "x.json")
    assert pipeline.machine_paths(f"see {tmp}/abc/x.json and /Users/me/y") == [f"{tmp}/abc/x.json", "/Users/me/y"]
    assert pipeline.machine_paths(f"/home/me/.cache/x, {home}/a") == ["/home/me/.cache/x", f"{home}/a"]
    assert pipeline.machine_paths(f"written to {here}") == [here]
    assert pipeline.machine_paths(f"results/x/m.json, https://example.org{tmp}/x, a{tmp}/b") == []


def test_collect_slides_gathers_vector_figures_into_one_folder(tmp_path):
    for nb, names in {"01_a": ["fig-toy-one", "toy_old"], "02_b": ["fig-hard-two"]}.items():
        folder = tmp_path / "results" / nb
        folder.mkdir(parents=True)
        for name in names:
            for ext in ("png", "svg", "pdf"):
                (folder / f"{name}.{ext}").write_bytes(f"{name}.{ext}".encode())
    mask = os.umask(0o022)
    try:
        slides = pipeline.collect_slides(tmp_path)
    finally:
        os.umask(mask)
    assert slides.stat().st_mode & 0o777 == 0o755, "the slide folder is readable like any new folder"
    assert sorted(p.name for p in slides.iterdir()) == [
        pipeline.SLIDES_ZIP, "fig-hard-two.pdf", "fig-hard-two.svg", "fig-toy-one.pdf", "fig-toy-one.svg"]
    with zipfile.ZipFile(slides / pipeline.SLIDES_ZIP) as zf:
        assert len(zf.namelist()) == 4
    first = (slides / pipeline.SLIDES_ZIP).read_bytes()
    assert pipeline.collect_slides(tmp_path) == slides
    assert (slides / pipeline.SLIDES_ZIP).read_bytes() == first, "the same figures give the same zip"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slides")], "no temporary folder left"
    page = pipeline._slides_page(slides)
    assert "`fig-toy-one`" in page and "slides/fig-hard-two.svg" in page and "toy_old" not in page
    (tmp_path / "results" / "02_b" / "fig-toy-one.svg").write_bytes(b"x")
    with pytest.raises(ValueError, match="two notebooks saved fig-toy-one.svg"):
        pipeline.collect_slides(tmp_path)
    assert (slides / "fig-hard-two.svg").is_file(), "a refused collection leaves the previous folder"


def test_book_without_chromium_needs_no_pdf(tmp_path, monkeypatch):
    for name in pipeline.notebook_names():
        (tmp_path / "executed").mkdir(exist_ok=True)
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / "executed" / f"{name}.ipynb")
    monkeypatch.setattr(pipeline, "find_chromium", lambda: None)
    with pytest.raises(RuntimeError, match="needs headless Chromium.*--no-pdf"):
        pipeline.build_book(tmp_path)


def test_cli_builds_without_pdf_when_chromium_is_missing(tmp_path, monkeypatch, capsys):
    """`python -m cgm_min.pipeline book` on a machine without Chromium warns and asks build_book for no PDF."""
    calls = []
    monkeypatch.setattr(pipeline, "find_chromium", lambda: None)
    monkeypatch.setattr(pipeline, "build_book", lambda out, pdf: calls.append(pdf) or tmp_path / "html")
    assert pipeline.main(["book", "--out", str(tmp_path)]) == 0
    assert calls == [False] and "without its PDF" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "find_chromium", lambda: "chromium")
    pipeline.main(["book", "--out", str(tmp_path)])
    pipeline.main(["book", "--out", str(tmp_path), "--no-pdf"])
    assert calls == [False, True, False]


# A page that reaches for the network twice and has a stand-in for MathJax (print_pdf waits for it).
OFFLINE_PAGE = """<!DOCTYPE html><html><head><title>t</title>
<link rel="stylesheet" href="https://cdn.example.org/theme.css">
<script>window.MathJax = {startup: {promise: Promise.resolve()}};</script></head>
<body><h1>Offline page</h1><img src="https://example.org/figure.png" alt="x"></body></html>"""


def test_offline_chromium_refuses_the_network_and_prints(tmp_path):
    """The one Chromium set-up print_pdf and the browser tests share: requests that are not local files are
    refused (and listed), local ones load, and print_pdf writes the page as a PDF."""
    chromium = chromium_or_skip()
    page_file = tmp_path / "page.html"
    page_file.write_text(OFFLINE_PAGE, encoding="utf-8")
    refused = []
    with pipeline.offline_chromium(chromium) as browser:
        page = pipeline.offline_page(browser, refused=refused, viewport={"width": 800, "height": 600})
        page.goto(page_file.as_uri(), wait_until="load")
        assert page.locator("h1").inner_text() == "Offline page", "a local file must load"
        page.close()
    assert sorted(refused) == ["https://cdn.example.org/theme.css", "https://example.org/figure.png"]
    pdf = pipeline.print_pdf(page_file, tmp_path / "out" / "page.pdf", chromium)
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in pdf.parent.iterdir()) == ["page.pdf"], "no temporary file may be left"


def fake_book_build(tmp_path, monkeypatch, pdf: bool) -> dict:
    """build_book on empty executed notebooks, with Jupyter Book and Chromium replaced by stand-ins: what
    each builder's staged _config.yml put in html_context, and the PDF print_pdf was asked to write."""
    (tmp_path / "executed").mkdir(parents=True)
    for name in pipeline.notebook_names():
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / "executed" / f"{name}.ipynb")
    seen = {"context": {}, "pdf": None}

    def jupyter_book(stage, builder):
        config = yaml.safe_load((stage / "_config.yml").read_text())
        seen["context"][builder] = config["sphinx"]["config"].get("html_context", {})
        (stage / "_build" / builder).mkdir(parents=True)
        (stage / "_build" / builder / "index.html").write_text("<html></html>")

    def print_pdf(html_file, target, chromium):
        seen["pdf"] = target
        target.write_bytes(b"%PDF-")
        return target

    monkeypatch.setattr(pipeline, "find_chromium", lambda: "chromium")
    monkeypatch.setattr(pipeline, "_run_jupyter_book", jupyter_book)
    monkeypatch.setattr(pipeline, "print_pdf", print_pdf)
    seen["html"] = pipeline.build_book(tmp_path, pdf=pdf)
    return seen


def test_side_bar_pdf_link_names_the_file_the_build_writes(tmp_path, monkeypatch):
    """BOOK_PDF is the one name of the PDF: book/_config.yml does not name it; the build puts it in
    html_context (the side bar's link) when it prints the PDF there, and leaves it out with --no-pdf."""
    source = yaml.safe_load((pipeline.BOOK_DIR / "_config.yml").read_text())
    assert "book_pdf" not in source["sphinx"]["config"].get("html_context", {}), \
        "book/_config.yml names the PDF; the build sets it from pipeline.BOOK_PDF"
    seen = fake_book_build(tmp_path / "with", monkeypatch, pdf=True)
    assert seen["context"]["html"]["book_pdf"] == pipeline.BOOK_PDF
    assert seen["context"]["html"]["default_mode"] == "light", "the rest of html_context is kept"
    assert seen["context"]["singlehtml"] == seen["context"]["html"], "the PDF's pages get the same context"
    assert seen["pdf"].name == seen["context"]["html"]["book_pdf"]
    assert (seen["html"] / seen["context"]["html"]["book_pdf"]).is_file(), "the link points at the PDF written"
    seen = fake_book_build(tmp_path / "without", monkeypatch, pdf=False)
    assert list(seen["context"]) == ["html"] and "book_pdf" not in seen["context"]["html"]
    assert seen["pdf"] is None and not (seen["html"] / pipeline.BOOK_PDF).exists()


PROOF_PAGE = """{title}
=====

.. prf:{kind}:: {name}
   :label: {label}

   Some text.
"""


def test_proof_index_titles_follow_edits_and_removals(tmp_path):
    """The book's extension keeps one (page, kind, title) per proof label: on an incremental rebuild an
    edited page's old labels are gone, other pages' stay, and a removed page takes its labels with it."""
    from sphinx.application import Sphinx
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(pipeline.BOOK_DIR / '_ext')!r})\n"
        "extensions = ['sphinx_proof', 'cgm_book']\nexclude_patterns = ['_build']\n")
    (src / "index.rst").write_text("Index\n=====\n\n.. toctree::\n   :glob:\n\n   *\n")

    def page(doc, kind, name, label):
        (src / f"{doc}.rst").write_text(PROOF_PAGE.format(title=doc, kind=kind, name=name, label=label))

    def build():
        app = Sphinx(src, src, tmp_path / "out", tmp_path / "doctrees", "html", status=None, warning=None,
                     freshenv=False)
        app.build()
        return app.env.cgm_proof_titles

    page("a", "proposition", "First", "prop-first")
    page("b", "remark", "Kept", "rem-kept")
    assert build() == {"prop-first": ("a", "proposition", "First"), "rem-kept": ("b", "remark", "Kept")}
    page("a", "proposition", "Second", "prop-second")
    assert build() == {"prop-second": ("a", "proposition", "Second"), "rem-kept": ("b", "remark", "Kept")}
    index = (tmp_path / "out" / "prf-prf.html").read_text(encoding="utf-8")
    assert "Proposition: Second" in index and "Remark: Kept" in index and "First" not in index
    (src / "b.rst").unlink()
    assert build() == {"prop-second": ("a", "proposition", "Second")}
