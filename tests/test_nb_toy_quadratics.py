"""Checks on notebooks/01_toy_quadratics at preset `tiny`: each step of the derivation holds numerically.

Where possible the notebook's numbers are compared with values recomputed here from the toy problem it
stores (metrics["toy"]), so a wrong notebook cannot pass by being consistent with itself.
"""
from __future__ import annotations

import numpy as np
import pytest

NAME = "01_toy_quadratics"


@pytest.fixture(scope="module")
def m(notebook_metrics):
    return notebook_metrics(NAME)


@pytest.fixture(scope="module")
def toy(m):
    t = m["toy"]
    return {k: (np.asarray(v, dtype=float) if k != "alpha" else float(v)) for k, v in t.items()}


def test_required_keys(m):
    required = {"ratio_max_abs_err_vs_optimizer", "closed_form_diag_vs_soft_mix_max_abs_err", "cgm_joint_loss",
                "straight_path_min_joint_loss", "pareto_dominated_count", "straight_path_dominated_fraction",
                "rotation_theta_deg", "rotation_excess_loss", "random_quadratics_max_err", "alpha_grid"}
    assert required <= set(m), sorted(required - set(m))
    assert m["preset"] == "tiny"


def test_taylor_expansion_exact_for_quadratics(m):
    # Assumption A holds exactly, the Hessian is the diagonal put in, and the quadratic model has no remainder
    assert m["grad_at_optimum_max_abs"] < 1e-12
    assert m["hessian_vs_diag_max_abs_err"] < 1e-12
    assert m["taylor_max_abs_remainder"] < 1e-9      # losses at the test points are O(100): relative 1e-11


def test_per_entry_objective_equals_joint(m):
    assert m["per_entry_vs_joint_max_abs_err"] < 1e-10


def test_ratio_matches_numerical_optimizer(m):
    assert m["ratio_max_abs_err_vs_optimizer"] < 1e-6
    assert m["closed_form_diag_vs_soft_mix_max_abs_err"] < 1e-12


def test_cgm_point_is_eq8(m, toy):
    s = toy["h_ft"] + toy["alpha"] * toy["h_pt"]
    lam = toy["alpha"] * toy["h_pt"] / s
    np.testing.assert_allclose(m["lam"], lam, atol=1e-12)
    assert all(0.0 <= x <= 1.0 for x in m["lam"])
    np.testing.assert_allclose(m["cgm_point"], toy["w_ft"] + lam * (toy["w_pt"] - toy["w_ft"]), atol=1e-12)


def test_cgm_joint_loss_matches_minimum_value(m, toy):
    # Proposition prop-ratio: each weight contributes 1/2 delta^2 alpha h_ft h_pt / (h_ft + alpha h_pt)
    a, d = toy["alpha"], toy["w_pt"] - toy["w_ft"]
    expected = np.sum(0.5 * d ** 2 * a * toy["h_ft"] * toy["h_pt"] / (toy["h_ft"] + a * toy["h_pt"]))
    assert m["cgm_joint_loss"] == pytest.approx(expected, rel=1e-10)


def test_cgm_beats_every_point_of_straight_path(m, toy):
    assert m["cgm_beats_every_path_point"] is True
    assert m["cgm_joint_loss"] < m["straight_path_min_joint_loss"]
    # the path's minimum, in closed form: 1/2 [t^2 A + alpha (1-t)^2 B] is smallest at 1/2 alpha A B / (A + alpha B)
    a, d = toy["alpha"], toy["w_pt"] - toy["w_ft"]
    A, B = np.sum(toy["h_ft"] * d ** 2), np.sum(toy["h_pt"] * d ** 2)
    exact = 0.5 * a * A * B / (A + a * B)
    assert exact * (1 - 1e-12) <= m["straight_path_min_joint_loss"] <= exact * (1 + 1e-3)   # path grid: from above
    # the example is built so that the gap is large, not a rounding effect
    assert m["cgm_to_straight_ratio"] == pytest.approx(m["cgm_joint_loss"] / m["straight_path_min_joint_loss"])
    assert m["cgm_to_straight_ratio"] < 0.5


def test_alpha_grid_is_log_spaced_over_decades(m):
    a = np.asarray(m["alpha_grid"])
    assert len(a) >= 10 and np.all(a > 0)
    assert np.allclose(np.diff(np.log10(a)), np.diff(np.log10(a))[0])
    assert np.log10(a[-1] / a[0]) >= 4


def test_alpha_sweep_is_pareto_front(m):
    assert m["pareto_candidates"] > 1000
    assert m["pareto_dominated_count"] == 0
    # weighted-sum certificate: no candidate has a lower l_ft + alpha * l_pt than the CGM point of that alpha
    assert m["pareto_weighted_sum_min_gap"] >= -1e-10
    # along the front, raising alpha trades fine-tuning loss for pre-training loss (exercise ex-toy-monotone)
    p, f = np.asarray(m["pareto_curve_pt_loss"]), np.asarray(m["pareto_curve_ft_loss"])
    assert len(p) == len(m["alpha_grid"])
    assert np.all(np.diff(p) < 0) and np.all(np.diff(f) > 0)


def test_straight_path_is_dominated(m):
    assert m["straight_path_dominated_fraction"] == 1.0


def test_rotation_sweep(m):
    th = np.asarray(m["rotation_theta_deg"])
    ex = np.asarray(m["rotation_excess_loss"])
    assert th[0] == 0.0 and th[-1] == 90.0 and len(th) == len(ex) >= 5
    assert abs(ex[0]) < 1e-12 and abs(ex[-1]) < 1e-12          # diagonal Hessians: the diagonal rule is exact
    assert np.all(ex >= -1e-12)                                 # the full-Hessian optimum is never beaten
    inner = ex[(th > 0) & (th < 90)]
    assert np.all(inner > 1e-3)                                 # any tilt costs something
    assert ex.max() > m["rotation_full_joint_loss"][0]          # and at worst more than the optimum's own loss
    # growth while the axes tilt towards 45 degrees
    first_half = ex[th <= 45]
    assert np.all(np.diff(first_half) > 0)
    assert th[np.argmax(ex)] == pytest.approx(45.0)


def test_random_quadratics_closed_form_matches_optimizer(m):
    assert m["random_quadratics_n"] >= 5
    assert min(m["random_quadratics_dims"]) >= 5
    assert m["random_quadratics_max_err"] < 1e-6
    # with non-diagonal Hessians the diagonal rule cannot beat the exact minimiser
    assert m["random_quadratics_diag_excess_rel_min"] >= -1e-9
