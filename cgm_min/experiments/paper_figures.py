"""The paper's figures and tables (Yang et al. 2026, arXiv 2606.24963: Figs. 1, 3-6, Tables 1-5), each drawn
from a results table, so that the same function draws the paper's reported numbers, the miniature sweeps of
the merge chapter and a GPU run that writes the same schema (`results.py`).

Two sources, one set of functions. Every function that the paper has numbers for takes `source`, either

  * a results table (the schema of `results.py`: one row per run, curvature kind, method variant,
    hyperparameters and split; scores in [0, 1]), or
  * the paper's long table, `paper.load_paper_tables()`, which `as_results` turns into the same schema with
    `paper_results`: one "heldout" row per method of Tables 1-4 (family "llava" / "qwen", size "7B" / "3B",
    regime "paper", seed 0, selected, scores as printed / 100). Two optional columns carry what a results
    table has no place for: `sd:<column>`, the printed "±" (/ 100), and `printed:<column>`, the printed
    cell text (digits as printed), which the tables show instead of re-formatting the number.

and a selection `where` ({column: value}, e.g. {"family": "llava", "target": "corners", "regime": "default",
"curvature": "fisher_during"}) that must name one setting (every seed of one run configuration). Table 5
prints only Hscore and Avg, so `ablation_table` reads the paper's Table 5 rows directly.

Scores are drawn in points (x 100), methods in the paper's order (`MAIN_METHODS`) with the book's colours
and markers (`report.method_style`). From a results table, each method's held-out row at its
validation-chosen hyperparameters is averaged over fine-tuning seeds (bars: mean and standard deviation).

Figs. 5 and 6 have no numbers in the paper: they are computed from merges, either of any checkpoint pair
(`reversion_masks`) or of a results row re-built from the experiment cache (`run_masks`, through
`sweep.rebuild_merge`). A reverted entry is one that holds its pre-trained value after the merge (the
paper's "recovery").

Errors: a results table without a needed column, a selection that matches nothing or more than one
setting, and a method absent from the selection each raise a one-line ValueError naming it.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..report import method_style
from . import paper
from . import results as rs
from .figures import _check_variants, _require, _select

# The methods of Tables 1-4 in the paper's order, and the four scores of Table 5 (results-table variants).
MAIN_METHODS = ("pre_trained", "fine_tuned", "model_tailor", "dare", "grafting", "magnitude", "wanda", "cgm",
                "cgm_dagger")
ENDPOINTS = ("pre_trained", "fine_tuned")
# Table 5's registry names -> the variant names of the merge chapter's sweep (sweep.grid).
ABLATION_VARIANTS = {"magnitude": "magnitude", "score_ft_magnitude": "score: h_ft delta^2",
                     "score_pt_magnitude": "score: -h_pt delta^2", "cgm_dagger": "cgm_dagger"}
ABLATION_SCORES = {"magnitude": "Δ²", "score: h_ft delta^2": "h_ft Δ²", "score: -h_pt delta^2": "−α h_pt Δ²",
                   "cgm_dagger": "(h_ft − α h_pt) Δ²"}
# The paper's printed label of each method (the first label of a registry name in the paper's tables).
LABELS = {m: label for label, m in reversed(list(paper.METHOD_LABELS.items()))}
LABELS.update({ABLATION_VARIANTS[m]: label for label, m in paper.METHOD_LABELS.items()
               if label in ("Fine-tune+Magnitude", "Pre-train+Magnitude")})
FAMILY_OF_BACKBONE = {"LLaVA-1.5-7B": ("llava", "7B"), "Qwen2.5-VL-3B": ("qwen", "3B")}
SUMMARY_COLUMNS = {"pre_avg": "Pre-Avg", "target_score": "Target", "hscore": "Hscore", "avg": "Avg"}
ROLE_COLUMNS = {"pre_avg": "pre_avg", "target": "target_score", "hscore": "hscore", "avg": "avg"}

# What the paper says of Fig. 4 (Qwen2.5-VL-3B on LaTeX-OCR and Flickr30k). The paper gives no curve values,
# only these findings (Sec. 4.4), quoted here so that they can be printed beside our curves.
PAPER_FIG4_FINDINGS = {
    "k": "Paper (Fig. 4, no values given): Pre-Avg is nearly flat in K (even 10% reverted keeps almost all "
         "general knowledge); K mainly controls the target score; Hscore and target are best at K = 10%.",
    "alpha": "Paper (Fig. 4, no values given): across alpha Pre-Avg varies little; alpha mainly drives the "
             "target score and hence Hscore; best at alpha about 0.1-0.15 (the paper's raw alpha).",
}

# The paper's figure or table each claim of regimes.CLAIMS concerns, and the figures of this chapter that
# show it (the verdicts are computed by the merge chapter, not here).
CLAIM_FIGURES = {
    "mitigates": ("Fig. 1, Fig. 3, Tables 1-4", ("fig-paper-bars", "fig-paper-radar")),
    "beats_comparators": ("Fig. 1, Tables 1-4", ("fig-paper-bars",)),
    "beats_interpolation": ("(not in the paper)", ()),
    "score_ablation": ("Table 5", ()),
    "hutchinson": ("Sec. 4 (text only)", ()),
    "k_flat": ("Fig. 4", ("fig-paper-sensitivity", "fig-paper-sensitivity-alpha")),
    "depth": ("(Model-Dowser, not in the paper)", ()),
    "fisher_merging": ("Sec. 3.2", ()),
    "overhead": ("Sec. 4.1 (text only)", ()),
    "bands": ("Figs. 5, 6", ("fig-paper-masks", "fig-paper-recovery")),
}


# ----------------------------------------------------------------------------------------------
# The paper's numbers in the results-table schema.

def is_paper_table(df: pd.DataFrame) -> bool:
    """True for the long table of `paper.load_paper_tables()` (one row per printed cell)."""
    return {"table", "benchmark", "role", "value"} <= set(df.columns)


def _printed(value: float, decimals: int, std: float) -> str:
    """A cell as printed: the value with its printed decimals, and its "±" (the paper prints every non-zero
    standard deviation with two decimals and a zero as "0"; the tests compare with the CSV's text)."""
    text = f"{value:.{decimals}f}"
    return text if np.isnan(std) else f"{text} ± {'0' if std == 0 else f'{std:.2f}'}"


def paper_results(df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tables 1-4 of the paper as a results table: one "heldout" row per (table, method).

    Columns of `results.COLUMNS` (run settings the paper does not give are NaN; `run` names the table),
    `task:<benchmark>` for the table's general tasks and its target (NaN for the other tables' tasks),
    `sd:<column>` (the printed "±" / 100, NaN where none is printed) and `printed:<column>` (the cell as
    printed). Summary scores are the printed ones (Table 1's Magnitude Pre-Avg is its printed 54.0, see
    `paper.mismatches`)."""
    df = paper.load_paper_tables() if df is None else df
    rows = []
    for (table, backbone, target, method), g in df[df["table"] <= 4].groupby(
            ["table", "backbone", "target", "method"], sort=False):
        family, size = FAMILY_OF_BACKBONE[backbone]
        row = {"family": family, "size": size, "target": target, "seed": 0, "steps": np.nan, "lr": np.nan,
               "n_layers": np.nan, "regime": "paper", "curvature": "fisher_during",
               "run": f"paper Table {table}: {backbone} / {target}", "method": method, "variant": method,
               "hyperparameters": "{}", "k": np.nan, "alpha": np.nan, "alpha_norm": np.nan, "scale_ratio": np.nan,
               "split": "heldout", "n_per_task": np.nan, "loss_pt": np.nan, "loss_ft": np.nan, "quad_pt": np.nan,
               "quad_ft": np.nan, "selected": True, "control": "", "seconds": np.nan, "table": int(table)}
        for _, r in g.iterrows():
            col = f"{rs.TASK_PREFIX}{r['benchmark']}" if r["role"] in ("general", "target") else ROLE_COLUMNS[r["role"]]
            cols = [col, "target_score"] if r["role"] == "target" else [col]
            for c in cols:
                row[c] = r["value"] / 100
                row[f"sd:{c}"] = r["std"] / 100
                row[f"printed:{c}"] = _printed(r["value"], int(r["decimals"]), r["std"])
        rows.append(row)
    out = pd.DataFrame(rows)
    # task columns: every table's general tasks in its printed order, then the targets (a task is a column
    # once, so the order of the columns is each table's printed order: `setting_tasks` reads it from there)
    order = list(dict.fromkeys(t for suite in paper.general_suite(df).values() for t in suite))
    order += [t for t in out["target"].unique() if t not in order]
    tasks = [f"{rs.TASK_PREFIX}{t}" for t in order]
    return out[[c for c in out.columns if not c.startswith(rs.TASK_PREFIX)] + tasks]


def as_results(source: pd.DataFrame) -> pd.DataFrame:
    """A results table: `source` itself, or the paper's long table converted by `paper_results`."""
    return paper_results(source) if is_paper_table(source) else source


def counterpart(table: int, settings: Sequence[Mapping]) -> Mapping | None:
    """The miniature setting that stands for the paper's Table 1-4 setting: the same family, and the target
    task whose `stands_for` names the paper's target (corners: OKVQA, caption: Flickr30k, colour_code:
    LaTeX-OCR; `world.tasks.TASKS`); None when `settings` has none."""
    from ..world import tasks as mt
    where = paper_setting(table)
    minis = [n for n, t in mt.TASKS.items() if t.kind == "target" and t.stands_for.startswith(where["target"])]
    found = [s for s in settings if s["family"] == where["family"] and s["target"] in minis]
    return found[0] if found else None


def paper_table_of(family: str, target: str) -> int | None:
    """The paper's Table 1-4 that a run of `family` on `target` stands beside: the table of that family whose
    target is `target` itself (a run at the paper's scale) or is what the miniature task `target` stands for
    (`counterpart`'s pairing); None when no table has one."""
    for table in (1, 2, 3, 4):
        if counterpart(table, [{"family": family, "target": target}]) is not None:
            return table
        where = paper_setting(table)
        if where["family"] == family and where["target"] == target:
            return table
    return None


def paper_setting(table: int) -> dict:
    """The selection of one of the paper's Tables 1-4 in `paper_results`: {"family", "target", "regime"}."""
    t = paper_results()
    r = t[t["table"] == table]
    if r.empty:
        raise ValueError(f"the paper has no Table {table} with per-task scores (Tables 1-4)")
    return {"family": r["family"].iloc[0], "target": r["target"].iloc[0], "regime": "paper"}


# ----------------------------------------------------------------------------------------------
# One setting's rows, and each method's held-out scores over seeds.

SETTING_KEYS = ["regime", "family", "size", "target", "steps", "lr", "n_layers", "curvature"]


def setting_rows(source: pd.DataFrame, where: Mapping, split: str = "heldout", control: str = "",
                 what: str = "figure") -> pd.DataFrame:
    """The rows of `source` (results table or paper table) in one setting, split and control. A selection
    that matches rows of several settings (e.g. two regimes) is refused: add the column that separates them."""
    df = as_results(source)
    _require(df, ["split", "control", "variant", "seed", *where], what)
    d = _select(df[(df["split"] == split) & (df["control"] == control)], where)
    keys = [k for k in SETTING_KEYS if k in d.columns]
    found = d[keys].astype(str).drop_duplicates()
    if len(found) > 1:
        differ = [k for k in keys if found[k].nunique() > 1]
        raise ValueError(f"{what}: the selection {dict(where)} matches {len(found)} settings that differ in "
                         f"{differ}; add {differ[0]!r} to it")
    return d


def setting_tasks(d: pd.DataFrame) -> tuple[str, list[str]]:
    """(target, general tasks) of one setting's rows: the task columns it has scores for, in table order."""
    targets = d["target"].unique()
    if len(targets) != 1:
        raise ValueError(f"rows of {len(targets)} targets {list(targets)}; select one")
    target = str(targets[0])
    tasks = [c[len(rs.TASK_PREFIX):] for c in rs.task_columns(d) if d[c].notna().all()]
    if target not in tasks:
        raise ValueError(f"no score column 'task:{target}' for the target {target!r}")
    return target, [t for t in tasks if t != target]


def method_scores(d: pd.DataFrame, methods: Sequence[str], columns: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) in points of `columns` per method (rows in the order of `methods`) over the seeds of one
    setting's rows. The std is the printed "±" where the source carries one (`sd:<column>`), else the
    standard deviation over seeds (NaN for one seed)."""
    _check_variants(d, methods)
    _require(d, columns, "scores")
    g = d[d["variant"].isin(methods)].groupby("variant", sort=False)
    mean = 100 * g[list(columns)].mean().reindex(methods)
    std = 100 * g[list(columns)].std(ddof=1).reindex(methods)
    for c in columns:
        if f"sd:{c}" in d.columns:
            printed = 100 * g[f"sd:{c}"].mean().reindex(methods)
            std[c] = printed.where(printed.notna(), std[c])
    return mean, std


def present_methods(d: pd.DataFrame, methods: Sequence[str] | None = None) -> list[str]:
    """The methods to draw: the given ones, or the paper's methods present in the rows, in the paper's order."""
    return list(methods) if methods is not None else [m for m in MAIN_METHODS if m in set(d["variant"])]


def label(variant: str) -> str:
    """The paper's label of a method (CGM†, Tailor, ...), or the variant's own name."""
    return LABELS.get(variant, variant)


# ----------------------------------------------------------------------------------------------
# Fig. 1: grouped bars.

def fig1_bars(ax, source: pd.DataFrame, where: Mapping, methods: Sequence[str] | None = None,
              metrics: Sequence[str] = ("pre_avg", "target_score", "hscore"), split: str = "heldout",
              legend: bool = False):
    """Fig. 1: Pre-Avg, Target and Hscore (x groups), one bar per method in the paper's order, in points;
    error bars: the printed ± (paper) or the standard deviation over seeds (results table). Returns the
    BarContainers {method: bars} (bar heights are the means)."""
    d = setting_rows(source, where, split, what="fig1_bars")
    methods = present_methods(d, methods)
    mean, std = method_scores(d, methods, metrics)
    target = setting_tasks(d)[0]
    x = np.arange(len(metrics))
    width = 0.8 / len(methods)
    bars = {}
    for i, m in enumerate(methods):
        colour, _ = method_style(m)
        err = std.loc[m].to_numpy(dtype=float)
        bars[m] = ax.bar(x - 0.4 + (i + 0.5) * width, mean.loc[m].to_numpy(dtype=float), width, color=colour,
                         edgecolor="black", linewidth=0.4, label=label(m),
                         yerr=np.where(np.isnan(err), 0.0, err), error_kw={"lw": 0.8, "capsize": 1.5})
    names = [f"Target\n({target})" if c == "target_score" else SUMMARY_COLUMNS.get(c, c) for c in metrics]
    ax.set_xticks(x, names)
    ax.set(ylabel="score (points)", ylim=(0, 100))
    if legend:
        ax.legend(fontsize=7, ncol=3)
    return bars


# ----------------------------------------------------------------------------------------------
# Fig. 3: radar.

def fig3_radar(ax, source: pd.DataFrame, where: Mapping, methods: Sequence[str] | None = None,
               split: str = "heldout"):
    """Fig. 3: one axis for the target (at the top) and one for every general task, one closed polygon per
    method, in points (0 at the centre, 100 at the rim). `ax` must be a polar Axes. Returns the lines."""
    if getattr(ax, "name", "") != "polar":
        raise ValueError("fig3_radar: draw into a polar Axes (plt.subplots(subplot_kw={'projection': 'polar'}))")
    d = setting_rows(source, where, split, what="fig3_radar")
    methods = present_methods(d, methods)
    target, general = setting_tasks(d)
    tasks = [target, *general]
    mean, _ = method_scores(d, methods, [f"{rs.TASK_PREFIX}{t}" for t in tasks])
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False)
    closed = np.r_[angles, angles[:1]]
    lines = {}
    for m in methods:
        colour, marker = method_style(m)
        v = mean.loc[m].to_numpy(dtype=float)
        lines[m], = ax.plot(closed, np.r_[v, v[:1]], "-", marker=marker, ms=3, lw=1.2, color=colour, label=label(m))
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    ax.set_xticks(angles, [f"{target}\n(target)", *general], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_yticks([25, 50, 75], ["25", "50", "75"], fontsize=7)
    return lines


# ----------------------------------------------------------------------------------------------
# Fig. 4: sensitivity of CGM-dagger to K and alpha (our runs only; the paper gives findings, no values).

SENSITIVITY_PARAMS = {"k": "K (fraction reverted)", "alpha_norm": "normalised alpha (alpha_norm)",
                      "alpha": "alpha (raw)"}
METRIC_LINES = {"hscore": "-", "pre_avg": "--", "target_score": ":"}


def _mode(values: pd.Series) -> float:
    counts = values.value_counts()
    return float(min(counts[counts == counts.max()].index))


def sensitivity(df: pd.DataFrame, where: Mapping, param: str = "k", variant: str = "cgm_dagger",
                metrics: Sequence[str] = ("pre_avg", "target_score", "hscore"), at: float | None = None
                ) -> tuple[pd.DataFrame, dict]:
    """The validation curves of `variant` against `param` ("k", "alpha_norm" or "alpha"), the other
    hyperparameter held at `at` (default: the value chosen most often on validation over the seeds).

    Returns (curve, held) where curve has one row per grid value: x (for raw alpha, the geometric mean over
    seeds of the alpha of that alpha_norm; x_low / x_high its range), and <metric> / <metric>_std (points,
    mean and standard deviation over seeds), seeds; held = {name: value} of the fixed hyperparameter."""
    if param not in SENSITIVITY_PARAMS:
        raise ValueError(f"sensitivity: unknown parameter {param!r}; known: {list(SENSITIVITY_PARAMS)}")
    if is_paper_table(df):
        raise ValueError("sensitivity: the paper gives no values for Fig. 4 (only its findings, "
                         "PAPER_FIG4_FINDINGS); pass a results table")
    _require(df, ["k", "alpha", "alpha_norm", "selected", *metrics], "sensitivity")
    d = setting_rows(df, where, "validation", what="sensitivity")
    _check_variants(d, [variant])
    d = d[d["variant"] == variant]
    grid = "k" if param == "k" else "alpha_norm"
    other = "alpha_norm" if param == "k" else "k"
    if not d[other].notna().any():          # a variant without the other hyperparameter
        other = None
    held = {}
    if other is not None:
        value = _mode(d.loc[d["selected"], other]) if at is None else float(at)
        if not np.isclose(d[other], value).any():
            raise ValueError(f"sensitivity: {variant} has no validation rows at {other} = {value:g}")
        d = d[np.isclose(d[other], value)]
        held[other] = value
    g = d.groupby(grid)
    curve = pd.DataFrame({"x": g["alpha"].apply(lambda a: float(np.exp(np.log(a).mean()))) if param == "alpha"
                          else g[grid].first(), "seeds": g["seed"].nunique()})
    if param == "alpha":
        curve["x_low"], curve["x_high"] = g["alpha"].min(), g["alpha"].max()
    for m in metrics:
        curve[m] = 100 * g[m].mean()
        curve[f"{m}_std"] = 100 * g[m].std(ddof=1)
    return curve.reset_index(drop=True), held


def fig4_sensitivity(ax, df: pd.DataFrame, where: Mapping, param: str = "k", variant: str = "cgm_dagger",
                     metrics: Sequence[str] = ("pre_avg", "target_score", "hscore"), at: float | None = None,
                     findings: bool = True):
    """Fig. 4 from our runs: validation Pre-Avg, Target and Hscore of CGM-dagger against K, alpha_norm or
    raw alpha (log scale), mean over seeds with a band of +-1 standard deviation; for raw alpha, horizontal
    bars span the seeds' alphas of each alpha_norm. With `findings`, the paper's stated finding is printed
    under the axes (it gives no values). Returns the curve (see `sensitivity`)."""
    curve, held = sensitivity(df, where, param, variant, metrics, at)
    colour, marker = method_style(variant)
    x = curve["x"].to_numpy(dtype=float)
    for m in metrics:
        y, s = curve[m].to_numpy(dtype=float), curve[f"{m}_std"].to_numpy(dtype=float)
        name = SUMMARY_COLUMNS.get(m, m)
        ax.plot(x, y, METRIC_LINES.get(m, "-"), marker=marker, ms=4, color=colour, label=name,
                alpha=1.0 if m == "hscore" else 0.75)
        if np.isfinite(s).any():
            ax.fill_between(x, y - np.nan_to_num(s), y + np.nan_to_num(s), color=colour, alpha=0.12, lw=0)
        if param == "alpha":
            ax.errorbar(x, y, xerr=[x - curve["x_low"], curve["x_high"] - x], fmt="none", ecolor=colour,
                        elinewidth=0.6, alpha=0.6)
    if param != "k":
        ax.set_xscale("log")
    fixed = ", ".join(f"{k} = {v:g}" for k, v in held.items())
    ax.set(xlabel=SENSITIVITY_PARAMS[param] + (f"  [{fixed}]" if fixed else ""), ylabel="validation score (points)")
    if findings:
        text = PAPER_FIG4_FINDINGS["k" if param == "k" else "alpha"]
        ax.text(0.0, -0.24, textwrap.fill(text, 70), transform=ax.transAxes, va="top", ha="left", fontsize=7.5,
                style="italic", color="#444444")
    return curve


# ----------------------------------------------------------------------------------------------
# Figs. 5 and 6: selection masks and column-wise recovery (computed from merges; no data in the paper).

def reverted_mask(merged: torch.Tensor, w_pt: torch.Tensor) -> torch.Tensor:
    """The entries that hold their pre-trained value after a merge (the paper's "recovered" parameters)."""
    return merged == w_pt.to(merged.dtype)


def reversion_masks(w_pt: torch.Tensor, w_ft: torch.Tensor, methods: Mapping[str, Mapping],
                    h_pt: torch.Tensor | None = None, h_ft: torch.Tensor | None = None, inputs=None,
                    name: str = "weight") -> dict[str, torch.Tensor]:
    """Masks of reverted entries of one weight of any checkpoint pair: {method: bool tensor} for
    methods = {registry method: hyperparameters}, merged with `merge.merge_state` (`inputs`: a MergeInputs
    whose activations are keyed by `name`, for Model Tailor and Wanda)."""
    from ..merge import get_method, merge_state
    out = {}
    for method, hp in methods.items():
        m = get_method(method)
        if m.uses_curvature and (h_pt is None or h_ft is None):
            raise ValueError(f"reversion_masks: {method} needs h_pt and h_ft")
        curv = ({name: h_pt}, {name: h_ft}) if m.uses_curvature else (None, None)
        merged = merge_state(method, {name: w_pt}, {name: w_ft}, *curv, names=[name], inputs=inputs, **hp)
        out[method] = reverted_mask(merged[name], w_pt)
    return out


def _first_weight(names: Sequence[str], pattern: str) -> str:
    found = [n for n in names if pattern in n and n.endswith(".weight")]
    if not found:
        raise ValueError(f"no weight matching {pattern!r} in the merge set")
    return found[0]


def run_masks(df: pd.DataFrame, where: Mapping, cache: str | Path, k: float,
              variants: Sequence[str] = ("cgm_dagger", "model_tailor", "magnitude"), weight: str = "self_attn.o_proj",
              seed: int | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(weight name, {variant: mask}) for one run of a results table: each variant's validation-chosen
    hyperparameters with the budget set to k, merged again from the cache (`sweep.rebuild_merge`); the
    weight is the first of the merge set whose name contains `weight`. One seed (default: the lowest)."""
    from . import runs, sweep
    _require(df, ["hyperparameters", "method", "selected"], "run_masks")
    d = setting_rows(df, where, "validation", what="run_masks")
    d = d[d["seed"] == (int(d["seed"].min()) if seed is None else seed)]
    _check_variants(d, variants)
    w_pt, _, names = runs.merge_states(sweep.spec_of(d.iloc[0]), Path(cache))
    name = _first_weight(names, weight)
    masks = {}
    for v in variants:
        row = d[(d["variant"] == v) & d["selected"]].iloc[0].copy()
        hp = json.loads(row["hyperparameters"])
        if "k" not in hp:
            raise ValueError(f"run_masks: {v} has no budget k to set")
        row["hyperparameters"] = json.dumps({**hp, "k": k})
        masks[v] = reverted_mask(sweep.rebuild_merge(row, Path(cache))[name], w_pt[name])
    return name, masks


def patch_average(mask: torch.Tensor, patch: int) -> np.ndarray:
    """The fraction of reverted entries in each patch x patch block of a 2-D mask (edge blocks smaller)."""
    m = np.asarray(mask, dtype=float)
    rows, cols = -(-m.shape[0] // patch), -(-m.shape[1] // patch)
    padded = np.full((rows * patch, cols * patch), np.nan)
    padded[:m.shape[0], :m.shape[1]] = m
    return np.nanmean(padded.reshape(rows, patch, cols, patch), axis=(1, 3))


def column_recovery(mask: torch.Tensor, block: int = 1) -> np.ndarray:
    """Fig. 6's column-wise recovery ratio: the fraction of the entries of each block of `block` input
    columns (all rows) that is reverted. Its mean over columns is the fraction reverted overall."""
    per_column = np.asarray(mask, dtype=float).reshape(mask.shape[0], -1).mean(axis=0)
    return patch_average(per_column[None, :], block)[0] if block > 1 else per_column


# ----------------------------------------------------------------------------------------------
# Panels side by side: the paper's next to ours.

@dataclass(frozen=True)
class Panel:
    """One panel of `paired_figure`: draw(ax, source, where), titled; or, with `draw` None, a note (or
    nothing) in an empty frame."""
    draw: object = None
    source: pd.DataFrame | None = None
    where: Mapping | None = None
    title: str = ""
    note: str = ""


def paired_figure(panels: Sequence[Panel], height: float, polar: bool = False, width: float = 11):
    """A figure of `panels` in rows of two (the paper's panel on the left, ours on the right, as the caller
    orders them); returns (fig, axes)."""
    import matplotlib.pyplot as plt
    panels = list(panels) + [Panel()] * (len(panels) % 2)
    nrows = len(panels) // 2
    fig, axes = plt.subplots(nrows, 2, figsize=(width, height * nrows), squeeze=False,
                             subplot_kw={"projection": "polar"} if polar else {})
    for ax, p in zip(axes.flat, panels):
        if p.draw is None:
            ax.axis("off")
            if p.note:
                ax.text(0.5, 0.5, p.note, ha="center", va="center", fontsize=9, transform=ax.transAxes)
            continue
        p.draw(ax, p.source, p.where)
        ax.set_title(p.title, fontsize=10, pad=18 if polar else 6)
    return fig, axes


def fig5_mask(ax, mask: torch.Tensor, variant: str, patch: int = 4, title: str | None = None,
              vmax: float | None = None):
    """Fig. 5: one method's mask, patch-averaged (white: nothing reverted; the method's colour: a share
    `vmax` of the patch reverted or more, default the largest patch share of this mask; pass one vmax to
    compare panels); x = input column, y = output row, in patches. Returns the image."""
    from matplotlib.colors import LinearSegmentedColormap
    colour, _ = method_style(variant)
    cmap = LinearSegmentedColormap.from_list(variant, ["#ffffff", colour])
    avg = patch_average(mask, patch)
    vmax = (float(avg.max()) or 1.0) if vmax is None else vmax
    img = ax.imshow(avg, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    share = float(np.asarray(mask, dtype=float).mean())
    ax.set(title=title or f"{label(variant)}: {100 * share:.1f}% reverted",
           xlabel=f"input column ({patch}-column patches)", ylabel=f"output row ({patch}-row patches)")
    ax.grid(False)
    return img


def fig6_recovery(ax, masks: Mapping[str, torch.Tensor], k: float, block: int = 4):
    """Fig. 6: the column-wise recovery ratio of each method's mask against the column block, with the
    budget k as a dashed line. Returns {variant: recovery per block}."""
    out = {}
    for v, mask in masks.items():
        colour, _ = method_style(v)
        out[v] = column_recovery(mask, block)
        ax.plot(np.arange(len(out[v])), out[v], "-", color=colour, lw=1.2, label=label(v))
    ax.axhline(k, color="black", ls="--", lw=0.8)
    ax.set(xlabel=f"column block ({block} input columns)", ylabel="fraction reverted", ylim=(0, 1))
    return out


def column_spread(recovery: np.ndarray) -> dict:
    """How unevenly a mask spreads over the columns: std of the recovery ratio over column blocks, and the
    share of the reversions that fall in the 10% of blocks with the most."""
    r = np.asarray(recovery, dtype=float)
    top = np.sort(r)[::-1][:max(1, int(round(0.1 * len(r))))]
    return {"std over blocks": float(r.std()), "share in top 10% of blocks": float(top.sum() / max(r.sum(), 1e-12))}


# ----------------------------------------------------------------------------------------------
# Tables 1-5: best bold, second best underlined.

@dataclass(repr=False)
class ScoreTable:
    """A table as the paper prints it: values (points, for ranking), text (what is shown) and marks ("best",
    "second" or "") per cell. Displays as HTML (a pandas Styler) in a notebook and the book."""
    values: pd.DataFrame
    text: pd.DataFrame
    marks: pd.DataFrame
    caption: str = ""

    def styler(self):
        css = {"best": "font-weight: bold", "second": "text-decoration: underline", "": ""}
        s = self.text.style.apply(lambda _: self.marks.replace(css), axis=None)
        return s.set_caption(self.caption) if self.caption else s

    def to_markdown(self) -> str:
        """A Markdown table: best in **bold**, second best <u>underlined</u>."""
        fmt = {"best": "**{}**", "second": "<u>{}</u>", "": "{}"}
        head = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in self.text.columns]
        lines = ["| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for i, row in enumerate(self.text.index):
            cells = [fmt[m].format(t) for t, m in zip(self.text.iloc[i], self.marks.iloc[i])]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.styler().to_html()

    def column_groups(self, page_px: int = 600) -> list["ScoreTable"]:
        """The table cut into column groups that each fit `page_px` pixels (a column's width estimated from
        its longest text): the general benchmarks first, then the summary columns from Pre-Avg on."""
        cols = list(self.text.columns)
        cut = next((i for i, c in enumerate(cols) if "Pre-Avg" in str(c)), len(cols))
        px = {c: 8 * max(len(str(c)), self.text[c].astype(str).str.len().max()) + 16 for c in cols}
        groups: list[list] = []
        for part in (cols[:cut], cols[cut:]):
            for i, c in enumerate(part):
                if i and sum(px[x] for x in groups[-1]) + px[c] <= page_px:
                    groups[-1].append(c)
                else:
                    groups.append([c])
        return [ScoreTable(self.values[g], self.text[g], self.marks[g], self.caption) for g in groups]

    def __repr__(self) -> str:
        return self.to_markdown()


def rank_marks(values: pd.DataFrame, exclude: Sequence = ()) -> pd.DataFrame:
    """Per column, "best" on the highest value and "second" on the next distinct value, among the rows not
    in `exclude` (ties share a mark); "" elsewhere."""
    marks = pd.DataFrame("", index=values.index, columns=values.columns)
    ranked = values.drop(index=[r for r in exclude if r in values.index])
    for c in values.columns:
        distinct = sorted(ranked[c].dropna().unique(), reverse=True)
        for mark, v in zip(("best", "second"), distinct):
            marks.loc[ranked.index[ranked[c] == v], c] = mark
    return marks


def _cells(d: pd.DataFrame, methods: Sequence[str], columns: Sequence[str], decimals: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values as shown, text) per method and column: the printed cells where the source has them, else
    the mean over seeds with ± the std over seeds (one seed: the mean alone), rounded to `decimals`."""
    mean, std = method_scores(d, methods, columns)
    values, text = mean.round(decimals), pd.DataFrame(index=mean.index, columns=list(columns), dtype=object)
    for c in columns:
        for m in methods:
            printed = d.loc[d["variant"] == m, f"printed:{c}"] if f"printed:{c}" in d.columns else pd.Series([], dtype=object)
            if len(printed) and isinstance(printed.iloc[0], str):
                text.loc[m, c] = printed.iloc[0]
                values.loc[m, c] = float(printed.iloc[0].split(" ")[0])
            else:
                s = std.loc[m, c]
                text.loc[m, c] = f"{mean.loc[m, c]:.{decimals}f}" + ("" if np.isnan(s) else f" ± {s:.{decimals}f}")
    return values, text


def score_table(source: pd.DataFrame, where: Mapping, methods: Sequence[str] | None = None, split: str = "heldout",
                exclude_from_ranking: Sequence[str] = ENDPOINTS, decimals: int = 1) -> ScoreTable:
    """Tables 1-4: one row per method (the paper's labels and order), one column per general task, then
    Pre-Avg, the target, Hscore and Avg, in points; best bold and second best underlined per column among
    the merge methods (the two endpoints are references and are not ranked: the public text copy of the
    paper keeps no bold, so which rows the paper ranks cannot be read from it)."""
    d = setting_rows(source, where, split, what="score_table")
    methods = present_methods(d, methods)
    target, general = setting_tasks(d)
    cols = [f"{rs.TASK_PREFIX}{t}" for t in general] + ["pre_avg", "target_score", "hscore", "avg"]
    values, text = _cells(d, methods, cols, decimals)
    names = [*general, "Pre-Avg", target, "Hscore", "Avg"]
    values.columns = text.columns = names
    values.index = text.index = [label(m) for m in methods]
    marks = rank_marks(values, [label(m) for m in exclude_from_ranking])
    return ScoreTable(values, text, marks)


def _paper_ablation(df: pd.DataFrame) -> pd.DataFrame:
    """Table 5 of the paper as rows {setting, variant, hscore, avg (points), printed:hscore, printed:avg}."""
    t5 = df[df["table"] == 5]
    rows = {}
    for _, r in t5.iterrows():
        key = (f"{r['backbone']} / {r['target']}", ABLATION_VARIANTS[r["method"]])
        col = ROLE_COLUMNS[r["role"]]
        rows.setdefault(key, {})[col] = float(r["value"])
        rows[key][f"printed:{col}"] = _printed(r["value"], int(r["decimals"]), r["std"])
    return pd.DataFrame([{"setting": s, "variant": v, **x} for (s, v), x in rows.items()])


def ablation_table(source: pd.DataFrame, settings: Sequence[Mapping] | None = None,
                   metrics: Sequence[str] = ("hscore", "avg"), decimals: int = 1) -> ScoreTable:
    """Table 5, the ablation of the CGM† score: rows magnitude only, h_ft Δ², −α h_pt Δ², the full score;
    columns (setting, Hscore / Avg) in points; best bold, second underlined per column.

    From the paper's table: its three settings as printed (`settings` ignored). From a results table: the
    held-out rows at each variant's validation-chosen k, mean ± std over seeds, for each selection in
    `settings` (default: every regime-"default", fisher_during setting)."""
    variants = list(ABLATION_SCORES)
    columns = [SUMMARY_COLUMNS[m] for m in metrics]
    if is_paper_table(source):
        p = _paper_ablation(source)
        blocks = []
        for s, g in p.groupby("setting", sort=False):
            g = g.set_index("variant").reindex(variants)
            v = g[list(metrics)].set_axis(columns, axis=1)
            t = g[[f"printed:{m}" for m in metrics]].set_axis(columns, axis=1)
            blocks.append((s, v, t))
    else:
        if settings is None:
            _require(source, ["regime", "curvature", "family", "target"], "ablation_table")
            main = source[(source["regime"] == "default") & (source["curvature"] == "fisher_during")]
            settings = [{"family": f, "target": t, "regime": "default", "curvature": "fisher_during"}
                        for f, t in main[["family", "target"]].drop_duplicates().itertuples(index=False)]
        blocks = []
        for where in settings:
            d = setting_rows(source, where, "heldout", what="ablation_table")
            v, t = _cells(d, variants, metrics, decimals)
            blocks.append((f"{where['family']} / {where['target']}", v.set_axis(columns, axis=1),
                           t.set_axis(columns, axis=1)))
    values = pd.concat({s: v for s, v, _ in blocks}, axis=1)
    text = pd.concat({s: t for s, _, t in blocks}, axis=1)
    index = [f"{label(v)}: {ABLATION_SCORES[v]}" for v in variants]
    values.index = text.index = index
    return ScoreTable(values, text, rank_marks(values))


# ----------------------------------------------------------------------------------------------
# The claims beside the figures.

def claims_beside(statuses: Mapping[str, str]) -> pd.DataFrame:
    """Each claim of `regimes.CLAIMS` with the paper's figure it concerns, this chapter's figures and the
    status the merge chapter gave it (`statuses`: its metrics.json "claims"; never recomputed here)."""
    from .regimes import CLAIMS
    missing = [c["id"] for c in CLAIMS if c["id"] not in statuses]
    if missing:
        raise ValueError(f"no status for claim {missing[0]!r} in the merge chapter's claims")
    return pd.DataFrame([{"claim": c["claim"], "paper": CLAIM_FIGURES[c["id"]][0],
                          "figures here": ", ".join(CLAIM_FIGURES[c["id"]][1]) or "-",
                          "in miniature": statuses[c["id"]]} for c in CLAIMS], index=[c["id"] for c in CLAIMS])


AGREEMENT = {"reproduced in miniature": "is reproduced in the miniature",
             "not reproduced": "is not reproduced: here the miniature disagrees with the paper",
             "mixed": "holds in some miniature settings and not in others (mixed)",
             "not testable here": "is not tested by the merge chapter"}


def agreement(claim_ids: Sequence[str], statuses: Mapping[str, str]) -> str:
    """Sentences for a caption: the merge chapter's status of each claim a figure concerns, saying where
    the miniature disagrees with the paper (the statuses are read, never recomputed)."""
    import re
    from .regimes import CLAIMS
    text = {c["id"]: re.sub(r"\s*\([^)]*\)$", "", c["claim"]) for c in CLAIMS}
    return " ".join(f"The paper's claim \"{text[c]}\" {AGREEMENT.get(statuses[c], statuses[c])}."
                    for c in claim_ids)
