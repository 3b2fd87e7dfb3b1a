"""Execute the notebooks with papermill and build the book from the executed copies.

    python -m cgm_min.pipeline notebooks --preset cpu [--only 01_toy_quadratics] [--out build]
    python -m cgm_min.pipeline book [--out build] [--no-pdf]
    python -m cgm_min.pipeline all --preset cpu [--out build]
    python -m cgm_min.pipeline lab [--out build]      the students' lab notebook, and its solution run

Layout under --out (default `build/`):
    executed/<name>.ipynb         the executed notebook (what the book shows)
    results/<name>/metrics.json   its numbers, and its figures: fig-<chapter>-<what>.png for the page,
                                  .svg and .pdf for slides
    cache/                        fine-tuned runs, curvature and merge sweeps, keyed by their settings
                                  (shared by the notebooks; a warm cache skips training)
    slides/                       every chapter's vector figures in one folder, and all of them zipped
    html/                         the built book (open html/index.html), with the whole book as one PDF
                                  (html/cgm-book.pdf, printed by headless Chromium)

Every file is written to a temporary name first and renamed when complete, so an interrupted run never
leaves a half-written notebook or book behind; a rerun replaces the previous outputs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
BOOK_DIR = ROOT / "book"
PRESETS = ("tiny", "cpu", "paper")


def load_data_script(name: str):
    """Import `data_scripts/<name>.py` as a module (the folder is a set of scripts, not a package), e.g.
    `load_data_script("build_mini_data").build(out)`."""
    import importlib.util
    path = ROOT / "data_scripts" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no data script {path.name} in data_scripts/")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook_names() -> list[str]:
    """The notebooks in book order (their file names start with a two-digit number)."""
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.md"))


def _kernel_environment() -> None:
    """The kernel "python3" must be this interpreter's, not one a user registered elsewhere; and a
    non-interactive MPLBACKEND (e.g. Agg) would stop the kernel from putting figures in the notebook."""
    os.environ.pop("MPLBACKEND", None)
    prefix = str(Path(sys.prefix) / "share" / "jupyter")
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if prefix not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([prefix] + [p for p in paths if p])


class NotebookError(RuntimeError):
    """A notebook stopped with an exception: one line, the notebook, the cell and the exception's own line.
    The papermill error (with the traceback) is its __cause__."""


def execute_notebook(name: str, preset: str, out: Path, seed: int = 0, timeout: int = 3600, workers: int = 2,
                     params: dict | None = None) -> Path:
    """Run notebooks/<name>.md with papermill at `preset`; returns the executed notebook's path.

    The kernel runs in `out`, and OUT_DIR is the relative path results/<name> (CACHE_DIR the relative path
    cache), so executed notebooks name no machine paths. WORKERS is how many single-thread processes a
    notebook may run side by side. `params` are further parameters, passed where the notebook declares them
    (e.g. the paper-scale chapter's RECIPES and RUNS_DIR). A failing cell raises NotebookError.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    src = NOTEBOOK_DIR / f"{name}.md"
    if not src.is_file():
        raise FileNotFoundError(f"no notebook {src.name} in notebooks/ (known: {notebook_names()})")
    out = Path(out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    offered = {"PRESET": preset, "SEED": seed, "OUT_DIR": f"results/{name}", "CACHE_DIR": "cache",
               "WORKERS": workers, **(params or {})}
    import papermill
    try:
        return _papermill(src, out / "executed" / f"{name}.ipynb", out, offered, timeout)
    except papermill.PapermillExecutionError as err:
        raise NotebookError(f"{name}: cell {err.exec_count} stopped with {err.ename}: {err.evalue}") from err


def _papermill(src: Path, target: Path, out: Path, offered: dict, timeout: int) -> Path:
    """Run the MyST notebook `src` with papermill, the kernel in `out`, passing the parameters of `offered`
    that its `parameters` cell declares; the executed notebook is cleaned (`clean_executed`) and renamed to
    `target` when complete."""
    import jupytext
    import papermill
    target.parent.mkdir(parents=True, exist_ok=True)
    _kernel_environment()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        plain = Path(tmp) / f"{src.stem}.ipynb"
        jupytext.write(jupytext.read(src), plain)
        done = Path(tmp) / f"{src.stem}.executed.ipynb"
        declared = papermill.inspect_notebook(str(plain))          # the names in its `parameters` cell
        papermill.execute_notebook(
            str(plain), str(done), kernel_name="python3", cwd=str(out), execution_timeout=timeout,
            parameters={k: v for k, v in offered.items() if k in declared}, progress_bar=False,
        )
        clean_executed(done, out)
        os.replace(done, target)
    return target


# What a terminal would hide: ANSI colour codes, and everything before a carriage return on its line.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _machine_path_pattern() -> re.Pattern:
    """Absolute paths that belong to a build machine: under the folder holding this repository, the
    temporary folder, the user's home, or the usual roots of home and temporary folders elsewhere."""
    here = {str(ROOT.parent if ROOT.parent != ROOT.parent.parent else ROOT), tempfile.gettempdir(),
            str(Path.home())}
    prefixes = {p.rstrip("/") for p in here if p.rstrip("/")} | {"/home", "/Users", "/private", "/var/folders"}
    alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])(?:{alternatives})/[^\s'\",;<>)\]]*")


_MACHINE_PATH = _machine_path_pattern()


def _last_frame(text: str) -> str:
    """A progress bar redraws its line after '\\r': keep what a terminal would show last on each line."""
    text = _ANSI.sub("", text)
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n"))


def _without_prefixes(text: str, prefixes: list[str]) -> str:
    """`text` with the absolute folders in `prefixes` made relative (run folder, repository, interpreter)."""
    for prefix in prefixes:
        text = text.replace(prefix.rstrip("/") + "/", "")
    return text


def _merge_parameters(nb) -> None:
    """Show the parameters once: the source's `parameters` cell (its comments and tags) with the values
    papermill injected, and no separate injected cell. A line `NAME = ...` of a parameter that was passed
    gets the passed value (an inline comment after two spaces is kept)."""
    cells = nb.cells
    orig = next((c for c in cells if "parameters" in c.metadata.get("tags", [])), None)
    injected = next((c for c in cells if "injected-parameters" in c.metadata.get("tags", [])), None)
    if injected is None:
        return
    if orig is None:      # nothing to merge with: keep the injected cell, tagged as the parameters
        injected.metadata["tags"] = ["parameters" if t == "injected-parameters" else t
                                     for t in injected.metadata["tags"]]
        return
    from papermill.translators import PythonTranslator
    values = dict(nb.metadata.get("papermill", {}).get("parameters", {}))
    lines = []
    for line in orig.source.splitlines():
        m = re.match(r"([A-Za-z_]\w*)\s*=", line)
        if m and m.group(1) in values:
            name = m.group(1)
            comment = line[line.index("  #"):] if "  #" in line else ""
            line = f"{name} = {PythonTranslator.translate(values.pop(name))}{comment}"
        lines.append(line)
    lines += [f"{name} = {PythonTranslator.translate(v)}" for name, v in values.items()]
    orig.source = "\n".join(lines)
    cells.remove(injected)


def clean_executed(executed: Path, run_dir: Path | None = None) -> None:
    """Make an executed notebook fit to show and to download, in place (written atomically):

    - the parameters shown once (`_merge_parameters`);
    - no stderr streams (progress bars, library warnings); errors are kept (they are not streams);
    - stdout as a terminal would show it last (no carriage-return redraws, no ANSI codes);
    - no machine paths: the run folder, the repository and the interpreter's prefix become relative, and
      papermill's input/output paths and per-cell timings are dropped from the metadata.
    """
    import nbformat
    nb = nbformat.read(executed, as_version=4)
    _merge_parameters(nb)
    folders = {str(Path(p).resolve()) for p in (run_dir or executed.parent, ROOT, sys.prefix)}
    prefixes = sorted(folders, key=len, reverse=True)      # the longest first: /a/b/run before /a/b
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                if o.name == "stderr":
                    continue
                o.text = _without_prefixes(_last_frame(o.text), prefixes)
                if not o.text.strip():
                    continue
            elif o.output_type in ("execute_result", "display_data"):
                for mime, value in o.get("data", {}).items():
                    if mime.startswith("text/") or mime in ("application/json",):
                        if isinstance(value, str):
                            o.data[mime] = _without_prefixes(value, prefixes)
            elif o.output_type == "error":
                o.traceback = [_without_prefixes(t, prefixes) for t in o.traceback]
            outputs.append(o)
        cell.outputs = outputs
    pm = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path", "environment_variables"):
        pm.pop(key, None)
    from .report import atomic_write
    atomic_write(executed, lambda tmp: nbformat.write(nb, tmp))


def machine_paths(text: str) -> list[str]:
    """Absolute paths of a build machine found in `text` (see `_machine_path_pattern`): none may reach
    the book or the notebooks it serves."""
    return _MACHINE_PATH.findall(text)


def declared_parameters(name: str) -> list[str]:
    """The names in the `parameters` cell of notebooks/<name>.md, as papermill reads them (the same
    inspection `_papermill` uses to pick the parameters it passes)."""
    import jupytext
    import papermill
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / f"{name}.ipynb"
        jupytext.write(jupytext.read(NOTEBOOK_DIR / f"{name}.md"), plain)
        return list(papermill.inspect_notebook(str(plain)))


def execute_all(preset: str, out: Path, only: list[str] | None = None, seed: int = 0, workers: int = 2,
                params: dict | None = None) -> list[Path]:
    names = only or notebook_names()
    unknown = sorted(set(names) - set(notebook_names()))
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; known: {notebook_names()}")
    declared = {p for name in names for p in declared_parameters(name)}
    undeclared = sorted(set(params or {}) - declared)
    if undeclared:
        raise ValueError(f"no notebook of {names} has a parameter {undeclared[0]!r}")
    from tqdm.auto import tqdm
    paths = []
    for name in tqdm(names, desc=f"notebooks ({preset})", unit="notebook"):
        paths.append(execute_notebook(name, preset, out, seed, workers=workers, params=params))
    return paths


def figures_without_image(executed_notebook: Path) -> list[str]:
    """Names of the labelled figure cells (mystnb.figure.name) of an executed notebook with no PNG output."""
    import nbformat
    nb = nbformat.read(executed_notebook, as_version=4)
    return [c.metadata["mystnb"]["figure"].get("name", "?") for c in nb.cells
            if c.cell_type == "code" and "figure" in c.metadata.get("mystnb", {})
            and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


# The course lab: one source, the solution (notebooks/lab/lab_cgm_solution.md, never shown in the book);
# the students' notebook is made from it by replacing each solution block with a blank.
LAB_DIR = NOTEBOOK_DIR / "lab"
LAB_SOLUTION = LAB_DIR / "lab_cgm_solution.md"
LAB_NAME = "lab_cgm"
_SOLUTION_CODE = re.compile(r"^([ \t]*)# BEGIN SOLUTION\n.*?^[ \t]*# END SOLUTION[ \t]*(?:\n|\Z)", re.S | re.M)
_SOLUTION_TEXT = re.compile(r"<!-- BEGIN SOLUTION -->.*?<!-- END SOLUTION -->", re.S)


def student_lab(solution: Path = LAB_SOLUTION):
    """The students' notebook (an nbformat notebook, not executed) made from the solution: in code cells a
    block between `# BEGIN SOLUTION` and `# END SOLUTION` becomes `# YOUR CODE HERE` and
    `raise NotImplementedError` at the block's indentation; in Markdown cells a block between
    `<!-- BEGIN SOLUTION -->` and `<!-- END SOLUTION -->` becomes a prompt for the answer."""
    import jupytext
    nb = jupytext.read(solution)
    blanks = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source, n = _SOLUTION_CODE.subn(
                lambda m: f"{m.group(1)}# YOUR CODE HERE\n{m.group(1)}raise NotImplementedError\n", cell.source)
        else:
            cell.source, n = _SOLUTION_TEXT.subn("*Your answer here.*", cell.source)
        blanks += n
        if "BEGIN SOLUTION" in cell.source or "END SOLUTION" in cell.source:
            raise ValueError(f"{Path(solution).name}: an unmatched BEGIN/END SOLUTION marker in a "
                             f"{cell.cell_type} cell")
    if blanks == 0:
        raise ValueError(f"{Path(solution).name}: no `# BEGIN SOLUTION` blocks, the lab would have no blanks")
    nb.metadata.pop("jupytext", None)
    return nb


def execute_lab(out: Path, preset: str = "tiny", seed: int = 0, timeout: int = 600) -> Path:
    """Run the lab's solution with papermill (the kernel in `out`, figures in out/results/lab_cgm); returns
    out/lab/lab_cgm_solution.ipynb. Any failing check stops the run with papermill's error."""
    out = Path(out).resolve()
    offered = {"PRESET": preset, "SEED": seed, "OUT_DIR": f"results/{LAB_NAME}"}
    return _papermill(LAB_SOLUTION, out / "lab" / f"{LAB_SOLUTION.stem}.ipynb", out, offered, timeout)


def find_chromium() -> str | None:
    """The headless Chromium that prints the PDF and runs the browser test: $CGM_CHROMIUM, else `chromium`
    (Debian's package) or `chromium-browser` on the PATH."""
    return os.environ.get("CGM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# Headless Chromium kept offline: no GPU, no first-run or background fetches (updates, sync, QUIC probes).
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


@contextmanager
def offline_chromium(chromium: str):
    """Headless Chromium at `chromium` (see `find_chromium`) under playwright, launched with CHROMIUM_ARGS;
    yields the browser and closes it on exit. Open its pages with `offline_page`. Used by `print_pdf` and
    by the book's browser tests."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def offline_page(browser, refused: list[str] | None = None, **options):
    """A new page of `browser` (playwright's `new_page(**options)`) on which every request that is not a
    local file is refused; the refused URLs are appended to `refused` when it is given."""
    page = browser.new_page(**options)

    def local_only(route):
        if route.request.url.startswith("file:"):
            route.continue_()
            return
        if refused is not None:
            refused.append(route.request.url)
        route.abort()

    page.route("**/*", local_only)
    return page


def collect_slides(out: Path) -> Path:
    """Gather every chapter's vector figures (results/<notebook>/fig-*.svg and .pdf, written by
    `report.save_figure`) into one flat folder out/slides/, with a zip of them all; returns the folder.

    The folder is replaced as a whole (built next to it, then renamed). Two notebooks saving a figure of
    the same name is an error: a slide set has one figure per name.
    """
    import zipfile

    from .report import FIGURE_NAME, SLIDE_FORMATS, _umask, replace_dir
    out = Path(out).resolve()
    found: dict[str, Path] = {}
    for path in sorted((out / "results").glob("*/fig-*")):
        if path.suffix[1:] in SLIDE_FORMATS and FIGURE_NAME.fullmatch(path.stem):
            if path.name in found:
                raise ValueError(f"two notebooks saved {path.name}: {found[path.name].parent.name} and "
                                 f"{path.parent.name}; figure names must be unique across the book")
            found[path.name] = path
    slides = out / "slides"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".slides."))
    try:
        tmp.chmod(0o777 & ~_umask())                  # as mkdir would make it (mkdtemp's is private)
        for name, path in found.items():
            shutil.copyfile(path, tmp / name)
        with zipfile.ZipFile(tmp / SLIDES_ZIP, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in found:                        # fixed dates: the same figures give the same zip
                info = zipfile.ZipInfo(f"cgm-book-figures/{name}", date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, (tmp / name).read_bytes())
        replace_dir(tmp, slides)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return slides


SLIDES_ZIP = "cgm-book-figures.zip"
BOOK_PDF = "cgm-book.pdf"


def _slides_page(slides: Path) -> str:
    """The figure list the teaching page includes: one row per figure, its chapter and its vector files."""
    from .report import FIGURE_NAME
    names = sorted({p.stem for p in slides.iterdir() if FIGURE_NAME.fullmatch(p.stem)})
    if not names:
        return "No figures were saved in this build.\n"
    chapter = {n: n.split("-")[1] for n in names}
    rows = [f"| `{n}` | {chapter[n]} | " + " ".join(
        f"{{download}}`{fmt.upper()} <slides/{n}.{fmt}>`" for fmt in ("svg", "pdf")
        if (slides / f"{n}.{fmt}").is_file()) + " |" for n in names]
    return (f"All {len(names)} figures in one file: {{download}}`{SLIDES_ZIP} <slides/{SLIDES_ZIP}>`.\n\n"
            "| figure | chapter | vector files |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def _run_jupyter_book(stage: Path, builder: str) -> None:
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(stage), "-W", "-n", "--keep-going",
           "--builder", builder]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise RuntimeError(f"book build ({builder}) failed (exit {proc.returncode}); the previous book was "
                           "left as it was")


def print_pdf(html_file: Path, pdf: Path, chromium: str) -> Path:
    """Print one HTML file (the single-page book) to `pdf` with headless Chromium, offline: every request
    that is not a local file is refused (`offline_chromium`, `offline_page`). A4, backgrounds on, the PDF's
    outline from the headings."""
    from .report import atomic_write
    with offline_chromium(chromium) as browser:
        page = offline_page(browser)
        page.goto(Path(html_file).resolve().as_uri(), wait_until="load")
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=60000)
        page.evaluate("() => MathJax.startup.promise")
        page.emulate_media(media="print")
        margin = {"top": "15mm", "bottom": "15mm", "left": "12mm", "right": "12mm"}
        atomic_write(pdf, lambda tmp: page.pdf(path=tmp, format="A4", print_background=True, outline=True,
                                               tagged=True, margin=margin))
    return pdf


def link_pdf(config_file: Path) -> None:
    """Name the whole-book PDF, BOOK_PDF, in the staged book's `_config.yml` as html_context["book_pdf"],
    which the side bar's template (_templates/cgm-book-links.html) links; book/_config.yml does not name it,
    so a book built without the PDF has no link to it."""
    import yaml
    config = yaml.safe_load(Path(config_file).read_text())
    context = config.setdefault("sphinx", {}).setdefault("config", {}).setdefault("html_context", {})
    context["book_pdf"] = BOOK_PDF
    Path(config_file).write_text(yaml.safe_dump(config, sort_keys=False))


def build_book(out: Path, pdf: bool = True) -> Path:
    """Build the Jupyter Book (offline, warnings are errors) from book/ plus out/executed/*.ipynb.

    The executed notebooks come cleaned from `execute_notebook` (`clean_executed`), the chapters' vector figures
    are gathered into out/slides/ (`collect_slides`) and listed on the teaching page, and with `pdf` the
    whole book is printed by headless Chromium from Jupyter Book's single-page build into
    html/cgm-book.pdf, which the side bar of every page links. The sources are staged in a temporary
    folder so the repository is never written to; the finished HTML replaces out/html in one rename.
    """
    out = Path(out).resolve()
    executed = out / "executed"
    missing = [n for n in notebook_names() if not (executed / f"{n}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(f"executed notebooks missing in {executed}: {missing}; "
                                "run `python -m cgm_min.pipeline notebooks` first")
    blank = {n: f for n in notebook_names() if (f := figures_without_image(executed / f"{n}.ipynb"))}
    if blank:
        raise RuntimeError(f"figure cells produced no image: {blank}; was the notebook run with a "
                           "non-interactive MPLBACKEND, or did the cell not call plt.show()?")
    chromium = find_chromium() if pdf else None
    if pdf and chromium is None:
        raise RuntimeError("the whole-book PDF needs headless Chromium (Debian package `chromium`, or set "
                           "CGM_CHROMIUM); install it or build without the PDF (--no-pdf)")
    import nbformat
    import yaml

    from .report import replace_dir
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        stage = Path(tmp) / "book"
        shutil.copytree(BOOK_DIR, stage, ignore=shutil.ignore_patterns("_build", "__pycache__"))
        shutil.copytree(ROOT / "cgm_min", stage / "_code" / "cgm_min", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(executed, stage / "notebooks")
        (stage / "lab").mkdir()
        nbformat.write(student_lab(), stage / "lab" / f"{LAB_NAME}.ipynb")
        slides = collect_slides(out)
        shutil.copytree(slides, stage / "slides")
        (stage / "slides" / "figures.md").write_text(_slides_page(slides))
        if pdf:
            link_pdf(stage / "_config.yml")
        _run_jupyter_book(stage, "html")
        built = stage / "_build" / "html"
        if pdf:
            _run_jupyter_book(stage, "singlehtml")
            root = yaml.safe_load((stage / "_toc.yml").read_text())["root"]
            print_pdf(stage / "_build" / "singlehtml" / f"{root}.html", built / BOOK_PDF, chromium)
        html = replace_dir(built, out / "html")
    return html


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cgm_min.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["notebooks", "book", "all", "lab"])
    ap.add_argument("--preset", default="cpu", choices=PRESETS,
                    help="tiny = CI smoke size, cpu = the default CPU run, paper = GPU with real checkpoints")
    ap.add_argument("--out", default=str(ROOT / "build"), help="output folder (default: build/)")
    ap.add_argument("--only", nargs="*", help="notebook names to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="single-thread processes side by side (default 2)")
    ap.add_argument("--no-pdf", action="store_true", help="build the HTML book without the whole-book PDF "
                    "(made by default when headless Chromium is found)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a further notebook parameter, as a string (e.g. RUNS_DIR=runs); repeatable")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except (RuntimeError, ValueError, FileNotFoundError) as err:       # a failing notebook or build: one line
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2


def _main(args) -> int:
    out = Path(args.out)
    params = {}
    for item in args.param:
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise ValueError(f"--param {item!r}: expected NAME=VALUE with an upper-case NAME")
        params[name] = value
    if args.what in ("notebooks", "all"):
        for p in execute_all(args.preset, out, args.only, args.seed, args.workers, params):
            print(f"executed {p.relative_to(out.resolve().parent) if p.is_relative_to(out.resolve().parent) else p}")
    if args.what in ("book", "all"):
        pdf = not args.no_pdf and find_chromium() is not None
        if not args.no_pdf and not pdf:
            print("warning: no headless Chromium (Debian package `chromium`, or set CGM_CHROMIUM): the book is "
                  "built without its PDF", file=sys.stderr)
        html = build_book(out, pdf=pdf)
        print(f"book built: open {html / 'index.html'}")
    if args.what == "lab":
        import nbformat

        from .report import atomic_write
        student = atomic_write(out / "lab" / f"{LAB_NAME}.ipynb", lambda tmp: nbformat.write(student_lab(), tmp))
        print(f"students' notebook: {student}")
        print(f"solution, run and checked: {execute_lab(out, preset=args.preset, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
