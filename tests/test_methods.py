"""The registry of merge methods (cgm_min.merge): lookups and hyperparameter checks, and merge_state for the
score-based methods on a small state dict, each against an independent reference (a stable sort of the
method's own score). The other methods' defining properties are in test_merge_methods.py."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from cgm_min import merge as methods
from cgm_min.cgm import cgm_merge, revert_count
from cgm_min.merge import METHODS, get_method, merge_state, register
from cgm_min.merge.reversion import revert_lowest

EXPECTED = {"pre_trained", "fine_tuned", "linear", "task_arithmetic", "ties", "dare", "magnitude", "random_revert",
            "wanda", "model_tailor", "grafting", "fisher_merging", "cgm", "cgm_dagger", "score_ft_magnitude",
            "score_pt_magnitude"}
MERGED = ["enc.weight", "dec.weight", "dec.bias"]


def states(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.weight": (4, 10), "dec.weight": (3, 8), "dec.bias": (6,), "norm.weight": (4,)}
    state_pt = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    state_ft = {n: (state_pt[n].float() + 0.1 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}
    curv_pt = {n: torch.exp(2 * torch.randn(shapes[n], generator=g)) for n in MERGED}
    curv_ft = {n: torch.exp(2 * torch.randn(shapes[n], generator=g)) for n in MERGED}
    return state_pt, state_ft, curv_pt, curv_ft


def reference_revert(state_pt, state_ft, score, k, per_row):
    """Revert the revert_count lowest scores (stable sort: ties by index), per row or over the tensor."""
    out = {}
    for n, s in score.items():
        rows = s.reshape(s.shape[0], -1) if (per_row and s.dim() > 1) else s.reshape(1, -1)
        m = revert_count(rows.shape[1], k)
        mask = torch.zeros_like(rows, dtype=torch.bool)
        for r in range(rows.shape[0]):
            mask[r, torch.from_numpy(np.argsort(rows[r].numpy(), kind="stable")[:m].copy())] = True
        out[n] = torch.where(mask.reshape(s.shape), state_pt[n], state_ft[n])
    return out


def assert_merged(merged, state_ft, want):
    assert merged is not state_ft and list(merged) == list(state_ft)
    for n in state_ft:
        if n in want:
            assert torch.equal(merged[n], want[n]), n
        else:
            assert merged[n] is state_ft[n], n      # tensors without curvature: from state_ft, untouched


# ----------------------------------------------------------------------------------------------
# registry

def test_registry_contents():
    assert set(METHODS) == EXPECTED
    for name, m in METHODS.items():
        assert get_method(name) is m and m.name == name and m.reference and m.rule and m.family
        params = list(inspect.signature(m.fn).parameters)
        inputs = 1 if m.level == "tensor" else 4
        assert tuple(params[inputs:]) == m.hyperparameters, name       # declared once: the signature
    assert METHODS["cgm"].uses_curvature and not METHODS["magnitude"].uses_curvature
    assert "activations" in METHODS["wanda"].needs and "target" in METHODS["grafting"].needs
    table = methods.methods_table()
    assert list(table.index) == list(METHODS) and table.loc["ties", "hyperparameters"] == "k in [0, 1], scale in [0, inf)"


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'; registered: \[.*'cgm_dagger'.*\]"):
        get_method("tie")
    with pytest.raises(ValueError, match=r"unknown merge method 'CGM'"):
        merge_state("CGM", *states(), alpha=1.0)


def test_register_twice_is_refused():
    before = dict(METHODS)
    with pytest.raises(ValueError, match=r"merge method 'linear' registered twice"):
        register("linear", "interpolation", "again")(lambda t: t.w_ft)
    assert METHODS == before


@pytest.mark.parametrize("method, hyper, bad", [
    ("linear", {"lam": 0.5, "alpha": 1.0}, "alpha"),
    ("cgm", {"alpha": 1.0, "k": 0.1}, "k"),
    ("magnitude", {"k": 0.1, "sparse_level": 0.9}, "sparse_level"),
    ("fine_tuned", {"lam": 0.0}, "lam")])
def test_unknown_hyperparameter(method, hyper, bad):
    with pytest.raises(ValueError, match=rf"^{method}: unknown hyperparameters \['{bad}'\]; it takes \["):
        merge_state(method, *states(), **hyper)


@pytest.mark.parametrize("method, hyper, missing", [
    ("cgm_dagger", {"alpha": 1.0}, "k"), ("cgm", {}, "alpha"), ("linear", {}, "lam"),
    ("magnitude", {"per_row": True}, "k"), ("score_pt_magnitude", {"k": 0.2}, "alpha")])
def test_missing_hyperparameter(method, hyper, missing):
    """cgm_dagger without k must not silently fall back to soft mixing."""
    with pytest.raises(ValueError, match=rf"^{method}: missing hyperparameters \['{missing}'\]"):
        merge_state(method, *states(), **hyper)


# ----------------------------------------------------------------------------------------------
# merge_state, one method at a time

def test_fine_tuned():
    state_pt, state_ft, curv_pt, curv_ft = states()
    assert_merged(merge_state("fine_tuned", state_pt, state_ft, curv_pt, curv_ft), state_ft,
                  {n: state_ft[n] for n in MERGED})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear(dtype):
    state_pt, state_ft, curv_pt, curv_ft = states(1, dtype)
    assert_merged(merge_state("linear", state_pt, state_ft, curv_pt, curv_ft, lam=0.0), state_ft,
                  {n: state_ft[n] for n in MERGED})
    assert_merged(merge_state("linear", state_pt, state_ft, curv_pt, curv_ft, lam=1.0), state_ft,
                  {n: state_pt[n] for n in MERGED})     # exactly w_pt, not w_ft + (w_pt - w_ft)
    merged = merge_state("linear", state_pt, state_ft, curv_pt, curv_ft, lam=0.3)
    for n in MERGED:
        assert merged[n].dtype == dtype
        ref = (0.7 * state_ft[n].double() + 0.3 * state_pt[n].double()).to(dtype)
        torch.testing.assert_close(merged[n], ref, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-7)
    for lam in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"linear: lam must be in \[0, 1\], got"):
            merge_state("linear", state_pt, state_ft, curv_pt, curv_ft, lam=lam)


def test_linear_bf16_is_mixed_in_float32():
    state_pt, state_ft, curv_pt, curv_ft = states(2, torch.bfloat16)
    merged = merge_state("linear", state_pt, state_ft, curv_pt, curv_ft, lam=0.3)
    for n in MERGED:
        ref = torch.lerp(state_ft[n].float(), state_pt[n].float(), 0.3).to(torch.bfloat16)
        assert torch.equal(merged[n], ref), n


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("k", [0.0, 0.25, 0.5, 1.0])
def test_magnitude_reverts_smallest_abs_delta(per_row, k):
    state_pt, state_ft, curv_pt, curv_ft = states(3)
    merged = merge_state("magnitude", state_pt, state_ft, curv_pt, curv_ft, k=k, per_row=per_row)
    score = {n: (state_pt[n] - state_ft[n]).abs() for n in MERGED}
    assert_merged(merged, state_ft, reference_revert(state_pt, state_ft, score, k, per_row))


def test_magnitude_uses_absolute_value():
    w_ft = torch.zeros(1, 4)
    w_pt = torch.tensor([[-5.0, 0.1, 3.0, -0.2]])
    out = merge_state("magnitude", {"w": w_pt}, {"w": w_ft}, {"w": torch.ones(1, 4)}, {"w": torch.ones(1, 4)},
                      k=0.5)["w"]
    assert torch.equal(out, torch.tensor([[0.0, 0.1, 0.0, -0.2]]))


@pytest.mark.parametrize("per_row", [True, False])
def test_score_ft_magnitude(per_row):
    state_pt, state_ft, curv_pt, curv_ft = states(4)
    k = 0.3
    merged = merge_state("score_ft_magnitude", state_pt, state_ft, curv_pt, curv_ft, k=k, per_row=per_row)
    score = {n: curv_ft[n] * (state_pt[n] - state_ft[n]) ** 2 for n in MERGED}
    assert_merged(merged, state_ft, reference_revert(state_pt, state_ft, score, k, per_row))
    magnitude = merge_state("magnitude", state_pt, state_ft, curv_pt, curv_ft, k=k, per_row=per_row)
    assert any(not torch.equal(merged[n], magnitude[n]) for n in MERGED)    # the curvature matters


@pytest.mark.parametrize("per_row", [True, False])
def test_score_pt_magnitude(per_row):
    state_pt, state_ft, curv_pt, curv_ft = states(5)
    k = 0.3
    merged = merge_state("score_pt_magnitude", state_pt, state_ft, curv_pt, curv_ft, alpha=0.5, k=k,
                         per_row=per_row)
    # reverts the LARGEST h_pt * delta^2
    score = {n: -(curv_pt[n] * (state_pt[n] - state_ft[n]) ** 2) for n in MERGED}
    assert_merged(merged, state_ft, reference_revert(state_pt, state_ft, score, k, per_row))
    # any alpha > 0 scales the score and selects the same entries
    again = merge_state("score_pt_magnitude", state_pt, state_ft, curv_pt, curv_ft, alpha=7.0, k=k,
                        per_row=per_row)
    assert all(torch.equal(merged[n], again[n]) for n in MERGED)
    with pytest.raises(ValueError, match=r"score_pt_magnitude: alpha must be in \[0, inf\), got -1.0"):
        merge_state("score_pt_magnitude", state_pt, state_ft, curv_pt, curv_ft, alpha=-1.0, k=k)


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_cgm_methods_equal_cgm_merge(alpha):
    state_pt, state_ft, curv_pt, curv_ft = states(6)
    soft = merge_state("cgm", state_pt, state_ft, curv_pt, curv_ft, alpha=alpha)
    assert_merged(soft, state_ft, cgm_merge(state_pt, state_ft, curv_pt, curv_ft, alpha))
    for per_row in (True, False):
        hard = merge_state("cgm_dagger", state_pt, state_ft, curv_pt, curv_ft, alpha=alpha, k=0.4, per_row=per_row)
        assert_merged(hard, state_ft, cgm_merge(state_pt, state_ft, curv_pt, curv_ft, alpha, 0.4, per_row))
    default = merge_state("cgm_dagger", state_pt, state_ft, curv_pt, curv_ft, alpha=alpha, k=0.4)
    assert_merged(default, state_ft, cgm_merge(state_pt, state_ft, curv_pt, curv_ft, alpha, 0.4, True))
    # hard mixing is the score-based reversion with the Eq. 12 score
    score = {n: 0.5 * (curv_ft[n] - alpha * curv_pt[n]) * (state_pt[n] - state_ft[n]) ** 2 for n in MERGED}
    assert_merged(default, state_ft, reference_revert(state_pt, state_ft, score, 0.4, True))


def test_the_three_scores_select_differently():
    """CGM-dagger, magnitude and the two ablations are different rules on the same inputs."""
    state_pt, state_ft, curv_pt, curv_ft = states(7)
    runs = [merge_state("cgm_dagger", state_pt, state_ft, curv_pt, curv_ft, alpha=1.0, k=0.3),
            merge_state("magnitude", state_pt, state_ft, curv_pt, curv_ft, k=0.3),
            merge_state("score_ft_magnitude", state_pt, state_ft, curv_pt, curv_ft, k=0.3),
            merge_state("score_pt_magnitude", state_pt, state_ft, curv_pt, curv_ft, alpha=1.0, k=0.3)]
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            assert not torch.equal(runs[i]["enc.weight"], runs[j]["enc.weight"]), (i, j)


@pytest.mark.parametrize("method, hyper", [
    ("fine_tuned", {}), ("linear", {"lam": 0.4}), ("cgm", {"alpha": 1.0}), ("cgm_dagger", {"alpha": 1.0, "k": 0.2}),
    ("magnitude", {"k": 0.2}), ("score_ft_magnitude", {"k": 0.2}), ("score_pt_magnitude", {"alpha": 1.0, "k": 0.2})])
def test_inputs_are_not_modified(method, hyper):
    dicts = states(8)
    before = [{n: t.clone() for n, t in d.items()} for d in dicts]
    merged = merge_state(method, *dicts, **hyper)
    for n in MERGED:
        if merged[n] is not dicts[1][n]:
            merged[n].add_(1.0)
    for d, b in zip(dicts, before):
        assert all(torch.equal(d[n], b[n]) for n in d)


# ----------------------------------------------------------------------------------------------
# bad inputs through merge_state

@pytest.mark.parametrize("method, hyper", [("linear", {"lam": 0.4}), ("magnitude", {"k": 0.2}),
                                           ("score_ft_magnitude", {"k": 0.2}), ("cgm", {"alpha": 1.0})])
def test_nan_weight_is_refused(method, hyper):
    state_pt, state_ft, curv_pt, curv_ft = states(9)
    state_ft["dec.weight"][1, 2] = math.nan
    with pytest.raises(ValueError, match=r"^dec\.weight: w_ft contains NaN or Inf"):
        merge_state(method, state_pt, state_ft, curv_pt, curv_ft, **hyper)


@pytest.mark.parametrize("method, hyper", [("score_ft_magnitude", {"k": 0.2}),
                                           ("score_pt_magnitude", {"alpha": 1.0, "k": 0.2})])
@pytest.mark.parametrize("problem, pattern", [
    ("nan", r"h_(pt|ft) contains NaN or Inf"), ("negative", r"h_(pt|ft) has negative entries"),
    ("zero", r"h_(pt|ft) is zero everywhere"), ("shape", r"shape mismatch, h_(pt|ft) has \(8,\)")])
def test_bad_curvature_is_refused_by_score_methods(method, hyper, problem, pattern):
    state_pt, state_ft, curv_pt, curv_ft = states(10)
    curv = curv_ft if method == "score_ft_magnitude" else curv_pt
    h = curv["dec.weight"]
    if problem == "nan":
        h[0, 0] = math.nan
    elif problem == "negative":
        h[0, 0] = -1.0
    elif problem == "zero":
        h.zero_()
    else:
        curv["dec.weight"] = torch.ones(8)       # would broadcast against (3, 8) without the check
    with pytest.raises(ValueError, match=rf"^dec\.weight: {pattern}"):
        merge_state(method, state_pt, state_ft, curv_pt, curv_ft, **hyper)


def test_state_dict_checks_apply_to_every_method():
    state_pt, state_ft, curv_pt, curv_ft = states(11)
    curv_pt["ghost"] = curv_ft["ghost"] = torch.ones(2)
    for method, hyper in [("linear", {"lam": 0.5}), ("magnitude", {"k": 0.5}), ("cgm", {"alpha": 1.0})]:
        with pytest.raises(ValueError, match=r"not in the state dicts: \['ghost'\]"):
            merge_state(method, state_pt, state_ft, curv_pt, curv_ft, **hyper)


def test_revert_lowest_checks_k():
    w = torch.zeros(2, 3)
    t = methods.TensorInputs("w", torch.ones(2, 3), w)
    for k in (-0.5, 1.5):
        with pytest.raises(ValueError, match=r"k \(fraction of entries reverted\) must lie in \[0, 1\]"):
            revert_lowest(t, w, k, True)
    assert revert_lowest(t, torch.zeros(2, 3), 1 / 3, True).tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize("method, hyper, pattern", [
    ("magnitude", {"k": 1.5}, r"magnitude: k must be in \[0, 1\], got 1.5"),
    ("dare", {"p": 1.0}, r"dare: p must be in \[0, 1\), got 1.0"),
    ("dare", {"p": 0.5, "seed": -1}, r"dare: seed must be an integer in \[0, inf\), got -1"),
    ("random_revert", {"k": 0.5, "seed": 1.5}, r"random_revert: seed must be an integer in"),
    ("task_arithmetic", {"scale": -0.1}, r"task_arithmetic: scale must be in \[0, inf\)"),
    ("ties", {"k": 0.2, "scale": math.inf}, r"ties: scale must be in \[0, inf\), got inf"),
    ("cgm", {"alpha": math.nan}, r"cgm: alpha must be in \[0, inf\), got nan"),
    ("magnitude", {"k": 0.2, "per_row": "yes"}, r"magnitude: per_row must be True or False, got 'yes'"),
    ("fisher_merging", {"lam_pt": True}, r"fisher_merging: lam_pt must be in \[0, 1\], got True")])
def test_out_of_range_hyperparameters_are_refused_before_merging(method, hyper, pattern):
    with pytest.raises(ValueError, match=rf"^{pattern}"):
        merge_state(method, *states(), **hyper)
