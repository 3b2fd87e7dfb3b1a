"""The mixing half of cgm_min.cgm, checked against independent references:

* the full-Hessian closed form against scipy's optimiser on random non-diagonal SPD quadratics;
* the Eq. 8 ratio against its formula and its properties (range, monotonic in alpha, scale invariance,
  the rule for entries without curvature);
* CGM-dagger against brute-force enumeration of the budgeted binary problem, per row and global;
* deterministic tie-breaking, the budget rounding, dtype handling, and cgm_merge on state dicts.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cgm_min import cgm
from cgm_min.cgm import (cgm_merge, closed_form, hard_mix, hard_mix_score, revert_count, revert_ratio,
                         select_lowest, soft_mix)

F64 = torch.float64


def random_spd(d: int, gen: torch.Generator, cond: float = 50.0) -> torch.Tensor:
    """A random symmetric positive-definite (d, d) matrix with dense off-diagonal entries and eigenvalues
    spread over [1/cond, 1] in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    eig = torch.logspace(0, -np.log10(cond), d, dtype=F64)
    H = q @ torch.diag(eig) @ q.T
    return (H + H.T) / 2


def joint_loss(w, w_pt, w_ft, H_pt, H_ft, alpha):
    """Eq. 5 with full Hessians, in numpy, for scipy."""
    a, b = w - w_ft, w - w_pt
    return 0.5 * a @ H_ft @ a + 0.5 * alpha * b @ H_pt @ b


def joint_grad(w, w_pt, w_ft, H_pt, H_ft, alpha):
    return H_ft @ (w - w_ft) + alpha * H_pt @ (w - w_pt)


def diag_joint_loss(w, w_pt, w_ft, h_pt, h_ft, alpha):
    """Eq. 5 with diagonal curvature, summed over entries (float64)."""
    w, w_pt, w_ft, h_pt, h_ft = (t.to(F64) for t in (w, w_pt, w_ft, h_pt, h_ft))
    return float((0.5 * h_ft * (w - w_ft) ** 2 + 0.5 * alpha * h_pt * (w - w_pt) ** 2).sum())


