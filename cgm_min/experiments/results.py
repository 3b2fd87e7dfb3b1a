"""The results table of the merge experiment, and the statistics computed from it.

One row per (run, curvature kind, method variant, hyperparameters, split). The miniature sweeps, the figure
chapter and a GPU run at the paper's scale write and read the same schema:

    run settings   family, size, target, seed, steps, lr, n_layers, regime, curvature, run
    the merge      method (registry name), variant (method + its non-swept flags, e.g. "cgm_dagger
                   (global)"), hyperparameters (canonical JSON), k, alpha, alpha_norm, scale_ratio
    the split      split ("validation": every grid point; "heldout": the validation-selected points and the
                   endpoints; "heldout_lmms": the same re-scored through lmms-eval), n_per_task
    scores         task:<name> (one column per task, in [0, 1]), pre_avg, target_score, hscore (Eq. 15),
                   avg (Eq. 14) -- all from evaluate.scores
    losses         loss_pt (mean answer loss on the general tasks), loss_ft (on the target), quad_pt and
                   quad_ft (the diagonal quadratic model's prediction of their increase: 1/2 sum h (w - w*)^2)
    bookkeeping    selected (chosen on validation), control ("" or "negative: seed N", "positive"),
                   seconds (merge + scoring), exact_bits (held-out rows: per-sample exact match, for the
                   paired bootstrap)

`check_schema` refuses a table with a missing column or bad values with one line naming it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..evaluate import scores as sc

RUN_COLUMNS = ["family", "size", "target", "seed", "steps", "lr", "n_layers", "regime", "curvature", "run"]
MERGE_COLUMNS = ["method", "variant", "hyperparameters", "k", "alpha", "alpha_norm", "scale_ratio"]
SCORE_COLUMNS = ["split", "n_per_task", "pre_avg", "target_score", "hscore", "avg", "loss_pt", "loss_ft",
                 "quad_pt", "quad_ft", "selected", "control", "seconds"]
COLUMNS = RUN_COLUMNS + MERGE_COLUMNS + SCORE_COLUMNS
OPTIONAL = ["exact_bits"]
SPLITS = ("validation", "heldout", "heldout_lmms")
TASK_PREFIX = "task:"


def task_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(TASK_PREFIX)]


def check_schema(df: pd.DataFrame, where: str = "results table") -> pd.DataFrame:
    """The table itself, or a ValueError naming the first missing column or bad value."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column {missing[0]!r} (a results table needs {COLUMNS})")
    if not task_columns(df):
        raise ValueError(f"{where}: no per-task score columns ('{TASK_PREFIX}<task>')")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{where}: unknown split {bad[0]!r}; known: {list(SPLITS)}")
    for c in ["pre_avg", "target_score", "hscore", "avg"] + task_columns(df):
        v = pd.to_numeric(df[c], errors="coerce")
        # a task column is empty on rows of runs that did not evaluate that task (another target)
        if (c in task_columns(df) and (v.isna() & df[c].notna()).any()) or (c not in task_columns(df) and v.isna().any()) \
                or ((v < 0) | (v > 1)).any():
            raise ValueError(f"{where}: column {c!r} must hold scores in [0, 1]")
    for t in set(df["target"]):
        col = f"{TASK_PREFIX}{t}"
        if col not in df.columns or df.loc[df["target"] == t, col].isna().any():
            raise ValueError(f"{where}: rows with target {t!r} need its score in column {col!r}")
    return df


def summary_row(task_scores: Mapping[str, float], target: str, general: Sequence[str]) -> dict:
    """The score columns of one row: task:<name> for every task, and the paper's summaries."""
    s = sc.summarise(task_scores, target, general)
    return {**{f"{TASK_PREFIX}{t}": float(task_scores[t]) for t in [*general, target]},
            "pre_avg": s["pre_avg"], "target_score": s["target"], "hscore": s["hscore"], "avg": s["avg"]}


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    from ..report import atomic_write
    check_schema(df, str(path))
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def read_table(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One results table from one or several parquet files (checked)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no results files to read")
    frames = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"no results file {p}")
        try:
            frame = pd.read_parquet(p)
        except Exception as err:          # pyarrow's own error types; the message says what is wrong
            raise ValueError(f"{p} is not a readable Parquet results table ({' '.join(str(err).split())[:160]})") from None
        frames.append(check_schema(frame, str(p)))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Selection on validation, reporting on held-out.

GROUP = ["family", "size", "target", "seed", "steps", "lr", "n_layers", "curvature"]


