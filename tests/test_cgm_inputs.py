"""Every input that would give a silently wrong merge is refused with a ValueError whose message names
the tensor and the problem. The `match` patterns check both, so these tests fail if a check is removed,
if it raises something else, or if the message stops naming the tensor."""
from __future__ import annotations

import math
import re

import pytest
import torch

from cgm_min.cgm import cgm_merge, closed_form, hard_mix, soft_mix

NAME = "model.layers.3.mlp.down_proj.weight"
Q = re.escape(NAME)


def good_inputs(shape=(3, 4)):
    g = torch.Generator().manual_seed(0)
    w_pt = torch.randn(shape, generator=g)
    w_ft = w_pt + 0.1 * torch.randn(shape, generator=g)
    return {"w_pt": w_pt, "w_ft": w_ft, "h_pt": torch.rand(shape, generator=g) + 0.1,
            "h_ft": torch.rand(shape, generator=g) + 0.1}


# Each mixing entry point, called with one tensor named NAME. cgm_merge gets the tensor inside state dicts
# that also hold an untouched tensor without curvature.
def call_soft(t, alpha=0.5, k=None):
    return soft_mix(t["w_pt"], t["w_ft"], t["h_pt"], t["h_ft"], alpha, name=NAME)


def call_hard(t, alpha=0.5, k=0.3):
    return hard_mix(t["w_pt"], t["w_ft"], t["h_pt"], t["h_ft"], alpha, k, name=NAME)


def call_hard_global(t, alpha=0.5, k=0.3):
    return hard_mix(t["w_pt"], t["w_ft"], t["h_pt"], t["h_ft"], alpha, k, per_row=False, name=NAME)


def call_merge_soft(t, alpha=0.5, k=None):
    other = torch.ones(2)
    return cgm_merge({NAME: t["w_pt"], "other": other}, {NAME: t["w_ft"], "other": other},
                     {NAME: t["h_pt"]}, {NAME: t["h_ft"]}, alpha, k)


def call_merge_hard(t, alpha=0.5, k=0.3):
    return call_merge_soft(t, alpha, k)


CALLS = [call_soft, call_hard, call_hard_global, call_merge_soft, call_merge_hard]
HARD_CALLS = [call_hard, call_hard_global, call_merge_hard]


