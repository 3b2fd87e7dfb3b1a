"""The paper's figures and tables (`experiments.paper_figures`) on a small hand-made results table and on the
paper's own numbers: bar heights, closed radars, bold / underline on the right cells, the sensitivity
curves, masks and column recovery of known merges, and the one-line errors."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from cgm_min import cgm
from cgm_min.experiments import paper
from cgm_min.experiments import paper_figures as pf
from cgm_min.experiments import results as rs
from cgm_min.merge import ActivationStats, MergeInputs
from cgm_min.report import method_style

GENERAL = ["a", "b", "c"]
TARGET = "t"
WHERE = {"family": "llava", "target": TARGET}
METHODS = ("pre_trained", "fine_tuned", "magnitude", "cgm", "cgm_dagger")


def base_row(seed, variant, method=None, split="heldout", **extra):
    return {"family": "llava", "size": "small", "target": TARGET, "seed": seed, "steps": 200, "lr": 5e-4,
            "n_layers": -1, "regime": "default", "curvature": "fisher_during", "run": f"llava/t-s{seed}",
            "method": method or variant, "variant": variant, "hyperparameters": "{}", "k": np.nan,
            "alpha": np.nan, "alpha_norm": np.nan, "scale_ratio": 1.0, "split": split, "n_per_task": 10,
            "loss_pt": 0.0, "loss_ft": 0.0, "quad_pt": 0.0, "quad_ft": 0.0, "selected": True, "control": "",
            "seconds": 0.0, **extra}


def scores_of(i, seed):
    """Task scores of the i-th method under one seed (distinct, known)."""
    return {"a": 0.10 * i + 0.02 * seed, "b": 0.50, "c": 0.9 - 0.1 * i, "t": 0.20 + 0.15 * i}


@pytest.fixture
def table():
    rows = [{**base_row(seed, m), **rs.summary_row(scores_of(i, seed), TARGET, GENERAL)}
            for seed in (0, 1) for i, m in enumerate(METHODS)]
    return rs.check_schema(pd.DataFrame(rows))


@pytest.fixture(scope="module")
def paper_df():
    return paper.load_paper_tables()


def cell(paper_df, table, method, benchmark):
    r = paper_df[(paper_df["table"] == table) & (paper_df["method"] == method) & (paper_df["benchmark"] == benchmark)]
    return float(r["value"].iloc[0])


# -- the paper's numbers as a results table ---------------------------------------------------------------

def test_main_methods_are_the_papers_order(paper_df):
    assert pf.MAIN_METHODS == tuple(dict.fromkeys(paper_df[paper_df["table"] == 1]["method"]))


def test_paper_results_is_a_results_table(paper_df):
    pr = pf.paper_results(paper_df)
    assert len(pr) == 4 * 9 and set(pr["split"]) == {"heldout"} and pr["selected"].all()
    for t in (1, 2, 3, 4):
        sub = pr[pr["table"] == t].dropna(axis=1, how="all")
        rs.check_schema(sub.assign(**{c: 0.0 for c in rs.COLUMNS if c not in sub}))
        target, general = pf.setting_tasks(pr[pr["table"] == t])
        assert tuple(general) == paper.general_suite(paper_df)[(t, *pr.loc[pr["table"] == t, "run"].iloc[0]
                                                                .split(": ")[1].split(" / "))]
    r = pr[(pr["table"] == 2) & (pr["variant"] == "pre_trained")].iloc[0]
    assert r["printed:task:Flickr30k"] == "11.73" and r["target_score"] == pytest.approx(0.1173)
    r = pr[(pr["table"] == 1) & (pr["variant"] == "cgm")].iloc[0]
    assert r["printed:pre_avg"] == "64.2 ± 0.03" and r["sd:pre_avg"] == pytest.approx(0.0003)
    assert pf.as_results(paper_df).equals(pr) and pf.as_results(pr) is pr


def test_paper_cells_are_printed_as_in_the_csv():
    """Every `printed:` cell of Tables 1-4 is the CSV's text: the value's digits and its "±"."""
    import csv
    import io
    from importlib import resources
    text = resources.files("cgm_min").joinpath("data", paper.CSV).read_text(encoding="utf-8")
    pr = pf.paper_results()
    for r in csv.DictReader(io.StringIO(text)):
        if r["table"] == "5":
            continue
        col = {"general": f"task:{r['benchmark']}", "target": f"task:{r['benchmark']}", "pre_avg": "pre_avg",
               "hscore": "hscore", "avg": "avg"}[r["role"]]
        row = pr[(pr["table"] == int(r["table"])) & (pr["variant"] == r["method"])].iloc[0]
        assert row[f"printed:{col}"] == (r["value"] + (f" ± {r['std']}" if r["std"] else "")), r


def test_paper_settings_and_counterparts():
    assert pf.paper_setting(1) == {"family": "llava", "target": "OKVQA", "regime": "paper"}
    assert pf.paper_setting(4)["family"] == "qwen"
    minis = [{"family": f, "target": t} for f in ("llava", "qwen") for t in ("corners", "colour_code")]
    assert pf.counterpart(1, minis) == {"family": "llava", "target": "corners"}
    assert pf.counterpart(4, minis) == {"family": "qwen", "target": "colour_code"}
    assert pf.counterpart(2, minis) is None            # Flickr30k: the caption task, not run here
    with pytest.raises(ValueError, match="Table 5"):
        pf.paper_setting(5)


# -- Fig. 1 -----------------------------------------------------------------------------------------------

def test_bars_from_the_paper_are_the_printed_values(paper_df):
    fig, ax = plt.subplots()
    bars = pf.fig1_bars(ax, paper_df, pf.paper_setting(1))
    assert list(bars) == list(pf.MAIN_METHODS)
    for m, b in bars.items():
        heights = [r.get_height() for r in b]
        assert heights == pytest.approx([cell(paper_df, 1, m, c) for c in ("Pre-Avg", "OKVQA", "Hscore")])
        assert matplotlib.colors.to_hex(b[0].get_facecolor()) == method_style(m)[0]
    assert bars["magnitude"][0].get_height() == pytest.approx(54.0)          # as printed (recomputes to 55.2)
    _, std = pf.method_scores(pf.setting_rows(paper_df, pf.paper_setting(1)), ["cgm_dagger"], ["hscore"])
    assert std.loc["cgm_dagger", "hscore"] == pytest.approx(0.12)           # the printed ±
    assert ax.get_legend_handles_labels()[1] == [pf.label(m) for m in pf.MAIN_METHODS]
    plt.close(fig)


def test_bars_from_a_results_table_are_means_over_seeds(table):
    fig, ax = plt.subplots()
    bars = pf.fig1_bars(ax, table, WHERE)
    assert list(bars) == list(METHODS)                                       # the paper's order
    for i, m in enumerate(METHODS):
        rows = [rs.summary_row(scores_of(i, s), TARGET, GENERAL) for s in (0, 1)]
        want = [100 * np.mean([r[c] for r in rows]) for c in ("pre_avg", "target_score", "hscore")]
        assert [r.get_height() for r in bars[m]] == pytest.approx(want)
    _, std = pf.method_scores(table, ["cgm"], ["task:a"])
    assert std.loc["cgm", "task:a"] == pytest.approx(100 * np.std([0.3, 0.32], ddof=1))
    assert ax.get_xticklabels()[1].get_text() == "Target\n(t)"
    plt.close(fig)


# -- Fig. 3 -----------------------------------------------------------------------------------------------

def test_radar_closes_with_one_axis_per_task(table, paper_df):
    fig, axes = plt.subplots(1, 2, subplot_kw={"projection": "polar"})
    lines = pf.fig3_radar(axes[0], table, WHERE, methods=["magnitude", "cgm_dagger"])
    for i, (m, line) in zip((2, 4), lines.items()):
        x, y = line.get_data()
        assert len(x) == 1 + len(GENERAL) + 1 and x[0] == x[-1] and y[0] == y[-1]
        s = [np.mean([scores_of(i, seed)[t] for seed in (0, 1)]) for t in [TARGET, *GENERAL]]
        assert y[:-1] == pytest.approx(100 * np.array(s))
    assert axes[0].get_xticklabels()[0].get_text() == "t\n(target)"
    lines = pf.fig3_radar(axes[1], paper_df, pf.paper_setting(4))
    x, y = lines["cgm_dagger"].get_data()
    assert len(x) == 10 and y[0] == pytest.approx(cell(paper_df, 4, "cgm_dagger", "LaTeX-OCR")) and y[-1] == y[0]
    assert [t.get_text() for t in axes[1].get_xticklabels()][-2:] == ["InfoVQA", "OKVQA"]
    plt.close(fig)


def test_radar_needs_a_polar_axes(table):
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="polar"):
        pf.fig3_radar(ax, table, WHERE)
    plt.close(fig)


# -- Tables 1-5 -------------------------------------------------------------------------------------------

def test_rank_marks_bold_best_underline_second_ties_share():
    v = pd.DataFrame({"x": [1.0, 3.0, 3.0, 2.0, 9.0], "y": [5.0, 4.0, 3.0, np.nan, 0.0]},
                     index=["p", "q", "r", "s", "ref"])
    marks = pf.rank_marks(v, exclude=["ref"])
    assert list(marks["x"]) == ["", "best", "best", "second", ""]
    assert list(marks["y"]) == ["best", "second", "", "", ""]


def test_table_1_marks_the_right_cells(paper_df):
    t = pf.score_table(paper_df, pf.paper_setting(1))
    assert list(t.text.index) == [pf.label(m) for m in pf.MAIN_METHODS]
    assert list(t.text.columns) == [*paper.general_suite()[(1, "LLaVA-1.5-7B", "OKVQA")], "Pre-Avg", "OKVQA",
                                    "Hscore", "Avg"]
    assert t.marks.loc["CGM†", "Hscore"] == "best" and t.marks.loc["CGM", "Hscore"] == "second"
    assert t.marks.loc["CGM†", "Pre-Avg"] == "best"              # Pre-trained's 66.1 is a reference, not ranked
    assert (t.marks.loc[["Pre-trained", "Fine-tuned"]] == "").all().all()
    assert t.text.loc["Magnitude", "Pre-Avg"] == "54.0" and t.text.loc["CGM", "VizWiz"] == "52.3 ± 0"
    md = t.to_markdown()
    assert "**62.8 ± 0.12**" in md and "<u>61.9 ± 0.11</u>" in md
    html = t._repr_html_()
    for css, mark in (("font-weight: bold", "best"), ("text-decoration: underline", "second")):
        want = {(i, j) for i in range(len(t.marks)) for j in range(t.marks.shape[1]) if t.marks.iat[i, j] == mark}
        assert styled_cells(html, css) == want
    assert html.count("<tr") == 10


def styled_cells(html, css):
    """(row, column) of the cells a Styler's HTML gives the CSS declaration `css`."""
    import re
    cells = set()
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", html):
        if css in body:
            cells |= {(int(r), int(c)) for r, c in re.findall(r"_row(\d+)_col(\d+)", selectors)}
    return cells


