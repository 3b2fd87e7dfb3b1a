"""Checks on notebooks/05_merging_experiment.md (the merge experiment) executed at preset tiny: the results
table, the lmms-eval re-scoring, the equivalences, the controls, and the claims list."""
from __future__ import annotations

import math

import pytest

NB = "05_merging_experiment"
STATUSES = {"reproduced in miniature", "not reproduced", "mixed", "not testable here"}
VERDICTS = {"better", "worse", "not separated"}

@pytest.fixture(scope="module")
def m(notebook_metrics):
    return notebook_metrics(NB)

@pytest.fixture(scope="module")
def table(merge_results, m):
    return merge_results

def test_results_table_has_every_method_chosen_and_reported(table, m):
    main = table[(table["regime"] == "default") & (table["curvature"] == "fisher_during") & (table["control"] == "")]
    variants = set(main["variant"])
    assert {"linear", "ties", "dare", "magnitude", "random_revert", "wanda", "model_tailor", "grafting", "cgm",
            "cgm_dagger", "cgm_dagger (global)"} <= variants
    assert set(main["family"]) == set(m["families"]) and set(main["target"]) == set(m["targets"])
    held = main[main["split"] == "heldout"]
    for (run, variant), g in held.groupby(["run", "variant"]):
        assert len(g) == 1, (run, variant)                     # exactly one chosen configuration, reported
    assert held.groupby("run")["variant"].nunique().min() == len(variants)

def test_lmms_eval_rescoring_agrees_with_the_fast_scorer(m):
    assert m["lmms_rescored"] >= 10
    assert m["lmms_vs_fast_max_abs_diff"] <= 1 / 100          # greedy decoding = teacher forcing

def test_equivalences_hold_on_a_real_run(m):
    assert len(m["equivalence_gaps"]) == 5
    assert all(g < 1e-5 for g in m["equivalence_gaps"].values())

def test_positive_control_oracle_separates_clearly(m):
    """With the known answer as curvature the engine must let CGM and CGM-dagger beat random reversion."""
    oracle = {k: v for k, v in m["positive_control"].items() if k.endswith("/oracle")}
    assert oracle
    for v in oracle.values():
        assert v["cgm - random"] >= 0.03 and v["cgm_dagger - random"] >= 0.03, v

def test_comparisons_and_claims_are_complete(m):
    comps = m["comparisons_main"]
    assert comps and {c["verdict"] for c in comps} <= VERDICTS
    for c in comps:
        assert c["ci_low"] <= c["mean"] <= c["ci_high"]
    assert set(m["claims"].values()) <= STATUSES
    assert m["claims"]["fisher_merging"] == "reproduced in miniature"
    assert len(m["regime_map"]) >= 2 and {r["regime"] for r in m["regime_map"]} >= {"default", "whole"}

def test_quadratic_check_and_noise_floor_are_measured(m):
    for r in m["quadratic_check"]:
        assert -1 <= r["spearman general"] <= 1 and math.isfinite(r["w_ft: measured general-loss increase"])
    neg = [r for r in m["noise_floor"] if r["control"].startswith("negative")]
    assert neg and all(r["mean |difference|"] >= 0 for r in neg)

def test_figures_are_written(tiny_run):
    folder = tiny_run / "results" / NB
    for name in ("fig-merge-fronts", "fig-merge-paired", "fig-merge-quadratic"):
        assert (folder / f"{name}.png").stat().st_size > 10_000, name
