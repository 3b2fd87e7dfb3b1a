"""The paper's Tables 1-5 as data, and a check that their summary columns follow from their per-task columns.

`cgm_min/data/paper_tables.csv` holds the numbers reported by Yang et al. (2026, arXiv 2606.24963),
Tables 1-5, as printed (one row per table, backbone, target, method and benchmark; see
`cgm_min/data/README.md`). This module reads it and re-derives every printed summary score from the
printed per-task scores with the project's one copy of the scores (`cgm_min.evaluate.scores`):

    Pre-Avg   mean of the N general tasks of the table (the `role == "general"` rows; N = 8 in every table)
    Hscore    Eq. 15, harmonic mean of the printed target score and the recomputed Pre-Avg
    Avg       Eq. 14, (target + N * Pre-Avg) / (N + 1), with the recomputed Pre-Avg

A printed value "recomputes" when it lies within the rounding of its own printed digits plus the
rounding of the printed inputs carried through the formula (`tolerance` column). The one printed value
that does not is listed, with its explanation, in `KNOWN_MISMATCHES`. Table 5 prints only Hscore and Avg,
so its rows are compared with the same method in Tables 1, 2 and 4 instead (`table5_against_main`).
"""
from __future__ import annotations

from importlib import resources
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..evaluate import scores

CSV = "paper_tables.csv"
COLUMNS = ("table", "backbone", "target", "method", "benchmark", "value", "std", "label", "role", "note")
KEY = ("table", "backbone", "target", "method", "benchmark")
SETTING = ("table", "backbone", "target")
ROLES = ("general", "target", "pre_avg", "hscore", "avg")
SUMMARIES = {"pre_avg": "Pre-Avg", "hscore": "Hscore", "avg": "Avg"}   # role -> printed column name
# `note` values (one per row at most):
#   printed_error   the printed value does not follow from the printed inputs (see KNOWN_MISMATCHES)
#   std_lost        Table 3, CGM / CGM-dagger: the value survived, its "±" was lost in the public text copy
#   std_not_shown   Table 4, CGM / CGM-dagger: no "±" in the public text copy; whether the PDF prints one
#                   is not known (the copy is not flagged as garbled there)
NOTES = ("printed_error", "std_lost", "std_not_shown")

# Paper label -> registry name (the Table 5 rows use the registry names of the score ablations).
METHOD_LABELS = {
    "Pre-trained": "pre_trained", "Fine-tuned": "fine_tuned", "Tailor": "model_tailor", "DARE": "dare",
    "Grafting": "grafting", "Magnitude": "magnitude", "Wanda": "wanda", "CGM": "cgm", "CGM†": "cgm_dagger",
    # Table 5 (score ablation of CGM-dagger); "Magnitude-only" reverts the smallest delta^2, the registry's
    # `magnitude` (its numbers differ from Table 1's Magnitude row: the ablation fixes the budget K).
    "Magnitude-only": "magnitude", "Fine-tune+Magnitude": "score_ft_magnitude",
    "Pre-train+Magnitude": "score_pt_magnitude", "CGM† (full)": "cgm_dagger",
}


class KnownMismatch(NamedTuple):
    table: int
    backbone: str
    target: str
    method: str
    summary: str          # "Pre-Avg", "Hscore" or "Avg"
    printed: float
    recomputed: float     # rounded to one decimal more than printed
    why: str


# Printed values that do not recompute from the printed inputs: errors in the paper, not in the
# transcription. A new entry needs a reason; the test fails on any mismatch not listed here.
KNOWN_MISMATCHES = (
    KnownMismatch(1, "LLaVA-1.5-7B", "OKVQA", "magnitude", "Pre-Avg", 54.0, 55.2,
                  "the eight printed general scores average 55.2; the printed Hscore 54.9 and Avg 55.1 "
                  "follow from 55.2, so the printed Pre-Avg is a typo in the paper"),
)


def decimals(text: str) -> int:
    """Number of decimals of a number as printed ('54.0' -> 1, '11.73' -> 2, '0' -> 0)."""
    text = str(text).strip()
    return len(text.split(".", 1)[1]) if "." in text else 0


def load_paper_tables() -> pd.DataFrame:
    """The paper's Tables 1-5, one row per (table, backbone, target, method, benchmark).

    Columns: those of the CSV (`value`, `std` as floats, `std` NaN where none is printed; `note` "" where
    none) and `decimals`, the number of decimals `value` is printed with. Read with importlib.resources,
    so an installed (even zipped) package finds its data.
    """
    with resources.files("cgm_min").joinpath("data", CSV).open("r", encoding="utf-8") as f:
        raw = pd.read_csv(f, dtype=str, keep_default_na=False)
    assert tuple(raw.columns) == COLUMNS, f"{CSV}: columns {tuple(raw.columns)}, expected {COLUMNS}"
    df = raw.copy()
    df["table"] = df["table"].astype(int)
    df["decimals"] = raw["value"].map(decimals)
    df["value"] = pd.to_numeric(raw["value"], errors="raise").astype(float)
    df["std"] = pd.to_numeric(raw["std"].replace("", np.nan), errors="raise").astype(float)
    return df


def general_suite(df: pd.DataFrame | None = None) -> dict[tuple[int, str, str], tuple[str, ...]]:
    """{(table, backbone, target): the general benchmarks of that table, in printed order}; N = len(...).

    Table 5 prints no per-task scores and has no entry. Every method of a table has the same suite.
    """
    df = load_paper_tables() if df is None else df
    suites = {}
    for key, g in df[df["role"] == "general"].groupby(list(SETTING), sort=False):
        per_method = {m: tuple(gm["benchmark"]) for m, gm in g.groupby("method", sort=False)}
        assert len(set(per_method.values())) == 1, f"{key}: methods disagree on the general tasks {per_method}"
        suites[key] = next(iter(per_method.values()))
    return suites