def test_table_from_a_results_table_is_mean_and_std_over_seeds(table):
    t = pf.score_table(table, WHERE)
    assert list(t.text.columns) == [*GENERAL, "Pre-Avg", TARGET, "Hscore", "Avg"]
    assert t.text.loc["CGM", "a"] == "31.0 ± 1.4"                  # 30 and 32 points
    assert t.marks.loc["CGM†", TARGET] == "best" and t.marks.loc["CGM", TARGET] == "second"
    assert t.marks.loc["Magnitude", "c"] == "best" and t.marks.loc["Pre-trained", "c"] == ""
    assert set(t.marks["b"]) == {"best", ""}                       # all tied at 50: every merge bold


def test_table_5_from_the_paper(paper_df):
    t = pf.ablation_table(paper_df)
    assert list(t.values.columns.get_level_values(0).unique()) == [
        "LLaVA-1.5-7B / OKVQA", "LLaVA-1.5-7B / Flickr30k", "Qwen2.5-VL-3B / LaTeX-OCR"]
    assert t.values[("LLaVA-1.5-7B / OKVQA", "Hscore")].tolist() == [54.0, 53.1, 61.7, 62.8]
    avg = t.marks[("LLaVA-1.5-7B / OKVQA", "Avg")]
    assert avg.iloc[2] == "best" and avg.iloc[3] == "second"      # 65.1 (h_pt alone) above the full 65.0
    assert t.text[("LLaVA-1.5-7B / Flickr30k", "Hscore")].iloc[0] == "53.59"
    assert t.text.index[3] == "CGM†: (h_ft − α h_pt) Δ²"