def random_inputs(shape, seed, dtype=torch.float32, zero_frac=0.0):
    """w_pt, w_ft, h_pt, h_ft with curvature spread over several orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    w_pt = torch.randn(shape, generator=g, dtype=F64)
    w_ft = w_pt + 0.1 * torch.randn(shape, generator=g, dtype=F64)
    h_pt = torch.exp(2 * torch.randn(shape, generator=g, dtype=F64))
    h_ft = torch.exp(2 * torch.randn(shape, generator=g, dtype=F64))
    if zero_frac:
        h_pt[torch.rand(shape, generator=g) < zero_frac] = 0
        h_ft[torch.rand(shape, generator=g) < zero_frac] = 0
    return tuple(t.to(dtype) for t in (w_pt, w_ft, h_pt, h_ft))


# ----------------------------------------------------------------------------------------------
# closed_form: the minimiser of the joint quadratic with full Hessians.

@pytest.mark.parametrize("d", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 30.0, 1e3])
def test_closed_form_matches_scipy_on_spd_quadratics(d, seed, alpha):
    gen = torch.Generator().manual_seed(1000 * d + seed)
    H_pt, H_ft = random_spd(d, gen), random_spd(d, gen)
    assert (H_pt - torch.diag(torch.diagonal(H_pt))).abs().max() > 1e-2   # really non-diagonal
    w_pt, w_ft = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    w = closed_form(w_pt, w_ft, H_pt, H_ft, alpha)

    args = tuple(t.numpy() for t in (w_pt, w_ft, H_pt, H_ft)) + (alpha,)
    # Stationarity: the gradient of the joint loss vanishes at the closed form.
    g = joint_grad(w.numpy(), *args)
    scale = np.linalg.norm((H_ft + alpha * H_pt).numpy(), 2) * np.linalg.norm((w_pt - w_ft).numpy())
    assert np.linalg.norm(g) <= 1e-10 * scale
    # An independent numerical optimiser, started at w_ft, ends at the same point and the same loss.
    res = minimize(joint_loss, w_ft.numpy(), args=args, jac=joint_grad, method="BFGS",
                   options={"gtol": 1e-12 * scale, "maxiter": 10_000})
    np.testing.assert_allclose(w.numpy(), res.x, atol=1e-6 * (1 + np.abs(res.x).max()))
    assert joint_loss(w.numpy(), *args) <= res.fun + 1e-12 * (1 + abs(res.fun))
    # And it is a strict minimum: random perturbations all raise the loss.
    f0 = joint_loss(w.numpy(), *args)
    for e in np.random.default_rng(seed).normal(size=(20, d)) * 1e-3:
        assert joint_loss(w.numpy() + e, *args) > f0


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_endpoints_in_alpha(seed):
    """alpha = 0 returns w_ft; a very large alpha approaches w_pt."""
    gen = torch.Generator().manual_seed(seed)
    H_pt, H_ft = random_spd(4, gen), random_spd(4, gen)
    w_pt, w_ft = torch.randn(4, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    torch.testing.assert_close(closed_form(w_pt, w_ft, H_pt, H_ft, 0.0), w_ft, rtol=0, atol=1e-12)
    torch.testing.assert_close(closed_form(w_pt, w_ft, H_pt, H_ft, 1e9), w_pt, rtol=0, atol=1e-6)


def test_closed_form_uses_the_symmetric_part():
    """x^T H x only sees (H + H^T)/2: adding an antisymmetric part to a Hessian changes nothing."""
    gen = torch.Generator().manual_seed(5)
    H_pt, H_ft = random_spd(4, gen), random_spd(4, gen)
    S = torch.randn(4, 4, generator=gen, dtype=F64)
    w_pt, w_ft = torch.randn(4, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    torch.testing.assert_close(closed_form(w_pt, w_ft, H_pt + (S - S.T), H_ft + 2 * (S.T - S), 0.7),
                               closed_form(w_pt, w_ft, H_pt, H_ft, 0.7), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 50.0])
def test_soft_mix_equals_closed_form_for_diagonal_hessians(seed, alpha):
    w_pt, w_ft, h_pt, h_ft = random_inputs(7, seed, F64)
    soft = soft_mix(w_pt, w_ft, h_pt, h_ft, alpha)
    # (d,) vectors mean diagonal matrices
    torch.testing.assert_close(closed_form(w_pt, w_ft, h_pt, h_ft, alpha), soft, rtol=0, atol=1e-12)
    # explicit diagonal matrices go through the linear solve
    if alpha > 0:
        torch.testing.assert_close(closed_form(w_pt, w_ft, torch.diag(h_pt), torch.diag(h_ft), alpha), soft,
                                   rtol=1e-10, atol=1e-12)
    # and both equal the per-entry minimiser (h_ft w_ft + alpha h_pt w_pt) / (h_ft + alpha h_pt)
    ref = (h_ft * w_ft + alpha * h_pt * w_pt) / (h_ft + alpha * h_pt)
    torch.testing.assert_close(soft, ref, rtol=1e-12, atol=1e-12)


def test_closed_form_diagonal_float32_vectors_with_zero_curvature():
    """Vectors with entries of zero curvature follow soft_mix's documented rule."""
    w_pt, w_ft = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 0.0])
    h_pt, h_ft = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    alpha = 3.0
    out = closed_form(w_pt, w_ft, h_pt, h_ft, alpha)
    torch.testing.assert_close(out, torch.tensor([alpha / (1 + alpha) * 1.0, 2.0, 0.0]))


# ----------------------------------------------------------------------------------------------
# revert_ratio (Eq. 8) and soft_mix.

def test_revert_ratio_formula_and_range():
    _, _, h_pt, h_ft = random_inputs((6, 9), seed=3, dtype=F64, zero_frac=0.2)
    for alpha in [0.0, 1e-3, 0.2, 1.0, 7.5, 1e4]:
        lam = revert_ratio(h_pt, h_ft, alpha)
        assert lam.shape == h_pt.shape and lam.dtype == F64
        assert torch.isfinite(lam).all() and (lam >= 0).all() and (lam <= 1).all()
        den = h_ft + alpha * h_pt
        has = den > 0
        torch.testing.assert_close(lam[has], (alpha * h_pt / den)[has], rtol=1e-14, atol=0)


