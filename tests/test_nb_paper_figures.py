"""Checks on notebooks/06_paper_figures.md (the paper's figures and tables) executed at preset tiny: the
figures are written, the paper's panels show the paper's printed numbers, ours the merge chapter's results
table, the claims are the merge chapter's, and the masks revert what their budget says."""
from __future__ import annotations

import json

import pytest

from cgm_min import cgm
from cgm_min.experiments import paper, results, sweep
from cgm_min.experiments import paper_figures as pf

NB = "06_paper_figures"
RESULTS = "05_merging_experiment"


@pytest.fixture(scope="module")
def m(notebook_metrics):
    return notebook_metrics(NB)


@pytest.fixture(scope="module")
def table(merge_results, m):
    return merge_results


def test_figures_are_written(tiny_run, m):
    assert len(m["figures"]) == 6
    for name in m["figures"]:
        assert name.startswith("fig-paper-")
        assert (tiny_run / "results" / NB / f"{name}.png").stat().st_size > 10_000, name


def test_the_papers_bars_are_its_printed_table_1(m):
    df = paper.load_paper_tables()
    t1 = df[df["table"] == 1].set_index(["method", "benchmark"])["value"]
    assert set(m["paper_bars"]) == set(pf.MAIN_METHODS)          # metrics.json sorts its keys
    for method, bars in m["paper_bars"].items():
        assert bars["pre_avg"] == pytest.approx(t1[method, "Pre-Avg"])
        assert bars["target_score"] == pytest.approx(t1[method, "OKVQA"])
        assert bars["hscore"] == pytest.approx(t1[method, "Hscore"])


def test_our_bars_are_the_heldout_means_of_the_results_table(m, table):
    held = table[(table["split"] == "heldout") & (table["control"] == "") & (table["regime"] == "default")
                 & (table["curvature"] == "fisher_during")]
    assert set(m["bars"]) == {f"{f}/{t}" for f, t in held[["family", "target"]].drop_duplicates().itertuples(index=False)}
    for setting, bars in m["bars"].items():
        family, target = setting.split("/")
        g = held[(held["family"] == family) & (held["target"] == target)].groupby("variant")
        for method, v in bars.items():
            assert v["hscore"] == pytest.approx(100 * g["hscore"].mean()[method], abs=1e-4)


def test_tables_mark_the_best_merge(m):
    assert m["table_best"]["paper 1"]["Hscore"] == ["CGM†"]
    assert m["table_best"]["paper 1"]["Pre-Avg"] == ["CGM†"]         # pre-trained's 66.1 is not ranked
    for key, best in m["table_best"].items():
        for column, rows in best.items():
            assert rows and "Pre-trained" not in rows and "Fine-tuned" not in rows, (key, column)
    assert len(m["ablation"]) == 2 * len(m["settings"])


def test_claims_are_read_from_the_merge_chapter(m, notebook_metrics):
    assert m["claims"] == notebook_metrics(RESULTS)["claims"]


def test_recomputation_notes(m):
    assert m["mismatches"] == len(paper.mismatches()) == len(paper.KNOWN_MISMATCHES)
    assert m["lost_values"] == len(paper.lost_values()) > 0


def test_sensitivity_has_every_grid_point(m, table):
    val = table[(table["split"] == "validation") & (table["variant"] == "cgm_dagger") & (table["control"] == "")
                & (table["regime"] == "default") & (table["curvature"] == "fisher_during")]
    for setting, curves in m["sensitivity"].items():
        assert curves["k"]["x"] == sorted(val["k"].unique().tolist())
        assert curves["alpha_norm"]["x"] == sorted(val["alpha_norm"].unique().tolist())
        assert all(0 <= h <= 100 for h in curves["k"]["hscore"])


def test_masks_revert_their_budget(m):
    for family, masks in m["masks"].items():
        rows, cols = masks["shape"]
        assert "self_attn.o_proj" in masks["weight"] and masks["k"] == 0.1
        assert masks["expected"] == cgm.revert_count(cols, 0.1) / cols
        assert masks["fraction"]["magnitude"] == masks["fraction"]["cgm_dagger"] == masks["expected"]
        # Model Tailor: round(k n) per block of 128 input columns
        assert masks["fraction"]["model_tailor"] == pytest.approx(0.1, abs=1 / (rows * min(cols, 128)))


def test_recovery_of_magnitude_averages_to_k(m):
    for family, by_k in m["recovery"].items():
        assert sorted(float(k) for k in by_k) == [0.1, 0.3, 0.5]
        for k, rec in by_k.items():
            cols = m["masks"][family]["shape"][1]
            for variant in ("magnitude", "cgm_dagger"):
                assert rec[variant]["mean"] == pytest.approx(rec[variant]["fraction"])
                assert rec[variant]["fraction"] == cgm.revert_count(cols, float(k)) / cols


def test_run_masks_are_the_masks_of_the_rebuilt_merge(tiny_run, m, table):
    """At a row's own budget, `run_masks` is the mask of `sweep.rebuild_merge` of that row."""
    from cgm_min.experiments import runs
    cache = tiny_run / "cache"
    where = {"family": "llava", "target": "corners", "regime": "default", "curvature": "fisher_during"}
    d = pf.setting_rows(table, where, "validation")
    d = d[d["seed"] == d["seed"].min()]
    row = d[(d["variant"] == "magnitude") & d["selected"]].iloc[0]
    k = json.loads(row["hyperparameters"])["k"]
    name, masks = pf.run_masks(table, where, cache, k, variants=("magnitude",))
    w_pt, _, _ = runs.merge_states(sweep.spec_of(row), cache)
    merged = sweep.rebuild_merge(row, cache)[name]
    assert name == m["masks"]["llava"]["weight"]
    assert masks["magnitude"].equal(merged == w_pt[name])