def test_table_5_from_a_results_table(table):
    rows = [{**base_row(s, v, m), **rs.summary_row({"a": 0.5, "b": 0.5, "c": 0.5, "t": 0.4 + 0.1 * i + 0.01 * s},
                                                   TARGET, GENERAL)}
            for s in (0, 1) for i, (m, v) in enumerate(pf.ABLATION_VARIANTS.items())]
    t = pf.ablation_table(pd.DataFrame(rows), [WHERE])
    assert t.marks[("llava / t", "Hscore")].tolist() == ["", "", "second", "best"]
    h = [100 * rs.summary_row({"a": 0.5, "b": 0.5, "c": 0.5, "t": 0.4 + 0.01 * s}, TARGET, GENERAL)["hscore"]
         for s in (0, 1)]
    assert t.text[("llava / t", "Hscore")].iloc[0] == f"{np.mean(h):.1f} ± {np.std(h, ddof=1):.1f}"
    with pytest.raises(ValueError, match="unknown method 'score: h_ft delta\\^2'"):
        pf.ablation_table(table, [WHERE])


# -- Fig. 4 -----------------------------------------------------------------------------------------------

K, AN, RATIO = (0.1, 0.3, 0.5), (0.1, 1.0), {0: 2.0, 1: 8.0}


def sweep_rows():
    rows = []
    for s in (0, 1):
        for k in K:
            for an in AN:
                sc = {"a": 0.9 - 0.2 * k, "b": 0.8, "c": 0.7, "t": 0.5 + k * an / 2 + 0.02 * s}
                rows.append({**base_row(s, "cgm_dagger", split="validation", k=k, alpha_norm=an,
                                        alpha=an * RATIO[s], scale_ratio=RATIO[s], selected=(k, an) == (0.3, 1.0),
                                        hyperparameters=json.dumps({"alpha_norm": an, "k": k, "per_row": True})),
                             **rs.summary_row(sc, TARGET, GENERAL)})
    return pd.DataFrame(rows)