def test_revert_ratio_minimises_the_per_entry_objective():
    """Eq. 7: l(lam) = 1/2 delta^2 [h_ft lam^2 + alpha h_pt (lam - 1)^2] is minimal at lam."""
    _, _, h_pt, h_ft = random_inputs(50, seed=4, dtype=F64)
    alpha = 0.7
    lam = revert_ratio(h_pt, h_ft, alpha)
    grid = torch.linspace(0, 1, 2001, dtype=F64)[:, None]
    loss = lambda l: h_ft * l ** 2 + alpha * h_pt * (l - 1) ** 2   # noqa: E731  (delta^2 / 2 factored out)
    assert (loss(lam) <= loss(grid).min(dim=0).values + 1e-12).all()


def test_revert_ratio_monotonic_in_alpha():
    _, _, h_pt, h_ft = random_inputs(200, seed=5, dtype=F64, zero_frac=0.1)
    alphas = [0.0, 1e-3, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0, 1e4]
    lams = torch.stack([revert_ratio(h_pt, h_ft, a) for a in alphas])
    assert (lams[1:] >= lams[:-1]).all()
    both = (h_pt > 0) & (h_ft > 0)      # strictly increasing where both curvatures are positive
    assert (lams[1:, both] > lams[:-1, both]).all()


@pytest.mark.parametrize("c", [2.0 ** -20, 0.37, 3.0, 2.0 ** 30])
def test_revert_ratio_scale_invariance(c):
    _, _, h_pt, h_ft = random_inputs((5, 8), seed=6, zero_frac=0.2)
    for alpha in [0.0, 0.1, 1.0, 20.0]:
        lam = revert_ratio(h_pt, h_ft, alpha)
        torch.testing.assert_close(revert_ratio(c * h_pt, c * h_ft, alpha), lam, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0, 3.0, 1e3])
def test_revert_ratio_both_curvatures_zero(alpha):
    h_pt = torch.tensor([0.0, 0.0, 1.0, 0.0])
    h_ft = torch.tensor([0.0, 2.0, 0.0, 0.0])
    lam = revert_ratio(h_pt, h_ft, alpha)
    assert lam[0].item() == pytest.approx(alpha / (1 + alpha), abs=1e-7)
    assert lam[3].item() == pytest.approx(alpha / (1 + alpha), abs=1e-7)
    assert lam[1].item() == 0.0                          # only h_ft: keep w_ft
    assert lam[2].item() == (1.0 if alpha > 0 else 0.0)  # only h_pt: revert to w_pt (unless alpha = 0)


def test_alpha_zero_gives_w_ft_exactly():
    w_pt, w_ft, h_pt, h_ft = random_inputs((4, 6), seed=7, zero_frac=0.3)
    assert (revert_ratio(h_pt, h_ft, 0.0) == 0).all()
    assert torch.equal(soft_mix(w_pt, w_ft, h_pt, h_ft, 0.0), w_ft)


def test_soft_mix_lam_one_gives_w_pt_exactly():
    """Where h_ft = 0 and h_pt > 0 (lam = 1) the entry is w_pt itself, not w_ft + (w_pt - w_ft)."""
    w_pt, w_ft, h_pt, _ = random_inputs(4000, seed=8)
    w_ft = 0.01 * w_ft                       # very different magnitudes make w_ft + delta inexact
    h_ft = torch.zeros_like(h_pt)
    h_ft[0] = 1.0                            # not zero everywhere
    out = soft_mix(w_pt, w_ft, h_pt, h_ft, 0.5)
    assert torch.equal(out[1:], w_pt[1:])