def select_on_validation(val: pd.DataFrame, metric: str = "hscore") -> pd.DataFrame:
    """Per run, curvature kind, control and method variant: the validation row with the best `metric`
    (ties: the first in grid order)."""
    val = val[val["split"] == "validation"]
    idx = val.groupby(GROUP + ["control", "variant"], dropna=False, sort=False)[metric].idxmax()
    return val.loc[idx.values]


def heldout_table(df: pd.DataFrame, split: str = "heldout", control: str = "") -> pd.DataFrame:
    """The held-out rows of the validation-selected configurations (one per run and variant)."""
    return df[(df["split"] == split) & (df["control"] == control)]


# ----------------------------------------------------------------------------------------------
# Paired differences with a bootstrap over held-out samples and the spread over seeds.

def _bits(row) -> dict[str, np.ndarray]:
    return {t: np.frombuffer(b.encode(), np.uint8) - ord("0") for t, b in json.loads(row["exact_bits"]).items()}


def _hscore_of_bits(bits: Mapping[str, np.ndarray], idx: Mapping[str, np.ndarray], target: str,
                    general: Sequence[str]) -> float:
    return sc.summarise({t: float(bits[t][idx[t]].mean()) for t in bits}, target, general)["hscore"]


def paired_difference(df: pd.DataFrame, variant: str, against: str, n_boot: int = 2000, seed: int = 0,
                      control: str = "") -> dict:
    """Held-out Hscore of `variant` minus `against` on the same runs (same family, target, settings; one
    difference per fine-tuning seed), with a 95% bootstrap interval that resamples the held-out samples
    within each task (the same samples for both methods: a paired bootstrap) and the seeds."""
    h = heldout_table(df, control=control)
    a = h[h["variant"] == variant].set_index("seed")
    b = h[h["variant"] == against].set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        raise ValueError(f"no common held-out runs of {variant!r} and {against!r}")
    target = a["target"].iloc[0]
    general = [c[len(TASK_PREFIX):] for c in task_columns(h) if c != f"{TASK_PREFIX}{target}"
               and not a[c].isna().any()]
    per_seed = [float(a.loc[s, "hscore"] - b.loc[s, "hscore"]) for s in seeds]
    rng = np.random.default_rng(seed)
    bits = {s: (_bits(a.loc[s]), _bits(b.loc[s])) for s in seeds}
    boots = np.empty(n_boot)
    for i in range(n_boot):
        chosen = rng.choice(seeds, size=len(seeds), replace=True)
        diffs = []
        for s in chosen:
            ba, bb = bits[s]
            idx = {t: rng.integers(0, len(v), len(v)) for t, v in ba.items()}
            diffs.append(_hscore_of_bits(ba, idx, target, general) - _hscore_of_bits(bb, idx, target, general))
        boots[i] = np.mean(diffs)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"variant": variant, "against": against, "n_seeds": len(seeds), "mean": float(np.mean(per_seed)),
            "std": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else float("nan"),
            "per_seed": per_seed, "ci_low": float(lo), "ci_high": float(hi)}


# ----------------------------------------------------------------------------------------------
# The selection-free comparison: the area each method's front dominates.

def front_area(points: Iterable[tuple[float, float]]) -> float:
    """Area of the part of [0, 1]^2 dominated by the points (target, pre_avg): the union of the rectangles
    [0, t] x [0, p]. Larger is better; it needs no hyperparameter choice."""
    pts = sorted(set(points), key=lambda q: -q[0])       # by target, descending
    area, best_p, prev_t = 0.0, 0.0, None
    for t, p in pts:
        if prev_t is not None:
            area += (prev_t - t) * best_p
        best_p = max(best_p, p)
        prev_t = t
    if prev_t is not None:
        area += prev_t * best_p
    return area


def front_areas(df: pd.DataFrame, split: str = "validation", control: str = "") -> pd.DataFrame:
    """Per run and variant, the area dominated by its grid points plus the two endpoints (every method
    reaches w_pt and w_ft at the ends of its grid)."""
    rows = []
    d = df[(df["split"] == split) & (df["control"] == control)]
    for key, run in d.groupby(GROUP, dropna=False, sort=False):
        ends = run[run["method"].isin(["pre_trained", "fine_tuned"])][["target_score", "pre_avg"]]
        ends = [tuple(x) for x in ends.to_numpy()]
        for variant, g in run.groupby("variant", sort=False):
            if variant in ("pre_trained", "fine_tuned"):
                continue
            pts = [tuple(x) for x in g[["target_score", "pre_avg"]].to_numpy()] + ends
            rows.append({**dict(zip(GROUP, key)), "variant": variant, "area": front_area(pts), "points": len(g)})
    return pd.DataFrame(rows)