def test_sensitivity_curves_mean_and_band_over_seeds():
    df = sweep_rows()
    curve, held = pf.sensitivity(df, WHERE, "k")
    assert held == {"alpha_norm": 1.0} and curve["x"].tolist() == list(K) and (curve["seeds"] == 2).all()
    assert curve["target_score"].tolist() == pytest.approx([100 * (0.51 + k / 2) for k in K])
    assert curve["target_score_std"].tolist() == pytest.approx([100 * np.std([0, 0.02], ddof=1)] * 3)
    curve, held = pf.sensitivity(df, WHERE, "alpha_norm")
    assert held == {"k": 0.3} and curve["x"].tolist() == list(AN)
    curve, _ = pf.sensitivity(df, WHERE, "alpha", at=0.5)
    assert curve["x"].tolist() == pytest.approx([an * 4.0 for an in AN])       # geometric mean of 2 and 8
    assert curve["x_low"].tolist() == pytest.approx([an * 2 for an in AN])
    assert curve["x_high"].tolist() == pytest.approx([an * 8 for an in AN])
    with pytest.raises(ValueError, match="no validation rows at k = 0.7"):
        pf.sensitivity(df, WHERE, "alpha", at=0.7)
    with pytest.raises(ValueError, match="unknown parameter 'lam'"):
        pf.sensitivity(df, WHERE, "lam")
    with pytest.raises(ValueError, match="no values for Fig. 4"):
        pf.sensitivity(paper.load_paper_tables(), WHERE)