def test_soft_mix_formula():
    w_pt, w_ft, h_pt, h_ft = random_inputs((3, 5, 2), seed=9, zero_frac=0.2)
    alpha = 0.4
    lam = revert_ratio(h_pt, h_ft, alpha)
    out = soft_mix(w_pt, w_ft, h_pt, h_ft, alpha)
    assert out.shape == w_ft.shape and out.dtype == w_ft.dtype
    torch.testing.assert_close(out, w_ft + lam * (w_pt - w_ft), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# dtypes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_mix_low_precision_is_mixed_in_float32(dtype):
    w_pt, w_ft, h_pt, h_ft = random_inputs((16, 32), seed=10)
    w_pt, w_ft = w_pt.to(dtype), w_ft.to(dtype)
    alpha = 0.8
    out = soft_mix(w_pt, w_ft, h_pt, h_ft, alpha)
    assert out.dtype == dtype
    ref32 = soft_mix(w_pt.float(), w_ft.float(), h_pt, h_ft, alpha)    # the same inputs, upcast
    assert torch.equal(out, ref32.to(dtype))
    # The float32 route matters: the same formula evaluated in the low precision differs.
    lam = revert_ratio(h_pt, h_ft, alpha).to(dtype)
    naive = w_ft + lam * (w_pt - w_ft)
    assert not torch.equal(naive, out)
    # low-precision curvature is accepted too
    assert torch.equal(soft_mix(w_pt, w_ft, h_pt.to(dtype), h_ft.to(dtype), alpha),
                       soft_mix(w_pt.float(), w_ft.float(), h_pt.to(dtype).float(), h_ft.to(dtype).float(),
                                alpha).to(dtype))


def test_soft_mix_float64_stays_float64():
    g = torch.Generator().manual_seed(11)
    w_ft = torch.ones(100, dtype=F64)
    delta = 1e-9 * torch.rand(100, generator=g, dtype=F64)   # invisible in float32 next to 1.0
    w_pt = w_ft + delta
    h_pt, h_ft = torch.rand(100, generator=g, dtype=F64) + 0.1, torch.rand(100, generator=g, dtype=F64) + 0.1
    out = soft_mix(w_pt, w_ft, h_pt, h_ft, 1.0)
    assert out.dtype == F64
    torch.testing.assert_close(out - w_ft, revert_ratio(h_pt, h_ft, 1.0) * delta, rtol=0, atol=1e-15)
    # (float32 would be off by up to 6e-8 here: one float32 ulp of 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_hard_mix_keeps_w_ft_dtype(dtype):
    w_pt, w_ft, h_pt, h_ft = random_inputs((4, 8), seed=12)
    out = hard_mix(w_pt.to(dtype), w_ft.to(dtype), h_pt, h_ft, 1.0, 0.5)
    assert out.dtype == dtype
    mask = out != w_ft.to(dtype)
    assert torch.equal(out[mask], w_pt.to(dtype)[mask])


def test_hard_mix_float64_selects_by_float64_scores():
    """float64 weights whose differences are invisible in float32 are still ranked correctly."""
    w_ft = torch.ones(5, dtype=F64)
    delta = torch.tensor([5e-9, 1e-9, 4e-9, 2e-9, 3e-9], dtype=F64)
    w_pt = w_ft + delta
    h = torch.ones(5, dtype=F64)
    score = hard_mix_score(w_pt, w_ft, h, h, 0.0)     # 0.5 * delta^2: lowest for the smallest delta
    assert score.dtype == F64
    torch.testing.assert_close(score, 0.5 * delta ** 2, rtol=1e-6, atol=0)
    out = hard_mix(w_pt, w_ft, h, h, 0.0, 0.4)        # reverts the two smallest |delta|: indices 1, 3
    assert (out != w_ft).tolist() == [False, True, False, True, False]


# ----------------------------------------------------------------------------------------------
# hard_mix_score (Eq. 12)

def test_hard_mix_score_formula_and_meaning():
    w_pt, w_ft, h_pt, h_ft = random_inputs((3, 7), seed=13, dtype=F64, zero_frac=0.1)
    alpha = 0.6
    score = hard_mix_score(w_pt, w_ft, h_pt, h_ft, alpha)
    delta = w_pt - w_ft
    torch.testing.assert_close(score, 0.5 * (h_ft - alpha * h_pt) * delta ** 2, rtol=1e-12, atol=0)
    # the score is the change of the joint loss when that one entry is reverted
    base = diag_joint_loss(w_ft, w_pt, w_ft, h_pt, h_ft, alpha)
    for idx in [(0, 0), (1, 3), (2, 6)]:
        w = w_ft.clone()
        w[idx] = w_pt[idx]
        assert diag_joint_loss(w, w_pt, w_ft, h_pt, h_ft, alpha) - base == pytest.approx(score[idx].item(),
                                                                                         rel=1e-9, abs=1e-12)


def test_unconstrained_optimum_is_lam_above_half():
    w_pt, w_ft, h_pt, h_ft = random_inputs(500, seed=14, zero_frac=0.05)
    for alpha in [0.1, 1.0, 10.0]:
        score = hard_mix_score(w_pt, w_ft, h_pt, h_ft, alpha)
        lam = revert_ratio(h_pt, h_ft, alpha)
        informative = (h_pt + h_ft > 0)          # both zero: score 0, lam = alpha/(1+alpha)
        assert torch.equal((score < 0)[informative], (lam > 0.5)[informative])
        assert 0 < (score < 0).sum() < 500        # both sides occur


# ----------------------------------------------------------------------------------------------
# revert_count, select_lowest

@pytest.mark.parametrize("n, k, expected", [
    (10, 0.0, 0), (10, 1.0, 10), (0, 0.5, 0), (7, 1.0, 7),
    (4, 0.5, 2), (8, 0.25, 2), (10, 0.25, 3),      # 2.5 -> 3: halves are rounded up
    (2, 0.25, 1), (6, 0.25, 2), (3, 0.5, 2), (1, 0.5, 1), (16, 0.03125, 1),
    (10, 0.24, 2), (10, 0.26, 3), (3, 0.1, 0), (3, 0.2, 1), (1000, 0.1, 100), (1000, 0.001, 1)])
def test_revert_count(n, k, expected):
    assert revert_count(n, k) == expected


def stable_sort_mask(score: torch.Tensor, k: float, per_row: bool) -> torch.Tensor:
    """Reference: a full stable sort per row (or of the flattened tensor), the first m indices."""
    rows = score.reshape(score.shape[0], -1) if (per_row and score.dim() > 1) else score.reshape(1, -1)
    m = revert_count(rows.shape[1], k)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        order = np.argsort(rows[r].numpy(), kind="stable")
        mask[r, torch.from_numpy(order[:m].copy())] = True
    return mask.reshape(score.shape)


@pytest.mark.parametrize("shape", [(13,), (5, 13), (3, 4, 5), (1, 7), (6, 1)])
@pytest.mark.parametrize("per_row", [True, False])
def test_select_lowest_equals_stable_sort_with_many_ties(shape, per_row):
    g = torch.Generator().manual_seed(15)
    for trial in range(4):
        score = torch.randint(0, 3, shape, generator=g).float() - 1.0   # values -1, 0, 1: many ties
        if trial == 3:
            score = torch.zeros(shape)                                    # all equal
        for k in [0.0, 0.1, 0.25, 0.3, 0.5, 0.77, 0.9, 1.0]:
            mask = select_lowest(score, k, per_row)
            assert mask.dtype == torch.bool and mask.shape == score.shape
            assert torch.equal(mask, stable_sort_mask(score, k, per_row)), (shape, per_row, trial, k)


def test_select_lowest_empty_tensors():
    for shape in [(0,), (0, 5), (3, 0)]:
        for per_row in (True, False):
            mask = select_lowest(torch.zeros(shape), 0.5, per_row)
            assert mask.shape == shape and mask.dtype == torch.bool


def test_select_lowest_all_equal_takes_first_columns():
    mask = select_lowest(torch.zeros(3, 8), 0.25, per_row=True)
    assert mask.sum(dim=1).tolist() == [2, 2, 2]
    assert mask[:, :2].all() and not mask[:, 2:].any()
    mask = select_lowest(torch.zeros(3, 8), 0.25, per_row=False)   # 6 of 24, the first in flat order
    assert mask.flatten()[:6].all() and not mask.flatten()[6:].any()


# ----------------------------------------------------------------------------------------------
# hard_mix (Eq. 13) against brute-force enumeration of the budgeted binary problem

def brute_force_best(w_pt, w_ft, h_pt, h_ft, alpha, m):
    """Lowest joint loss over all masks reverting exactly m entries (flat tensors)."""
    n = w_ft.numel()
    best = float("inf")
    for subset in itertools.combinations(range(n), m):
        w = w_ft.clone()
        idx = list(subset)
        w[idx] = w_pt[idx]
        best = min(best, diag_joint_loss(w, w_pt, w_ft, h_pt, h_ft, alpha))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("shape", [(3, 5), (2, 2, 3), (7,)])
def test_hard_mix_per_row_matches_brute_force(seed, alpha, shape):
    w_pt, w_ft, h_pt, h_ft = random_inputs(shape, seed=100 + seed, dtype=F64, zero_frac=0.15)
    rows = 1 if len(shape) == 1 else shape[0]
    cols = w_ft.numel() // rows
    for k in [0.0, 0.2, 0.4, 0.5, 0.75, 1.0]:
        out = hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row=True)
        m = revert_count(cols, k)
        flat = [t.reshape(rows, cols) for t in (out, w_pt, w_ft, h_pt, h_ft)]
        for r in range(rows):
            o, p, f, hp, hf = (t[r] for t in flat)
            reverted = o != f
            assert int(reverted.sum()) == m          # (random weights: w_pt != w_ft everywhere)
            assert torch.equal(o[reverted], p[reverted]) and torch.equal(o[~reverted], f[~reverted])
            got = diag_joint_loss(o, p, f, hp, hf, alpha)
            assert got == pytest.approx(brute_force_best(p, f, hp, hf, alpha, m), rel=1e-12, abs=1e-14)
        if len(shape) == 1:    # a 1-D tensor is one row: per_row makes no difference
            assert torch.equal(out, hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row=False))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