@pytest.mark.parametrize("call", CALLS)
def test_good_inputs_pass(call):
    call(good_inputs())


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("label", ["w_pt", "w_ft", "h_pt", "h_ft"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_is_refused(call, label, bad):
    t = good_inputs()
    if label.startswith("h") and bad == -math.inf:
        bad = math.nan                       # (-inf curvature would also be negative; keep one problem)
    t[label][1, 2] = bad
    with pytest.raises(ValueError, match=rf"^{Q}: {label} contains NaN or Inf"):
        call(t)


@pytest.mark.parametrize("call", [call_soft, call_hard, call_hard_global])
@pytest.mark.parametrize("label", ["w_pt", "h_pt", "h_ft"])
def test_shape_mismatch_is_refused(call, label):
    t = good_inputs()
    t[label] = torch.ones(3, 5) if label.startswith("h") else torch.randn(3, 5)
    with pytest.raises(ValueError, match=rf"^{Q}: shape mismatch, {label} has \(3, 5\) but w_ft has \(3, 4\)"):
        call(t)


@pytest.mark.parametrize("call", [call_soft, call_hard])
def test_broadcastable_curvature_is_refused(call):
    """A (4,) or scalar curvature would broadcast silently; it must have w_ft's shape."""
    for h in (torch.ones(4), torch.tensor(1.0)):
        t = good_inputs()
        t["h_ft"] = h
        with pytest.raises(ValueError, match=rf"^{Q}: shape mismatch, h_ft has"):
            call(t)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("label", ["h_pt", "h_ft"])
def test_negative_curvature_is_refused(call, label):
    t = good_inputs()
    t[label][0, 1] = -1e-3
    with pytest.raises(ValueError, match=rf"^{Q}: {label} has negative entries \(min -0\.001\)"):
        call(t)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("label", ["h_pt", "h_ft"])
def test_zero_curvature_everywhere_is_refused(call, label):
    t = good_inputs()
    t[label] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=rf"^{Q}: {label} is zero everywhere"):
        call(t)


@pytest.mark.parametrize("call", CALLS)
def test_curvature_zero_in_places_is_accepted(call):
    t = good_inputs()
    t["h_pt"][0] = 0
    t["h_ft"][:, 1] = 0
    call(t)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("alpha", [-0.1, -1e-12, math.nan, math.inf, "0.5", None])
def test_bad_alpha_is_refused(call, alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got "):
        call(good_inputs(), alpha=alpha)


@pytest.mark.parametrize("call", HARD_CALLS)
@pytest.mark.parametrize("k", [-0.01, 1.01, 2, math.nan, math.inf, "0.5"])
def test_bad_k_is_refused(call, k):
    with pytest.raises(ValueError, match=r"k \(fraction of entries reverted\) must lie in \[0, 1\], got "):
        call(good_inputs(), k=k)


@pytest.mark.parametrize("call", CALLS)
def test_non_tensor_is_refused(call):
    t = good_inputs()
    t["h_pt"] = t["h_pt"].numpy()
    with pytest.raises(ValueError, match=rf"^{Q}: h_pt must be a torch.Tensor, got ndarray"):
        call(t)


def test_inputs_are_not_modified_by_a_refused_call():
    t = good_inputs()
    t["h_ft"][2, 3] = math.nan
    before = {n: v.clone() for n, v in t.items()}
    with pytest.raises(ValueError):
        call_merge_soft(t)
    for n in t:
        torch.testing.assert_close(t[n], before[n], rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# State dicts: names and shapes

def states():
    g = torch.Generator().manual_seed(1)
    shapes = {"enc.weight": (4, 3), "dec.weight": (2, 4), "dec.bias": (2,)}
    state_pt = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    state_ft = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    curv = {n: torch.rand(shapes[n], generator=g) + 0.1 for n in ("enc.weight", "dec.weight")}
    return state_pt, state_ft, curv, {n: h.clone() for n, h in curv.items()}


@pytest.mark.parametrize("k", [None, 0.5])
def test_state_dicts_with_different_names(k):
    state_pt, state_ft, curv_pt, curv_ft = states()
    state_pt["extra.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"different tensor names: only in state_pt \['extra\.weight'\], "
                                         r"only in state_ft \[\]"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)
    state_pt, state_ft, curv_pt, curv_ft = states()
    state_ft["lm_head.weight"] = state_ft.pop("dec.bias")
    with pytest.raises(ValueError, match=r"only in state_pt \['dec\.bias'\], only in state_ft \['lm_head\.weight'\]"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("k", [None, 0.5])
@pytest.mark.parametrize("name", ["enc.weight", "dec.bias"])   # with and without curvature
def test_state_dicts_with_different_shapes(k, name):
    state_pt, state_ft, curv_pt, curv_ft = states()
    state_ft[name] = torch.zeros(7)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: shape mismatch, state_pt has \([\d, ]+\) "
                                         r"but state_ft has \(7,\)"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("k", [None, 0.5])
def test_curvature_for_unknown_tensor(k):
    state_pt, state_ft, curv_pt, curv_ft = states()
    curv_pt["ghost.weight"] = torch.ones(3)
    curv_ft["ghost.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"not in the state dicts: \['ghost\.weight'\]"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("k", [None, 0.5])
def test_curvature_dicts_with_different_names(k):
    state_pt, state_ft, curv_pt, curv_ft = states()
    del curv_pt["dec.weight"]
    with pytest.raises(ValueError, match=r"curv_pt and curv_ft name different tensors: \['dec\.weight'\]"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("k", [None, 0.5])
@pytest.mark.parametrize("which", ["curv_pt", "curv_ft"])
def test_curvature_with_wrong_shape_in_a_state_dict(k, which):
    state_pt, state_ft, curv_pt, curv_ft = states()
    d = curv_pt if which == "curv_pt" else curv_ft
    d["dec.weight"] = torch.ones(4, 2)
    label = "h_pt" if which == "curv_pt" else "h_ft"
    with pytest.raises(ValueError, match=rf"^dec\.weight: shape mismatch, {label} has \(4, 2\) but w_ft has \(2, 4\)"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("k", [None, 0.5])
@pytest.mark.parametrize("which", ["curv_pt", "curv_ft"])
def test_zero_curvature_tensor_in_a_state_dict(k, which):
    """The authors' released Fisher files are all zeros; merging with them must fail, naming the tensor."""
    state_pt, state_ft, curv_pt, curv_ft = states()
    d = curv_pt if which == "curv_pt" else curv_ft
    d["dec.weight"] = torch.zeros(2, 4)
    label = "h_pt" if which == "curv_pt" else "h_ft"
    with pytest.raises(ValueError, match=rf"^dec\.weight: {label} is zero everywhere"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("k", [None, 0.5])
def test_nan_in_a_state_dict_tensor_names_it(k):
    state_pt, state_ft, curv_pt, curv_ft = states()
    state_pt["enc.weight"][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"^enc\.weight: w_pt contains NaN or Inf"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)
    state_pt, state_ft, curv_pt, curv_ft = states()
    curv_ft["dec.weight"][1, 1] = math.inf
    with pytest.raises(ValueError, match=r"^dec\.weight: h_ft contains NaN or Inf"):
        cgm_merge(state_pt, state_ft, curv_pt, curv_ft, 1.0, k)


@pytest.mark.parametrize("alpha, k, pattern", [(-1.0, None, "alpha must be"), (math.nan, 0.5, "alpha must be"),
                                               (1.0, 1.5, r"k \(fraction"), (1.0, -0.5, r"k \(fraction")])
def test_cgm_merge_bad_hyperparameters(alpha, k, pattern):
    with pytest.raises(ValueError, match=pattern):
        cgm_merge(*states(), alpha, k)


# ----------------------------------------------------------------------------------------------
# closed_form (toy chapters)

def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_closed_form_bad_inputs():
    w_pt, w_ft = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    H_pt, H_ft = spd(3, 0), spd(3, 1)
    with pytest.raises(ValueError, match=r"^closed_form: w_pt and w_ft must be vectors of one shape, got \(4,\)"):
        closed_form(torch.zeros(4, dtype=torch.float64), w_ft, H_pt, H_ft, 1.0)
    with pytest.raises(ValueError, match=r"^closed_form: w_pt and w_ft must be vectors of one shape, got \(1, 3\)"):
        closed_form(w_pt[None], w_ft[None], H_pt, H_ft, 1.0)
    with pytest.raises(ValueError, match=r"^closed_form: H_ft must be \(3, 3\) .*got \(3, 4\)"):
        closed_form(w_pt, w_ft, H_pt, torch.ones(3, 4, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"^closed_form: H_pt must be \(3, 3\) .*got \(3,\)"):
        closed_form(w_pt, w_ft, torch.ones(3, dtype=torch.float64), H_ft, 1.0)   # one vector, one matrix
    bad = H_pt.clone()
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match=r"^closed_form: H_pt contains NaN or Inf"):
        closed_form(w_pt, w_ft, bad, H_ft, 1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        closed_form(w_pt, w_ft, H_pt, H_ft, -1.0)
    # singular: alpha = 0 with a rank-deficient H_ft, exactly and up to rounding (a Gauss-Newton X^T X
    # from fewer samples than parameters)
    singular = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    X = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for H in (singular, X.T @ X):
        with pytest.raises(ValueError, match=r"^closed_form: H_ft \+ alpha\*H_pt is not positive definite"):
            closed_form(w_pt, w_ft, H_pt, H, 0.0)
        closed_form(w_pt, w_ft, H_pt, H, 0.1)      # fine once alpha*H_pt fills the missing direction


@pytest.mark.parametrize("label", ["w_pt", "w_ft"])
def test_closed_form_nan_weights(label):
    t = {"w_pt": torch.zeros(3, dtype=torch.float64), "w_ft": torch.ones(3, dtype=torch.float64)}
    t[label][1] = math.nan
    for H_pt, H_ft in [(spd(3, 0), spd(3, 1)), (torch.ones(3), torch.ones(3))]:
        with pytest.raises(ValueError, match=rf"{label} contains NaN or Inf"):
            closed_form(t["w_pt"], t["w_ft"], H_pt.to(torch.float64), H_ft.to(torch.float64), 1.0)


def test_closed_form_indefinite_is_refused():
    """H_ft + alpha*H_pt with a negative eigenvalue has no minimiser (the solve would return a saddle)."""
    w_pt, w_ft = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    H_ft = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    H_pt = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^closed_form: H_ft \+ alpha\*H_pt is not positive definite"):
        closed_form(w_pt, w_ft, H_pt, H_ft, 1.0)
    closed_form(w_pt, w_ft, H_pt, H_ft, 3.0)        # positive definite again