def test_fig4_draws_the_curves_and_the_papers_findings():
    fig, axes = plt.subplots(1, 2)
    pf.fig4_sensitivity(axes[0], sweep_rows(), WHERE, "k")
    pf.fig4_sensitivity(axes[1], sweep_rows(), WHERE, "alpha", findings=False)
    assert len(axes[0].get_lines()) == 3 and axes[1].get_xscale() == "log"
    assert [t.get_text().replace("\n", " ") for t in axes[0].texts] == [pf.PAPER_FIG4_FINDINGS["k"]]
    assert not axes[1].texts
    plt.close(fig)


# -- Figs. 5 and 6 ----------------------------------------------------------------------------------------

@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    w_pt, w_ft = torch.randn(16, 40, generator=g), torch.randn(16, 40, generator=g)
    h_pt, h_ft = torch.rand(16, 40, generator=g), torch.rand(16, 40, generator=g)
    return w_pt, w_ft, h_pt, h_ft


def test_masks_of_a_checkpoint_pair(pair):
    w_pt, w_ft, h_pt, h_ft = pair
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    inputs = MergeInputs(activations={"weight": ActivationStats((x ** 2).sum(0), x.T @ x, 64)})
    masks = pf.reversion_masks(w_pt, w_ft, {"cgm_dagger": {"alpha": 1.0, "k": 0.1}, "magnitude": {"k": 0.1},
                                            "model_tailor": {"k": 0.1}}, h_pt, h_ft, inputs)
    count = cgm.revert_count(40, 0.1)
    assert (masks["magnitude"].sum(1) == count).all() and (masks["cgm_dagger"].sum(1) == count).all()
    assert torch.equal(masks["cgm_dagger"], cgm.select_lowest(cgm.hard_mix_score(w_pt, w_ft, h_pt, h_ft, 1.0), 0.1))
    assert torch.equal(masks["magnitude"], cgm.select_lowest((w_pt - w_ft) ** 2, 0.1))
    assert int(masks["model_tailor"].sum()) == cgm.revert_count(16 * 40, 0.1)    # one block of 40 columns
    with pytest.raises(ValueError, match="needs h_pt and h_ft"):
        pf.reversion_masks(w_pt, w_ft, {"cgm_dagger": {"alpha": 1.0, "k": 0.1}})


@pytest.mark.parametrize("k", [0.1, 0.3, 0.5])
def test_column_recovery_of_magnitude_averages_to_k(pair, k):
    w_pt, w_ft, _, _ = pair
    mask = pf.reversion_masks(w_pt, w_ft, {"magnitude": {"k": k}})["magnitude"]
    want = cgm.revert_count(40, k) / 40
    assert abs(want - k) <= 1 / 80
    for block in (1, 4, 8):                       # 40 columns: equal blocks, so the mean of blocks is the mean
        rec = pf.column_recovery(mask, block)
        assert len(rec) == 40 // block and rec.mean() == pytest.approx(want)
        assert ((rec >= 0) & (rec <= 1)).all()
    assert pf.column_recovery(mask, 1) == pytest.approx(mask.double().mean(0).numpy())


def test_patch_average_and_spread():
    m = torch.zeros(5, 6, dtype=torch.bool)
    m[:, 0] = True
    m[4, 5] = True
    avg = pf.patch_average(m, 2)
    assert avg.shape == (3, 3)
    assert avg[0].tolist() == [0.5, 0.0, 0.0] and avg[2].tolist() == [0.5, 0.0, 0.5]   # the last row: 1 x 2 patches
    assert pf.column_spread(np.full(10, 0.3))["std over blocks"] == pytest.approx(0.0)
    s = pf.column_spread(np.array([1.0] + [0.0] * 9))
    assert s["share in top 10% of blocks"] == 1.0


def test_fig5_and_fig6_draw_the_masks(pair):
    w_pt, w_ft, h_pt, h_ft = pair
    masks = pf.reversion_masks(w_pt, w_ft, {"cgm_dagger": {"alpha": 1.0, "k": 0.3}, "magnitude": {"k": 0.3}},
                               h_pt, h_ft)
    fig, axes = plt.subplots(1, 2)
    img = pf.fig5_mask(axes[0], masks["cgm_dagger"], "cgm_dagger", patch=4)
    assert np.allclose(img.get_array(), pf.patch_average(masks["cgm_dagger"], 4))
    assert axes[0].get_title().startswith("CGM†: 30.0% reverted")
    rec = pf.fig6_recovery(axes[1], masks, 0.3, block=4)
    assert set(rec) == {"cgm_dagger", "magnitude"} and len(rec["magnitude"]) == 10
    assert axes[1].get_lines()[-1].get_ydata()[0] == 0.3                          # the budget line
    plt.close(fig)


