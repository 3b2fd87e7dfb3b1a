"""Each comparator of the registry against the property that defines it (not against its own output):
endpoints, task arithmetic = interpolation, TIES's trim / sign election / disjoint mean, DARE's unbiased
drop-and-rescale, random reversion's exact and uniform counts, Wanda's activation-weighted score, and Fisher
merging = CGM with alpha = lam_pt / (1 - lam_pt)."""
from __future__ import annotations

import numpy as np
import pytest
import torch


from cgm_min.cgm import revert_count
from cgm_min.merge import ActivationStats, MergeInputs, TensorInputs, get_method, merge_state

SHAPES = {"a.weight": (5, 12), "b.weight": (4, 7), "b.bias": (9,), "norm.weight": (4,)}
MERGED = ["a.weight", "b.weight", "b.bias"]


def pair(seed=0, dtype=torch.float32, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    pt = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}
    ft = {n: (pt[n].double() + spread * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
          for n, s in SHAPES.items()}
    return pt, ft


def curvature(seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple({n: torch.exp(2 * torch.randn(SHAPES[n], generator=g)) for n in MERGED} for _ in range(2))


def one(method, w_pt, w_ft, **hp):
    return get_method(method).fn(TensorInputs("w", w_pt, w_ft), **hp)


def test_endpoints():
    pt, ft = pair()
    a = merge_state("pre_trained", pt, ft, names=MERGED)
    b = merge_state("fine_tuned", pt, ft, names=MERGED)
    for n in MERGED:
        assert torch.equal(a[n], pt[n]) and b[n] is ft[n]
    assert a["norm.weight"] is ft["norm.weight"]          # outside the merge set: w_ft


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0])
def test_task_arithmetic_with_one_model_is_interpolation(scale):
    pt, ft = pair(2, torch.float64)
    ta = merge_state("task_arithmetic", pt, ft, names=MERGED, scale=scale)
    lin = merge_state("linear", pt, ft, names=MERGED, lam=1.0 - scale)
    for n in MERGED:
        torch.testing.assert_close(ta[n], lin[n], rtol=0, atol=1e-12)
    if scale == 0.0:
        assert all(torch.equal(ta[n], pt[n]) for n in MERGED)


def test_task_arithmetic_adds_every_task_vector():
    pt, ft = pair(3, torch.float64)
    g = torch.Generator().manual_seed(4)
    ft2 = {n: pt[n] + 0.1 * torch.randn(pt[n].shape, generator=g, dtype=torch.float64) for n in pt}   # a 2nd task
    out = merge_state("task_arithmetic", pt, ft, names=MERGED, inputs=MergeInputs(fine_tuned_others=[ft2]), scale=0.5)
    for n in MERGED:
        torch.testing.assert_close(out[n], pt[n] + 0.5 * ((ft[n] - pt[n]) + (ft2[n] - pt[n])))


def test_ties_trims_to_top_k_magnitudes():
    pt, ft = pair(5, torch.float64)
    for k in (0.1, 0.25, 0.5, 1.0):
        out = merge_state("ties", pt, ft, names=MERGED, k=k)
        for n in MERGED:
            tau, kept = ft[n] - pt[n], out[n] - pt[n]
            nz = kept != 0
            assert int(nz.sum()) == revert_count(tau.numel(), k)
            assert torch.equal(kept[nz], tau[nz])                         # kept entries are unchanged
            if (~nz).any() and nz.any():
                assert tau[~nz].abs().max() <= tau[nz].abs().min()         # ...and they are the largest


def test_ties_elects_signs_and_takes_the_disjoint_mean():
    w_pt = torch.zeros(4)
    taus = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-3.0, 1.0, 1.0, -0.5])]
    t = TensorInputs("w", w_pt, taus[0], w_others=(taus[1],))
    out = get_method("ties").fn(t, k=1.0, scale=1.0)
    # sums -2, -1, 4, 0 -> signs -, -, +, 0; agreeing entries averaged; a tie (sum 0) gives 0
    assert out.tolist() == [-3.0, -2.0, 2.0, 0.0]
    assert get_method("ties").fn(t, k=1.0, scale=0.5).tolist() == [-1.5, -1.0, 1.0, 0.0]


def test_ties_with_one_model_and_k_1_is_the_fine_tuned_model():
    pt, ft = pair(6, torch.float64)
    out = merge_state("ties", pt, ft, names=MERGED, k=1.0)
    for n in MERGED:
        torch.testing.assert_close(out[n], ft[n], rtol=0, atol=1e-12)


def test_dare_drops_with_probability_p_and_rescales():
    w_pt, w_ft = torch.zeros(200, 50, dtype=torch.float64), torch.ones(200, 50, dtype=torch.float64)
    out = one("dare", w_pt, w_ft, p=0.3, seed=1)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))        # rescaled by 1 / (1 - p)
    assert abs(1 - kept.double().mean().item() - 0.3) < 0.01                    # about p dropped
    assert torch.equal(one("dare", w_pt, w_ft, p=0.0), w_ft)


def test_dare_is_unbiased_and_seeded_per_tensor():
    pt, ft = pair(7, torch.float64)
    runs = [merge_state("dare", pt, ft, names=MERGED, p=0.5, seed=s) for s in range(400)]
    for n in MERGED:
        mean = torch.stack([r[n] for r in runs]).mean(0)
        assert (mean - ft[n]).abs().max() < 5 * (ft[n] - pt[n]).abs().max() / np.sqrt(400)
    # the same (seed, tensor) gives the same draw whatever else is merged; another seed another draw
    alone = merge_state("dare", pt, ft, names=["b.weight"], p=0.5, seed=3)
    assert torch.equal(alone["b.weight"], runs[3]["b.weight"])
    assert not torch.equal(runs[3]["b.weight"], runs[4]["b.weight"])