@pytest.mark.parametrize("shape", [(2, 5), (3, 1, 3)])
def test_hard_mix_global_matches_brute_force(seed, alpha, shape):
    w_pt, w_ft, h_pt, h_ft = random_inputs(shape, seed=200 + seed, dtype=F64, zero_frac=0.15)
    n = w_ft.numel()
    for k in [0.1, 0.3, 0.5, 0.7, 0.9]:
        out = hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row=False)
        m = revert_count(n, k)
        assert int((out != w_ft).sum()) == m
        got = diag_joint_loss(out, w_pt, w_ft, h_pt, h_ft, alpha)
        best = brute_force_best(*(t.flatten() for t in (w_pt, w_ft, h_pt, h_ft)), alpha, m)
        assert got == pytest.approx(best, rel=1e-12, abs=1e-14)
    # Where both budgets revert the same total, the global optimum is at least as good as the per-row one.
    m_rows = shape[0] * revert_count(n // shape[0], 0.5)
    if m_rows == revert_count(n, 0.5):
        loss = lambda w: diag_joint_loss(w, w_pt, w_ft, h_pt, h_ft, alpha)   # noqa: E731
        assert loss(hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, 0.5, per_row=False)) <= \
            loss(hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, 0.5, per_row=True)) + 1e-12