# -- claims -----------------------------------------------------------------------------------------------

def test_claims_beside_the_figures():
    from cgm_min.experiments.regimes import CLAIMS
    statuses = {c["id"]: "not reproduced" if c["id"] == "k_flat" else "reproduced in miniature" for c in CLAIMS}
    t = pf.claims_beside(statuses)
    assert list(t.index) == [c["id"] for c in CLAIMS] and t.loc["k_flat", "paper"] == "Fig. 4"
    assert "fig-paper-masks" in t.loc["bands", "figures here"]
    assert "disagrees" in pf.agreement(["k_flat"], statuses)
    assert "disagrees" not in pf.agreement(["mitigates"], statuses)
    with pytest.raises(ValueError, match="no status for claim 'bands'"):
        pf.claims_beside({k: v for k, v in statuses.items() if k != "bands"})


# -- errors: one line naming what is wrong ----------------------------------------------------------------

@pytest.mark.parametrize("column", ["hscore", "variant", "split", "target_score"])
def test_a_missing_column_is_named(table, column):
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match=f"'{column}'") as err:
        pf.fig1_bars(ax, table.drop(columns=[column]), WHERE)
    assert "\n" not in str(err.value)
    plt.close(fig)


def test_a_missing_column_is_named_by_every_function(table):
    fig, ax = plt.subplots(subplot_kw={"projection": "polar"})
    with pytest.raises(ValueError, match="'seed'"):
        pf.fig3_radar(ax, table.drop(columns=["seed"]), WHERE)
    with pytest.raises(ValueError, match="'task:zz'"):
        pf.method_scores(table, ["cgm"], ["task:c", "task:zz"])
    with pytest.raises(ValueError, match="'alpha_norm'"):
        pf.sensitivity(sweep_rows().drop(columns=["alpha_norm"]), WHERE)
    with pytest.raises(ValueError, match="'hyperparameters'"):
        pf.run_masks(table.drop(columns=["hyperparameters"]), WHERE, "no-cache", 0.1)
    with pytest.raises(ValueError, match="'avg'"):
        pf.score_table(table.drop(columns=["avg"]), WHERE)
    with pytest.raises(ValueError, match="'family'"):
        pf.fig1_bars(plt.subplots()[1], table.drop(columns=["family"]), WHERE)
    plt.close("all")


def test_an_unknown_method_is_named(table, paper_df):
    fig, ax = plt.subplots()
    for call in (lambda: pf.fig1_bars(ax, table, WHERE, methods=["cgm", "ties"]),
                 lambda: pf.score_table(table, WHERE, methods=["ties"]),
                 lambda: pf.fig1_bars(ax, paper_df, pf.paper_setting(1), methods=["linear"]),
                 lambda: pf.sensitivity(sweep_rows(), WHERE, variant="ties"),
                 lambda: pf.run_masks(sweep_rows(), WHERE, "no-cache", 0.1, variants=("ties",))):
        with pytest.raises(ValueError, match="unknown method '(ties|linear)'") as err:
            call()
        assert "\n" not in str(err.value)
    plt.close(fig)


def test_a_selection_must_name_one_setting(table):
    both = pd.concat([table, table.assign(regime="whole")], ignore_index=True)
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="differ in \\['regime'\\]; add 'regime'"):
        pf.fig1_bars(ax, both, WHERE)
    pf.fig1_bars(ax, both, {**WHERE, "regime": "whole"})
    with pytest.raises(ValueError, match="no rows for"):
        pf.fig1_bars(ax, table, {"family": "qwen"})
    with pytest.raises(ValueError, match="'colour'"):
        pf.fig1_bars(ax, table, {"colour": "red"})
    plt.close(fig)
