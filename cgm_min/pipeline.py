"""Execute the notebooks with papermill and build the book from the executed copies.

    python -m cgm_min.pipeline notebooks --preset cpu [--only 01_toy_quadratics] [--out build]
    python -m cgm_min.pipeline book [--out build]
    python -m cgm_min.pipeline all --preset cpu [--out build]

Layout under --out (default `build/`):
    executed/<name>.ipynb         the executed notebook (what the book shows)
    results/<name>/metrics.json   its numbers, and its figures as PNG
    cache/                        fine-tuned runs, curvature and merge sweeps, keyed by their settings
                                  (shared by the notebooks; a warm cache skips training)
    html/                         the built book (open html/index.html)

Every file is written to a temporary name first and renamed when complete, so an interrupted run never
leaves a half-written notebook or book behind; a rerun replaces the previous outputs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
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


def execute_notebook(name: str, preset: str, out: Path, seed: int = 0, timeout: int = 3600, workers: int = 2
                     ) -> Path:
    """Run notebooks/<name>.md with papermill at `preset`; returns the executed notebook's path.

    The kernel runs in `out`, and OUT_DIR is the relative path results/<name> (CACHE_DIR the relative path
    cache), so executed notebooks name no machine paths. WORKERS is how many single-thread processes a
    notebook may run side by side.
    """
    import jupytext
    import papermill

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    src = NOTEBOOK_DIR / f"{name}.md"
    if not src.is_file():
        raise FileNotFoundError(f"no notebook {src.name} in notebooks/ (known: {notebook_names()})")
    out = Path(out).resolve()
    (out / "executed").mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    target = out / "executed" / f"{name}.ipynb"
    # The kernel "python3" must be this interpreter's, not one a user registered elsewhere; and a
    # non-interactive MPLBACKEND (e.g. Agg) would stop the kernel from putting figures in the notebook.
    os.environ.pop("MPLBACKEND", None)
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(Path(sys.prefix) / "share" / "jupyter"),
                                                  os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        plain = Path(tmp) / f"{name}.ipynb"
        jupytext.write(jupytext.read(src), plain)
        done = Path(tmp) / f"{name}.executed.ipynb"
        offered = {"PRESET": preset, "SEED": seed, "OUT_DIR": f"results/{name}", "CACHE_DIR": "cache",
                   "WORKERS": workers}
        declared = papermill.inspect_notebook(str(plain))          # the names in its `parameters` cell
        papermill.execute_notebook(
            str(plain), str(done), kernel_name="python3", cwd=str(out), execution_timeout=timeout,
            parameters={k: v for k, v in offered.items() if k in declared}, progress_bar=False,
        )
        strip_stderr(done)
        os.replace(done, target)
    return target


def strip_stderr(executed: Path) -> None:
    """Remove every stderr stream (progress bars, library warnings) from an executed notebook, in place: the
    book and the notebooks it serves show results, not progress. Errors are kept (they are not streams)."""
    import nbformat
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if not (o.output_type == "stream" and o.name == "stderr")]
    nbformat.write(nb, executed)


def execute_all(preset: str, out: Path, only: list[str] | None = None, seed: int = 0, workers: int = 2) -> list[Path]:
    names = only or notebook_names()
    unknown = sorted(set(names) - set(notebook_names()))
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; known: {notebook_names()}")
    from tqdm.auto import tqdm
    paths = []
    for name in tqdm(names, desc=f"notebooks ({preset})", unit="notebook"):
        paths.append(execute_notebook(name, preset, out, seed, workers=workers))
    return paths


def figures_without_image(executed_notebook: Path) -> list[str]:
    """Names of the labelled figure cells (mystnb.figure.name) of an executed notebook with no PNG output."""
    import nbformat
    nb = nbformat.read(executed_notebook, as_version=4)
    return [c.metadata["mystnb"]["figure"].get("name", "?") for c in nb.cells
            if c.cell_type == "code" and "figure" in c.metadata.get("mystnb", {})
            and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def build_book(out: Path) -> Path:
    """Build the Jupyter Book (offline, warnings are errors) from book/ plus out/executed/*.ipynb.

    The sources are staged in a temporary folder so the repository is never written to; the finished
    HTML replaces out/html in one rename.
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
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        stage = Path(tmp) / "book"
        shutil.copytree(BOOK_DIR, stage, ignore=shutil.ignore_patterns("_build"))
        shutil.copytree(ROOT / "cgm_min", stage / "_code" / "cgm_min", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(executed, stage / "notebooks")
        cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(stage), "-W", "-n", "--keep-going"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
            raise RuntimeError(f"book build failed (exit {proc.returncode}); the previous book in {out / 'html'} "
                               "was left as it was")
        html = out / "html"
        old = out / ".html.old"
        shutil.rmtree(old, ignore_errors=True)
        if html.exists():
            html.rename(old)
        shutil.move(str(stage / "_build" / "html"), html)
        shutil.rmtree(old, ignore_errors=True)
    return html


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cgm_min.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["notebooks", "book", "all"])
    ap.add_argument("--preset", default="cpu", choices=PRESETS,
                    help="tiny = CI smoke size, cpu = the default CPU run, paper = GPU with real checkpoints")
    ap.add_argument("--out", default=str(ROOT / "build"), help="output folder (default: build/)")
    ap.add_argument("--only", nargs="*", help="notebook names to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="single-thread processes side by side (default 2)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.what in ("notebooks", "all"):
        for p in execute_all(args.preset, out, args.only, args.seed, args.workers):
            print(f"executed {p.relative_to(out.resolve().parent) if p.is_relative_to(out.resolve().parent) else p}")
    if args.what in ("book", "all"):
        html = build_book(out)
        print(f"book built: open {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