def test_hard_mix_endpoints():
    w_pt, w_ft, h_pt, h_ft = random_inputs((4, 6), seed=16)
    for per_row in [True, False]:
        assert torch.equal(hard_mix(w_pt, w_ft, h_pt, h_ft, 0.7, 0.0, per_row), w_ft)
        assert torch.equal(hard_mix(w_pt, w_ft, h_pt, h_ft, 0.7, 1.0, per_row), w_pt)


def test_hard_mix_ties_revert_first_columns_and_is_repeatable():
    w_ft = torch.zeros(3, 8)
    w_pt = torch.ones(3, 8)                      # delta = 1 everywhere
    h = torch.ones(3, 8)
    out = hard_mix(w_pt, w_ft, h, h, 2.0, 0.25)  # every score is 0.5 * (1 - 2) = -0.5
    assert torch.equal(out[:, :2], torch.ones(3, 2)) and torch.equal(out[:, 2:], torch.zeros(3, 6))
    w_pt, w_ft, h_pt, h_ft = random_inputs((5, 9), seed=17)
    h_pt = torch.round(h_pt)                     # ties in the score
    h_pt[0, 0] = 1.0
    outs = [hard_mix(w_pt, w_ft, h_pt, h_ft, 1.0, 0.4, pr) for pr in (True, False) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[:3]) and all(torch.equal(outs[3], o) for o in outs[3:])


def test_hard_mix_reverts_the_lowest_scores():
    w_pt, w_ft, h_pt, h_ft = random_inputs((4, 10), seed=18)
    alpha, k = 0.5, 0.3
    score = hard_mix_score(w_pt, w_ft, h_pt, h_ft, alpha)
    out = hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k)
    assert torch.equal(out, torch.where(stable_sort_mask(score, k, True), w_pt, w_ft))


# ----------------------------------------------------------------------------------------------
# cgm_merge on state dicts

