"""Checks on notebooks/03_curvature.md (executed at the `tiny` preset): the curvature estimators against
brute force and the exact Hessian of a small digits classifier, and the sample-size merge experiment."""
from __future__ import annotations

import numpy as np
import pytest

NAME = "03_curvature"


@pytest.fixture(scope="module")
def m(notebook_metrics):
    return notebook_metrics(NAME)


def test_diag_fisher_matches_an_explicit_per_sample_loop(m):
    # cgm.diag_fisher accumulates in float32; the loop in float64. Anything above 1e-5 is a real bug.
    assert m["fisher_vs_loop_max_rel_err"] < 1e-5


def test_squaring_batch_gradients_is_not_the_empirical_fisher(m):
    by_b = m["fisher_vs_batchgrad"]
    # B = 1 is the per-sample Fisher itself (up to float32 rounding) ...
    assert by_b["1"]["relative difference"] < 1e-5
    # ... larger batches are far from it, mostly by a factor ~1/B in scale near the optimum
    assert m["fisher_vs_batchgrad_rel_diff"] == by_b["32"]["relative difference"]
    assert m["fisher_vs_batchgrad_rel_diff"] > 0.5
    for b in ("8", "32", "128"):
        assert 0.5 < by_b[b]["B x sum ratio"] < 2.5, (b, by_b[b])
    # the rank agreement degrades as fewer batches are averaged
    assert by_b["128"]["Spearman with per-sample"] < by_b["8"]["Spearman with per-sample"]


def test_fisher_ranks_like_the_hessian_at_the_optimum_but_not_at_initialisation(m):
    assert m["corr_fisher_exact_at_opt"] > 0.95
    assert m["corr_fisher_exact_away"] < m["corr_fisher_exact_at_opt"] - 0.15
    by_t = m["corr_fisher_exact_by_t"]
    assert len(by_t) == len(m["path_t"]) and m["path_t"][0] == 0.0 and m["path_t"][-1] == 1.0
    assert by_t[0] == m["corr_fisher_exact_away"] and by_t[-1] == m["corr_fisher_exact_at_opt"]
    # far from the optimum the Hessian diagonal has many negative entries, which no Fisher can represent
    assert m["negative_exact_diag_away"] > 2 * m["negative_exact_diag_at_opt"]


def test_fisher_is_compressed_at_the_optimum(m):
    # confident samples add (1-p)^2 to the Fisher but p(1-p) to the Hessian: the Fisher is much smaller in
    # total and falls off faster than the Hessian for small entries (log-log slope > 1)
    assert m["fisher_over_exact_sum_at_opt"] < 0.5
    assert m["fisher_exact_loglog_slope_at_opt"] > 1.05


def test_initialisation_gap_comes_from_the_residual_term(m):
    # at initialisation the Fisher ranks like the Gauss-Newton diagonal; the Gauss-Newton diagonal is what
    # differs from the Hessian (the residual term of the Gauss-Newton split)
    assert m["corr_fisher_gauss_newton_away"] > 0.9
    assert m["corr_fisher_gauss_newton_away"] > m["corr_gauss_newton_exact_away"] + 0.15


def test_hutchinson_error_shrinks_like_one_over_sqrt_probes(m):
    probes, err, pred = (np.array(m[k], dtype=float) for k in
                         ("hutchinson_probes", "hutchinson_rel_err", "hutchinson_rel_err_predicted"))
    assert len(probes) == len(err) == len(pred) >= 4
    assert np.all(np.diff(err) < 0), err
    assert -0.65 < m["hutchinson_loglog_slope"] < -0.35
    # where the repeats average out, the measured error matches the formula computed from the full Hessian
    many = probes >= 16
    assert np.all(np.abs(err[many] / pred[many] - 1) < 0.25), (err, pred)
    # 16x more probes -> about 4x smaller error
    assert 2.5 < err[0] / err[probes == 16 * probes[0]][0] < 6.5


def test_hutchinson_ranks_like_the_hessian_at_the_optimum(m):
    assert m["corr_hutchinson_exact_at_opt"] > 0.9


def test_fine_tuning_forgets_and_the_merge_recovers(m):
    assert m["pt_general_acc"] > 0.9 and m["pt_target_acc"] < 0.1
    assert m["ft_target_acc"] > 0.9 and m["ft_general_acc"] < 0.2
    # CGM with full-data curvature recovers part of both tasks
    assert m["merged_full_general_acc"] > m["ft_general_acc"] + 0.3
    assert m["merged_full_target_acc"] > m["pt_target_acc"] + 0.3
    assert m["merged_full_hscore"] > 0.4


def test_sample_size_sweep(m):
    n = m["samples_grid"]
    assert n == sorted(n) and len(n) >= 3
    for key in ("merged_general_acc", "merged_target_acc", "merged_hscore",
                "merged_general_acc_scaled_alpha", "merged_hscore_scaled_alpha"):
        assert len(m[key]) == len(n), key
        assert all(0.0 <= v <= 1.0 for v in m[key]), key
    # with the largest calibration set the merge recovers general digits that fine-tuning had erased
    assert m["merged_general_acc"][-1] > m["ft_general_acc"] + 0.2


def test_curvature_scale(m):
    # h_ft (at a less converged w_ft) is larger in total than h_pt, and the useful alpha is far below the
    # alpha that weighs the two losses equally in total curvature
    assert m["scale_ratio"] > 1
    assert m["alpha"] < m["scale_ratio"] / 10
    assert np.isclose(m["scale_ratio"], m["sum_h_ft"] / m["sum_h_pt"], rtol=1e-6)
    # squaring batch gradients (B = 32) shrinks h_pt, and so inflates the ratio, by about the batch size
    assert 32 / 3 < m["scale_ratio_batchgrad_h_pt"] / m["scale_ratio"] < 32 * 3