def _rounding(d: int) -> float:
    """Half a unit of the last printed digit."""
    return 0.5 * 10.0 ** -d


def recompute_summaries(df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Printed Pre-Avg / Hscore / Avg next to the values recomputed from the per-task scores.

    One row per (table, backbone, target, method, summary). Pre-Avg is recomputed as the mean of the
    general tasks (`scores.pre_avg`); Hscore (`scores.hscore`, Eq. 15) and Avg (`scores.avg_score`,
    Eq. 14) from the printed target score and the recomputed, unrounded Pre-Avg. `tolerance` is the
    rounding of the printed value plus the rounding of the printed inputs propagated to first order;
    `within` says whether |difference| <= tolerance. Table 5 has no per-task scores: its rows carry the
    printed values with NaN recomputations (`within` is NA).
    """
    df = load_paper_tables() if df is None else df
    suites = general_suite(df)
    out = []
    for (table, backbone, target, method), g in df.groupby(["table", "backbone", "target", "method"], sort=False):
        by_role = {r: gr for r, gr in g.groupby("role")}
        suite = suites.get((table, backbone, target))
        recomputed, inputs_tol = {}, {}
        if suite is not None:
            gen = by_role["general"].set_index("benchmark")
            n = len(suite)
            pre = scores.pre_avg(gen["value"].to_dict(), suite)
            r_pre = float(np.mean([_rounding(d) for d in gen.loc[list(suite), "decimals"]]))
            tgt_row = by_role["target"].iloc[0]
            tgt, r_tgt = float(tgt_row["value"]), _rounding(int(tgt_row["decimals"]))
            recomputed = {"pre_avg": pre, "hscore": scores.hscore(tgt, pre), "avg": scores.avg_score(tgt, pre, n)}
            s2 = (tgt + pre) ** 2
            inputs_tol = {"pre_avg": r_pre,
                          "hscore": 2 * pre ** 2 / s2 * r_tgt + 2 * tgt ** 2 / s2 * r_pre,
                          "avg": (r_tgt + n * r_pre) / (n + 1)}
        for role, name in SUMMARIES.items():
            if role not in by_role:
                continue
            row = by_role[role].iloc[0]
            rec = recomputed.get(role, np.nan)
            tol = _rounding(int(row["decimals"])) + inputs_tol.get(role, np.nan)
            out.append({"table": table, "backbone": backbone, "target": target, "method": method,
                        "label": row["label"], "summary": name, "printed": float(row["value"]),
                        "printed_decimals": int(row["decimals"]), "recomputed": rec,
                        "difference": float(row["value"]) - rec, "tolerance": tol, "note": row["note"]})
    res = pd.DataFrame(out)
    res["within"] = pd.array([pd.NA if np.isnan(t) else bool(abs(d) <= t)
                              for d, t in zip(res["difference"], res["tolerance"])], dtype="boolean")
    return res


def mismatches(tolerance: float | None = None, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """The printed summaries that do not recompute: |printed - recomputed| above `tolerance`.

    tolerance None (default): each value's own tolerance, derived from its printed digits and those of
    its inputs (see `recompute_summaries`); a number: one fixed tolerance in points for every value.
    """
    res = recompute_summaries(df)
    res = res[res["recomputed"].notna()]
    tol = res["tolerance"] if tolerance is None else float(tolerance)
    return res[res["difference"].abs() > tol].reset_index(drop=True)


def lost_values(df: pd.DataFrame | None = None, include_not_shown: bool = False) -> pd.DataFrame:
    """The numbers the public text copy lost: Table 3's CGM / CGM-dagger "±" standard deviations.

    Every printed mean of Tables 1-5 survived; what was lost are standard deviations (the rows'
    `std` is NaN, `note` "std_lost"). With include_not_shown, also the Table 4 CGM / CGM-dagger cells the
    copy shows without a "±" (`note` "std_not_shown"), which may simply have none in the PDF.
    """
    df = load_paper_tables() if df is None else df
    keep = ("std_lost", "std_not_shown") if include_not_shown else ("std_lost",)
    lost = df[df["note"].isin(keep)]
    return lost[list(KEY) + ["label", "value", "note"]].assign(lost="std").reset_index(drop=True)


# Table 5 settings -> the main table that reports the same (backbone, target).
TABLE5_MAIN = {("LLaVA-1.5-7B", "OKVQA"): 1, ("LLaVA-1.5-7B", "Flickr30k"): 2, ("Qwen2.5-VL-3B", "LaTeX-OCR"): 4}


def table5_against_main(df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 5's Hscore / Avg next to the same method's values in Tables 1, 2, 4 (NaN where the main table
    has no such method: the two single-term score ablations)."""
    df = load_paper_tables() if df is None else df
    t5 = df[df["table"] == 5]
    main = df[df["role"].isin(("hscore", "avg"))].set_index(["table", "backbone", "target", "method", "benchmark"])
    rows = []
    for _, r in t5.iterrows():
        key = (TABLE5_MAIN[(r["backbone"], r["target"])], r["backbone"], r["target"], r["method"], r["benchmark"])
        main_value = float(main.loc[key, "value"]) if key in main.index else np.nan
        rows.append({"backbone": r["backbone"], "target": r["target"], "method": r["method"], "label": r["label"],
                     "summary": r["benchmark"], "table5": float(r["value"]), "main_table": key[0],
                     "main": main_value})
    return pd.DataFrame(rows)