def make_states(seed=19):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.weight": (4, 6), "enc.bias": (4,), "dec.weight": (3, 4), "norm.weight": (3,)}
    state_pt = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    state_ft = {n: w + 0.1 * torch.randn(s, generator=g) for (n, s), w in zip(shapes.items(), state_pt.values())}
    merged = ["enc.weight", "dec.weight", "enc.bias"]
    curv_pt = {n: torch.rand(shapes[n], generator=g) for n in merged}
    curv_ft = {n: torch.rand(shapes[n], generator=g) for n in merged}
    return state_pt, state_ft, curv_pt, curv_ft


def clone_dict(d):
    return {n: t.clone() for n, t in d.items()}


def assert_dicts_equal(a, b):
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("k, per_row", [(None, True), (0.5, True), (0.5, False), (0.25, True)])
def test_cgm_merge(k, per_row):
    state_pt, state_ft, curv_pt, curv_ft = make_states()
    before = [clone_dict(d) for d in (state_pt, state_ft, curv_pt, curv_ft)]
    alpha = 0.8
    merged = cgm_merge(state_pt, state_ft, curv_pt, curv_ft, alpha, k, per_row)
    assert merged is not state_ft and isinstance(merged, dict)
    assert list(merged) == list(state_ft)
    for n in state_ft:
        if n in curv_ft:
            args = (state_pt[n], state_ft[n], curv_pt[n], curv_ft[n], alpha)
            want = soft_mix(*args) if k is None else hard_mix(*args, k, per_row)
            assert torch.equal(merged[n], want), n
            assert not torch.equal(merged[n], state_ft[n]), n
        else:
            assert merged[n] is state_ft[n]              # the same tensor object, not a copy
    # the inputs are unchanged, also after writing into the merged tensors
    for n in curv_ft:
        merged[n].add_(1.0)
    merged["extra"] = torch.zeros(1)
    for orig, now in zip(before, (state_pt, state_ft, curv_pt, curv_ft)):
        assert_dicts_equal(orig, now)


def test_cgm_merge_soft_and_hard_differ_and_module_exports():
    state_pt, state_ft, curv_pt, curv_ft = make_states(20)
    soft = cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0)
    hard = cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k=0.5)
    assert not torch.equal(soft["enc.weight"], hard["enc.weight"])
    # hard mixing only ever picks one of the two weights
    w = hard["enc.weight"]
    assert ((w == state_pt["enc.weight"]) | (w == state_ft["enc.weight"])).all()
    assert cgm.curvature_scale_ratio(curv_pt, curv_ft) == pytest.approx(
        sum(float(h.double().sum()) for h in curv_ft.values()) / sum(float(h.double().sum()) for h in curv_pt.values()))


def test_alpha_from_normalised_weighs_both_curvatures_equally_at_one():
    state_pt, state_ft, curv_pt, curv_ft = make_states(21)
    scaled_pt = {n: h * 1e-4 for n, h in curv_pt.items()}        # a saturated base: h_pt far smaller
    for pt in (curv_pt, scaled_pt):
        alpha = cgm.alpha_from_normalised(1.0, pt, curv_ft)
        total_pt = alpha * sum(float(h.double().sum()) for h in pt.values())
        assert total_pt == pytest.approx(sum(float(h.double().sum()) for h in curv_ft.values()), rel=1e-9)
    # the normalised alpha does not depend on the overall scale of h_pt, the plain one does
    assert cgm.alpha_from_normalised(0.2, scaled_pt, curv_ft) == pytest.approx(
        1e4 * cgm.alpha_from_normalised(0.2, curv_pt, curv_ft), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        cgm.alpha_from_normalised(-1.0, curv_pt, curv_ft)
    with pytest.raises(ValueError, match="sums to zero"):
        cgm.alpha_from_normalised(1.0, {n: torch.zeros_like(h) for n, h in curv_pt.items()}, curv_ft)


def test_kth_smallest_equals_kthvalue_for_every_m():
    from cgm_min.cgm import kth_smallest
    g = torch.Generator().manual_seed(0)
    for rows in (torch.randn(7, 11, generator=g), torch.randint(0, 3, (5, 9), generator=g).float()):   # ties too
        for m in range(1, rows.shape[1] + 1):
            assert torch.equal(kth_smallest(rows, m), rows.kthvalue(m, dim=1, keepdim=True).values), m
