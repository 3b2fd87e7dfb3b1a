"""Figures drawn from a results table (`results.py`): they never re-run an experiment, so the same function
draws the miniature sweeps and a GPU run at the paper's scale that writes the same schema.

Each function draws into a matplotlib Axes it is given and returns it; the caller lays out the figure
(at most two panels per row in the book) and saves it with `report.save_figure`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..report import method_style
from . import results as rs


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the results table has no column {missing[0]!r}")


def _select(df: pd.DataFrame, where: Mapping) -> pd.DataFrame:
    for k, v in where.items():
        if k not in df.columns:
            raise ValueError(f"no column {k!r} to select {k}={v!r} on")
        df = df[df[k] == v]
    if df.empty:
        raise ValueError(f"no rows for {dict(where)}")
    return df


def _check_variants(df: pd.DataFrame, variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in set(df["variant"])]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r} for this selection; present: {sorted(set(df['variant']))}")


def pareto_fronts(ax, df: pd.DataFrame, where: Mapping, variants: Sequence[str], split: str = "validation",
                  seed: int | None = None, label: bool = True):
    """(Target, Pre-Avg) of every grid point of each variant, with a line through the points of its grid that
    no other of its points dominates, and the two endpoints; one seed (default: the lowest present)."""
    _require(df, rs.COLUMNS, "pareto_fronts")
    d = _select(df[(df["split"] == split) & (df["control"] == where.get("control", ""))],
                {k: v for k, v in where.items() if k != "control"})
    seed = int(d["seed"].min()) if seed is None else seed
    d = d[d["seed"] == seed]
    _check_variants(d, variants)
    for v in variants:
        g = d[d["variant"] == v]
        colour, marker = method_style(v)
        if v in ("pre_trained", "fine_tuned"):
            ax.scatter(100 * g["target_score"], 100 * g["pre_avg"], s=70, marker=marker, color=colour, zorder=5,
                       label=v.replace("_", "-") if label else None, edgecolor="black", linewidth=0.6)
            continue
        t, p = g["target_score"].to_numpy(), g["pre_avg"].to_numpy()
        front = front_indices(t, p)
        ax.plot(100 * t[front], 100 * p[front], "-", color=colour, lw=1.2, alpha=0.8)
        ax.scatter(100 * t, 100 * p, s=16, marker=marker, color=colour, alpha=0.55, label=v if label else None)
    ax.set(xlabel="Target (%)", ylabel="Pre-Avg (%)")
    return ax


def front_indices(target: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates (higher or equal in both, higher in one), ordered by
    target: the line a method's grid can reach."""
    order = np.lexsort((-pre, -target))                # target descending, then pre-avg descending
    keep, best = [], -np.inf
    for i in order:
        if pre[i] > best:
            keep.append(i)
            best = pre[i]
    return np.array(keep[::-1], dtype=int)


def paired_forest(ax, comp: pd.DataFrame, label_of=lambda r: f"{r['family']} / {r['target']}"):
    """One line per row of `analysis.comparisons`: the mean paired Hscore difference (points) with its 95%
    bootstrap interval; zero marked. CGM and CGM-dagger side by side."""
    _require(comp, ["variant", "mean", "ci_low", "ci_high"], "paired_forest")
    rows = comp.reset_index(drop=True)
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        colour, _ = method_style(r["variant"])
        ax.plot([100 * r["ci_low"], 100 * r["ci_high"]], [yi, yi], color=colour, lw=2)
        ax.scatter([100 * r["mean"]], [yi], color=colour, s=30, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{label_of(r)}: {'CGM' if r['variant'] == 'cgm' else 'CGM†'} vs {r['against']}"
                      for _, r in rows.iterrows()], fontsize=8)
    ax.set(xlabel="held-out Hscore difference (points, 95% interval)")
    return ax


def quadratic_scatter(ax, df: pd.DataFrame, run: str, which: str = "pt", curvature: str = "fisher_during",
                      variants: Sequence[str] | None = None):
    """Predicted (quadratic model) against measured increase of the general loss (`which="pt"`) or of the
    target loss ("ft") for every merge of one run, log-log, one colour per method."""
    _require(df, ["quad_pt", "quad_ft", "loss_pt", "loss_ft"], "quadratic_scatter")
    d = _select(df[(df["split"] == "validation") & (df["control"] == "")], {"run": run, "curvature": curvature})
    ref = d[d["method"] == ("pre_trained" if which == "pt" else "fine_tuned")][f"loss_{which}"].iloc[0]
    variants = variants or [v for v in dict.fromkeys(d["variant"]) if v not in ("pre_trained", "fine_tuned")]
    _check_variants(d, variants)
    for v in variants:
        g = d[d["variant"] == v]
        pred, meas = g[f"quad_{which}"].to_numpy(), g[f"loss_{which}"].to_numpy() - ref
        keep = (pred > 0) & (meas > 0)
        colour, marker = method_style(v)
        ax.scatter(pred[keep], meas[keep], s=14, color=colour, marker=marker, label=v)
    lims = np.array(ax.get_xlim() + ax.get_ylim())
    lo, hi = lims[lims > 0].min(), lims.max()
    ax.plot([lo, hi], [lo, hi], "--", color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="predicted increase, 1/2 sum h (w - w*)^2",
           ylabel="measured loss increase")
    return ax
