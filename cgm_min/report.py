"""Small helpers every notebook uses: presets, metrics.json, figures in one style.

A notebook's `parameters` cell sets PRESET, SEED and OUT_DIR; it then calls `choose_preset` with its own
table of presets, writes its numbers with `write_metrics` and its figures with `save_figure` (PNG for the
page, SVG and PDF for slides, named fig-<chapter>-<what>).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

# One colour per role, used by every figure in the book.
COLORS = {
    "pt": "#1f77b4",        # pre-trained / pre-training loss (blue, as in the paper's Fig. 2)
    "ft": "#ff7f0e",        # fine-tuned / fine-tuning loss (orange)
    "cgm": "#2ca02c",       # CGM soft mixing
    "cgm_dagger": "#d62728",  # CGM-dagger hard mixing
    "linear": "#7f7f7f",    # straight interpolation
    "magnitude": "#9467bd",
    "exact": "#000000",
}


# One colour and one marker per merge method (variant), used by every figure of the merge experiment.
METHOD_STYLE = {
    "pre_trained": (COLORS["pt"], "s"), "fine_tuned": (COLORS["ft"], "s"),
    "linear": (COLORS["linear"], "o"), "task_arithmetic": ("#8c8c8c", "o"),
    "ties": ("#17becf", "v"), "dare": ("#bcbd22", "^"),
    "magnitude": (COLORS["magnitude"], "D"), "random_revert": ("#000000", "x"),
    "wanda": ("#e377c2", "P"), "model_tailor": ("#8c564b", "*"), "grafting": ("#aec7e8", "h"),
    "fisher_merging": ("#98df8a", "o"),
    "cgm": (COLORS["cgm"], "o"), "cgm_dagger": (COLORS["cgm_dagger"], "o"),
    "cgm_dagger (global)": ("#ff9896", "o"),
    "score: h_ft delta^2": ("#c5b0d5", "<"), "score: -h_pt delta^2": ("#c49c94", ">"),
}


def method_style(variant: str) -> tuple[str, str]:
    """(colour, marker) of a method variant; unknown variants get grey circles."""
    return METHOD_STYLE.get(variant, ("#7f7f7f", "o"))


def choose_preset(name: str, presets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The settings of preset `name`, or a ValueError that lists the presets this notebook knows."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; this notebook knows {sorted(presets)}")
    return dict(presets[name])


def _plain(x: Any) -> Any:
    """numpy / torch scalars and arrays -> JSON values; NaN and Inf are refused (they hide bugs)."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"metrics must be finite numbers, got {x}")
    return x


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp)` with a temporary file name next to `path`, then rename it to `path`: a crash or an
    error never leaves `path` half written, and the temporary file is always removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())        # as open() would create it (mkstemp makes it private)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the finished folder `new` in the place of `final` (both on one file system): an existing `final`
    is renamed aside, `new` renamed in, the old one removed; if the second rename fails the old one is put
    back. `final` is never half written and never missing while it is replaced."""
    new, final = Path(new), Path(final)
    if not (final.exists() or final.is_symlink()):
        new.rename(final)
        return final
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    old.rmdir()
    final.rename(old)
    try:
        new.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_metrics(out_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write OUT_DIR/metrics.json atomically (a crash never leaves half a file)."""
    path = Path(out_dir) / "metrics.json"
    text = json.dumps(_plain(metrics), indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def read_metrics(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {out_dir}: run the notebook first")
    return json.loads(path.read_text())


def set_style() -> None:
    """The book's plotting style: seaborn's whitegrid, readable font sizes, tight layout."""
    import matplotlib
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook", font_scale=1.0)
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "axes.titleweight": "bold",
                                "figure.autolayout": True, "legend.frameon": True})


# Figure names: fig-<chapter>-<what>, chapter one of these (the lab notebook is "lab").
FIGURE_CHAPTERS = ("toy", "hard", "curv", "mini", "merge", "paper", "lab")
FIGURE_NAME = re.compile(r"fig-(%s)-[a-z0-9]+(-[a-z0-9]+)*" % "|".join(FIGURE_CHAPTERS))
SLIDE_FORMATS = ("svg", "pdf")


def check_figure_name(name: str) -> str:
    """`name` if it follows the book's scheme fig-<chapter>-<what> (lower case, words joined by '-'), else a
    ValueError that says what is wrong."""
    if not FIGURE_NAME.fullmatch(name):
        raise ValueError(f"figure name {name!r} does not follow fig-<chapter>-<what> with chapter in "
                         f"{list(FIGURE_CHAPTERS)} and <what> lower-case words joined by '-'")
    return name


def save_figure(fig, out_dir: str | os.PathLike, name: str, *, slides: tuple[str, ...] = SLIDE_FORMATS) -> Path:
    """Save a matplotlib figure as OUT_DIR/<name>.png for the page and, for slides, as vector files
    OUT_DIR/<name>.svg and OUT_DIR/<name>.pdf (`slides=()` writes the PNG alone). Returns the PNG's path.

    `name` follows fig-<chapter>-<what>, or nothing is written and a ValueError says what is wrong (see
    `check_figure_name`); the build collects every chapter's vector files into one slide folder. Each file
    is written atomically, and the vector files carry no date, so a rerun with the same numbers writes the
    same bytes.
    """
    check_figure_name(name)
    unknown = sorted(set(slides) - set(SLIDE_FORMATS))
    if unknown:
        raise ValueError(f"unknown slide formats {unknown}; choose from {list(SLIDE_FORMATS)}")
    import matplotlib
    out_dir = Path(out_dir)
    path = atomic_write(out_dir / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    no_date = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}}
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "path", "pdf.fonttype": 42}):
        for fmt in slides:
            atomic_write(out_dir / f"{name}.{fmt}", lambda tmp, fmt=fmt: fig.savefig(
                tmp, format=fmt, bbox_inches="tight", metadata=no_date[fmt]))
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