@pytest.mark.parametrize("per_row", [True, False])
def test_random_revert_reverts_exact_counts_uniformly(per_row):
    w_pt, w_ft = torch.zeros(6, 40), torch.ones(6, 40)
    freq = torch.zeros(6, 40)
    for seed in range(300):
        out = one("random_revert", w_pt, w_ft, k=0.25, seed=seed, per_row=per_row)
        reverted = out == 0
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        if per_row:
            assert reverted.sum(1).tolist() == [10] * 6
        else:
            assert int(reverted.sum()) == 60
        freq += reverted
    # every entry is reverted with probability 0.25: no position is favoured
    assert (freq / 300 - 0.25).abs().max() < 0.11
    assert not torch.equal(one("random_revert", w_pt, w_ft, k=0.25, seed=0),
                           one("random_revert", w_pt, w_ft, k=0.25, seed=1))


def test_wanda_weighs_delta_by_input_norm():
    w_pt = torch.zeros(2, 4)
    w_ft = torch.tensor([[1.0, 1.0, 2.0, 4.0], [3.0, 1.0, 1.0, 1.0]])
    act = ActivationStats(col_sq=torch.tensor([100.0, 1.0, 0.0, 0.25]), gram=None, n=10)
    out = get_method("wanda").fn(TensorInputs("w", w_pt, w_ft, act=act), k=0.5)
    # scores |delta| * ||X_j||: row 0: 10, 1, 0, 2 -> revert columns 2, 1; row 1: 30, 1, 0, 0.5 -> 2, 3
    assert out.tolist() == [[1.0, 0.0, 0.0, 4.0], [3.0, 1.0, 0.0, 0.0]]
    # magnitude alone would revert other entries in row 0
    assert one("magnitude", w_pt, w_ft, k=0.5)[0].tolist() == [0.0, 0.0, 2.0, 4.0]


def test_wanda_needs_activations_and_checks_their_shape():
    pt, ft = pair(8)
    with pytest.raises(ValueError, match=r"^wanda needs activation statistics .*missing for \['a\.weight'"):
        merge_state("wanda", pt, ft, names=MERGED, k=0.2)
    acts = {"a.weight": ActivationStats(torch.ones(12), None, 1), "b.weight": ActivationStats(torch.ones(3), None, 1)}
    with pytest.raises(ValueError, match=r"^b\.weight: activation statistics for \(3,\) inputs, but the weight has 7"):
        merge_state("wanda", pt, ft, names=MERGED, inputs=MergeInputs(activations=acts), k=0.2)


@pytest.mark.parametrize("lam_pt", [0.0, 0.1, 0.5, 0.9])
def test_fisher_merging_is_cgm_with_alpha_lam_over_one_minus_lam(lam_pt):
    pt, ft = pair(9, torch.float64)
    h_pt, h_ft = curvature()
    h_pt["b.bias"][:3] = 0.0
    h_ft["b.bias"][1:4] = 0.0          # entries 1, 2 have no curvature at all: both use the plain average
    fm = merge_state("fisher_merging", pt, ft, h_pt, h_ft, lam_pt=lam_pt)
    cg = merge_state("cgm", pt, ft, h_pt, h_ft, alpha=lam_pt / (1 - lam_pt))
    for n in MERGED:
        torch.testing.assert_close(fm[n], cg[n], rtol=1e-12, atol=1e-12)


def test_fisher_merging_endpoints():
    pt, ft = pair(10, torch.float64)
    h_pt, h_ft = curvature(2)
    for lam_pt, want in ((0.0, ft), (1.0, pt)):
        out = merge_state("fisher_merging", pt, ft, h_pt, h_ft, lam_pt=lam_pt)
        for n in MERGED:
            torch.testing.assert_close(out[n], want[n], rtol=0, atol=1e-12)


def test_several_fine_tuned_models_must_match_the_base():
    pt, ft = pair(11)
    bad = dict(ft)
    bad["a.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"a\.weight: shape mismatch"):
        merge_state("ties", pt, ft, names=MERGED, inputs=MergeInputs(fine_tuned_others=[bad]), k=0.5)


def test_merge_set_must_be_named_and_known():
    pt, ft = pair(12)
    with pytest.raises(ValueError, match=r"^linear: name the merged tensors"):
        merge_state("linear", pt, ft, lam=0.5)
    with pytest.raises(ValueError, match=r"^linear: merge-set tensors not in the checkpoints: \['ghost'\]"):
        merge_state("linear", pt, ft, names=["ghost"], lam=0.5)
    with pytest.raises(ValueError, match=r"^cgm uses curvature, but h_pt / h_ft do not cover \['b\.bias'\]"):
        h_pt, h_ft = curvature()
        merge_state("cgm", pt, ft, {n: h_pt[n] for n in MERGED[:2]}, {n: h_ft[n] for n in MERGED[:2]},
                    names=MERGED, alpha=1.0)


@pytest.mark.parametrize("method, hp", [("ties", {"k": 0.3}), ("dare", {"p": 0.4}), ("random_revert", {"k": 0.3}),
                                        ("task_arithmetic", {"scale": 0.7}), ("pre_trained", {})])
def test_bf16_results_keep_the_dtype_and_inputs_stay_intact(method, hp):
    pt, ft = pair(13, torch.bfloat16)
    before = {n: (pt[n].clone(), ft[n].clone()) for n in pt}
    out = merge_state(method, pt, ft, names=MERGED, **hp)
    for n in MERGED:
        assert out[n].dtype == torch.bfloat16 and out[n].shape == ft[n].shape
    assert all(torch.equal(pt[n], a) and torch.equal(ft[n], b) for n, (a, b) in before.items())
