"""Model Tailor and grafting against the properties that define them: the endpoints, the exact budget, what the
scores depend on, the OBS compensation against brute-force least squares, a toy model whose target loss
depends on a known set of entries (grafting must find it), refusals, and one run on a miniature model."""
from __future__ import annotations

import pytest
import torch

from cgm_min.cgm import revert_count
from cgm_min.merge import ActivationStats, MergeInputs, TargetData, TensorInputs, get_method, merge_state
from cgm_min.merge import tailor

SHAPES = {"a.weight": (6, 20), "b.weight": (5, 12), "b.bias": (9,), "norm.weight": (4,)}
MERGED = ["a.weight", "b.weight", "b.bias"]


def pair(seed=0, dtype=torch.float64, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    pt = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    ft = {n: pt[n] + 0.1 * torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    return {n: t.to(dtype) for n, t in pt.items()}, {n: t.to(dtype) for n, t in ft.items()}


def inputs_of(n_in, n_tok=64, rank=3, noise=0.05, seed=0):
    """Calibration inputs X (n_tok x n_in) with strongly correlated columns (rank `rank` plus noise)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n_tok, rank, generator=g, dtype=torch.float64)
    return Z @ torch.randn(rank, n_in, generator=g, dtype=torch.float64) + noise * torch.randn(
        n_tok, n_in, generator=g, dtype=torch.float64)


def stats(X):
    return ActivationStats(X.pow(2).sum(0).float(), (X.T @ X).float(), X.shape[0])


def acts_for(state, seed=0):
    return {n: stats(inputs_of(state[n].shape[1], seed=seed + i)) for i, n in enumerate(MERGED) if state[n].dim() == 2}


def tailor_one(w_pt, w_ft, X=None, **hp):
    act = stats(X) if X is not None else None
    return get_method("model_tailor").fn(TensorInputs("w", w_pt, w_ft, act=act), **hp)


def augmented(X):
    """X~ with X~^T X~ = the damped Hessian of model_tailor: [sqrt(2/n) X; sqrt(lam) I]."""
    H = 2.0 / X.shape[0] * X.T @ X
    lam = tailor.DAMPING * H.diagonal().mean()
    return torch.cat([X * (2.0 / X.shape[0]) ** 0.5, lam.sqrt() * torch.eye(X.shape[1], dtype=X.dtype)])


def output_error(W, w_ft, X):
    return float(((W.double() - w_ft.double()) @ X.T).pow(2).sum())


# ----------------------------------------------------------------------------------------------
# Model Tailor

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tailor_endpoints(dtype):
    """k = 0 keeps every fine-tuned entry (nothing to compensate), k = 1 reverts all: exactly, in w_ft's dtype."""
    pt, ft = pair(1, dtype)
    inputs = MergeInputs(activations=acts_for(ft))
    none = merge_state("model_tailor", pt, ft, names=MERGED, inputs=inputs, k=0.0)
    every = merge_state("model_tailor", pt, ft, names=MERGED, inputs=inputs, k=1.0)
    for n in MERGED:
        assert none[n].dtype == dtype and torch.equal(none[n], ft[n]), n
        assert torch.equal(every[n], pt[n]), n
    assert none["norm.weight"] is ft["norm.weight"]


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("k", [0.1, 0.37, 0.9])
def test_tailor_reverts_exactly_round_k_n_per_block(k, compensate):
    """Blocks of 128 input columns (300 = 128 + 128 + 44): each reverts exactly round(k n) entries to w_pt,
    the compensation moves only kept entries."""
    pt, ft = pair(2, shapes={"w": (7, 300)})
    out = tailor_one(pt["w"], ft["w"], inputs_of(300), k=k, compensate=compensate)
    reverted = out == pt["w"]
    for b0 in range(0, 300, tailor.BLOCK):
        block = reverted[:, b0:b0 + tailor.BLOCK]
        assert int(block.sum()) == revert_count(block.numel(), k), b0
    kept = ~reverted
    assert torch.equal(out[kept], ft["w"][kept]) != compensate     # compensated entries moved off w_ft


def test_tailor_salience_is_per_row_scale_free():
    """salience_weight = 1: the patch depends only on |delta|, z-scored within each row, so scaling one row's
    change by 100 changes nothing (a per-tensor magnitude rule would then keep only that row)."""
    pt, ft = pair(3, shapes={"w": (4, 30)})
    out = tailor_one(pt["w"], ft["w"], inputs_of(30), k=0.5, salience_weight=1.0, compensate=False)
    other_inputs = tailor_one(pt["w"], ft["w"], inputs_of(30, seed=9), k=0.5, salience_weight=1.0, compensate=False)
    assert torch.equal(out, other_inputs)
    ft_scaled = ft["w"].clone()
    ft_scaled[0] = pt["w"][0] + 100 * (ft["w"][0] - pt["w"][0])
    scaled = tailor_one(pt["w"], ft_scaled, inputs_of(30), k=0.5, salience_weight=1.0, compensate=False)
    assert torch.equal(scaled == pt["w"], out == pt["w"])
    assert int((out[0] != pt["w"][0]).sum()) < 30                     # row 0 does not take the whole patch


def test_tailor_one_row_without_sensitivity_is_magnitude():
    """One row, salience only: keep the entries with the largest |delta|, as magnitude reversion does."""
    pt, ft = pair(4, shapes={"w": (1, 40)})
    out = tailor_one(pt["w"], ft["w"], inputs_of(40), k=0.3, salience_weight=1.0, compensate=False)
    want = get_method("magnitude").fn(TensorInputs("w", pt["w"], ft["w"]), k=0.3)
    assert torch.equal(out, want)


def test_tailor_sensitivity_with_independent_inputs_is_the_weights_obs_score():
    """With uncorrelated inputs (diagonal X^T X), the code's sensitivity w_ft^2 / [H^-1]_jj is
    w_ft^2 (2/n ||X_j||^2 + damping): one row and salience_weight = 0 keep the largest of these."""
    g = torch.Generator().manual_seed(5)
    n_in, n_tok = 24, 50
    scale = torch.exp(torch.randn(n_in, generator=g, dtype=torch.float64))
    X = torch.zeros(n_tok * n_in, n_in, dtype=torch.float64)             # one input column non-zero per token
    for j in range(n_in):
        X[j * n_tok:(j + 1) * n_tok, j] = scale[j] * torch.randn(n_tok, generator=g, dtype=torch.float64)
    pt, ft = pair(6, shapes={"w": (1, n_in)})
    out = tailor_one(pt["w"], ft["w"], X, k=0.5, salience_weight=0.0, compensate=False)
    h = 2.0 / X.shape[0] * X.pow(2).sum(0)
    score = ft["w"][0] ** 2 * (h + tailor.DAMPING * h.mean())
    kept = torch.zeros(n_in, dtype=torch.bool)
    kept[score.argsort(descending=True)[:n_in - revert_count(n_in, 0.5)]] = True
    assert torch.equal(out[0] != pt["w"][0], kept)
    salience_only = tailor_one(pt["w"], ft["w"], X, k=0.5, salience_weight=1.0, compensate=False)
    assert not torch.equal(out, salience_only)                           # the two scores disagree here


def test_tailor_compensation_lowers_the_output_error():
    """The decoration changes only kept entries and lowers ||(W - W_ft) X^T||^2 on the calibration inputs
    against plain reversion of the same entries (one block: the same patch either way); by far when many
    entries are kept to absorb the change. (The authors' code, with the opposite sign, raises it.)"""
    pt, ft = pair(7, shapes={"w": (8, 40)})
    X = inputs_of(40, n_tok=200, rank=5)
    for k, most in ((0.3, 0.05), (0.7, 0.6), (0.9, 0.9)):
        plain = tailor_one(pt["w"], ft["w"], X, k=k, compensate=False)
        decorated = tailor_one(pt["w"], ft["w"], X, k=k)
        assert torch.equal(plain == pt["w"], decorated == pt["w"])
        assert output_error(decorated, ft["w"], X) < most * output_error(plain, ft["w"], X), k


def obs_with_mask(w_ft, w_pt, X, mask, block=tailor.BLOCK):
    """obs_revert with a fixed mask, statistics in float64."""
    U = tailor.inverse_hessian_factor(tailor.damped_hessian(ActivationStats(X.pow(2).sum(0), X.T @ X, X.shape[0])))
    return tailor.obs_revert(w_ft, w_pt, U, lambda w, sl: mask[:, sl], block)[0]


def test_obs_compensation_is_least_squares_when_reverted_columns_come_first():
    """Reverted entries left of every kept one in each row: the OBS sweep gives the constrained least-squares
    minimiser of ||(W - W_ft) X~^T||^2 (X~: the damped inputs), solved here by lstsq on the data."""
    pt, ft = pair(8, shapes={"w": (4, 9)})
    X = inputs_of(9, n_tok=30, rank=4)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for r, m in enumerate((0, 2, 5, 9)):
        mask[r, :m] = True
    out = obs_with_mask(ft["w"], pt["w"], X, mask, block=4)
    Xa = augmented(X)
    for r in range(4):
        R, K = mask[r], ~mask[r]
        a = torch.zeros(9, dtype=torch.float64)
        a[R] = pt["w"][r, R] - ft["w"][r, R]
        if K.any():
            a[K] = torch.linalg.lstsq(Xa[:, K], -(Xa[:, R] @ a[R]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(out[r], ft["w"][r] + a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("block", [3, 128])
def test_obs_compensation_is_sequential_least_squares(block):
    """Any mask: column by column, each reverted entry is set to w_pt and the entries right of it take the
    least-squares values given everything left of them (brute force by lstsq), whatever the block size."""
    pt, ft = pair(9, shapes={"w": (3, 8)})
    X = inputs_of(8, n_tok=25, rank=3)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    out = obs_with_mask(ft["w"], pt["w"], X, mask, block)
    Xa = augmented(X)
    for r in range(3):
        a = torch.zeros(8, dtype=torch.float64)
        for i in range(8):
            if mask[r, i]:
                a[i] = pt["w"][r, i] - ft["w"][r, i]
                if i + 1 < 8:
                    rhs = -(Xa[:, :i + 1] @ a[:i + 1]).unsqueeze(1)
                    a[i + 1:] = torch.linalg.lstsq(Xa[:, i + 1:], rhs).solution.squeeze(1)
        torch.testing.assert_close(out[r], ft["w"][r] + a, rtol=1e-9, atol=1e-10)


def test_tailor_without_statistics_falls_back_to_salience():
    """Biases and norms (1-D, no inputs): salience only, no compensation; one row, so magnitude reversion."""
    pt, ft = pair(10)
    inputs = MergeInputs(activations=acts_for(ft))
    out = merge_state("model_tailor", pt, ft, names=MERGED, inputs=inputs, k=0.4)
    mag = merge_state("magnitude", pt, ft, names=["b.bias"], k=0.4)
    assert torch.equal(out["b.bias"], mag["b.bias"])


def test_tailor_refuses_missing_or_wrong_statistics():
    pt, ft = pair(11)
    with pytest.raises(ValueError, match=r"^model_tailor needs activation statistics .*missing for \['a\.weight'"):
        merge_state("model_tailor", pt, ft, names=MERGED, k=0.2)
    acts = acts_for(ft)
    acts["b.weight"] = ActivationStats(acts["b.weight"].col_sq, None, 64)
    with pytest.raises(ValueError, match=r"^b\.weight: model_tailor needs the Gram matrix"):
        merge_state("model_tailor", pt, ft, names=MERGED, inputs=MergeInputs(activations=acts), k=0.2)
    acts["b.weight"] = stats(inputs_of(7))
    with pytest.raises(ValueError, match=r"^b\.weight: activation statistics with a \(7, 7\) Gram matrix, but the "
                                         r"weight has 12 input columns"):
        merge_state("model_tailor", pt, ft, names=MERGED, inputs=MergeInputs(activations=acts), k=0.2)


# ----------------------------------------------------------------------------------------------
# Grafting

class Toy(torch.nn.Module):
    """A model whose target loss, mean (x . w[:, 0] - y)^2, depends on the first column of w only."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 5))
        self.u = torch.nn.Parameter(torch.zeros(7))

    def forward(self, x, labels):
        from types import SimpleNamespace
        return SimpleNamespace(loss=((x @ self.w[:, 0] + 0 * self.u.sum() - labels) ** 2).mean())


def toy(seed=0):
    """w_pt = 0; w_ft solves the target exactly in w[:, 0] (|tau| ~ 0.5) and moved every other entry more
    (|tau| ~ 2), so the largest |tau| are the wrong entries. Each sample has one non-zero input, so the
    gradient pushes each entry of w[:, 0] towards c on its own."""
    g = torch.Generator().manual_seed(seed)
    pt = {"w": torch.zeros(4, 5), "u": torch.zeros(7)}
    c = 0.5 * torch.tensor([1.0, -1.0, 0.8, -1.2])
    ft = {"w": torch.cat([c[:, None], 2 + torch.rand(4, 4, generator=g)], dim=1),
          "u": -2 - torch.rand(7, generator=g)}
    x = torch.eye(4).repeat(8, 1) * (1 + torch.rand(32, 1, generator=g))   # one input per sample: no coupling
    target = TargetData(Toy(), [{"x": x[:16], "labels": x[:16] @ c}, {"x": x[16:], "labels": x[16:] @ c}])
    return pt, ft, MergeInputs(target=target)


@pytest.mark.parametrize("lr", [1e6, 1e7])
def test_grafting_finds_the_entries_the_target_loss_depends_on(lr):
    """At lr = 1e6 the right entries pass gamma = 0.5 without saturating: the budget must then drop the base
    patch's entries (gamma ~ 1 - 1e-4, zero gradient), not the ones the steps brought in."""
    pt, ft, inputs = toy()
    k = 1 - 4 / 27                                                      # graft 4 of the 27 entries
    base = merge_state("grafting", pt, ft, names=["w", "u"], inputs=inputs, k=k, steps=0)
    assert not (base["w"][:, 0] == ft["w"][:, 0]).any()                  # the base patch misses them all
    out = merge_state("grafting", pt, ft, names=["w", "u"], inputs=inputs, k=k, lr=lr)
    want = torch.zeros(4, 5, dtype=torch.bool)
    want[:, 0] = True
    assert torch.equal(out["w"] == ft["w"], want) and torch.equal(out["u"], pt["u"])
    assert float(inputs.target.loss(out)) < 1e-12


@pytest.mark.parametrize("k", [0.0, 0.3, 0.85, 1.0])
def test_grafting_budget_is_exact_over_all_tensors(k):
    """Every entry is w_pt or w_ft, and exactly n - round(k n) entries of the merge set are w_ft; with no step
    the graft is the largest |tau| over all tensors together (the base patch)."""
    pt, ft, inputs = toy(1)
    n = 27
    for steps in (0, 3):
        out = merge_state("grafting", pt, ft, names=["w", "u"], inputs=inputs, k=k, steps=steps)
        grafted = {m: out[m] == ft[m] for m in out}
        assert all(torch.equal(grafted[m] | (out[m] == pt[m]), torch.ones_like(grafted[m])) for m in out)
        assert sum(int(g.sum()) for g in grafted.values()) == n - revert_count(n, k)
        if steps == 0 and 0 < k < 1:
            tau = {m: (ft[m] - pt[m]).abs() for m in out}
            kept = torch.cat([tau[m][grafted[m]] for m in out])
            dropped = torch.cat([tau[m][~grafted[m]] for m in out])
            assert kept.min() >= dropped.max()


def test_grafting_is_deterministic_for_a_seed():
    pt, ft, inputs = toy(2)
    runs = [merge_state("grafting", pt, ft, names=["w", "u"], inputs=inputs, k=0.8, steps=2, lr=2e5, seed=s)
            for s in (3, 3)]
    assert all(torch.equal(runs[0][m], runs[1][m]) for m in ("w", "u"))


def test_grafting_refuses_missing_target_data():
    pt, ft, _ = toy()
    with pytest.raises(ValueError, match=r"^grafting needs target data \(MergeInputs\.target\); none given$"):
        merge_state("grafting", pt, ft, names=["w", "u"], k=0.5)


# ----------------------------------------------------------------------------------------------
# A miniature model

def test_both_run_on_a_miniature_and_touch_only_the_merge_set():
    from cgm_min.merge.statistics import activation_stats
    from cgm_min.world import models as mm, tasks as mt, training as tr

    processor = mm.build_processor("llava", mt.tokenizer_corpus(per_task=60))
    model = mm.build_model("llava", processor, size="test", seed=0)
    names = mm.merge_param_names(model)
    pt = {n: t.detach().clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ft = {n: t + 0.02 * torch.randn(t.shape, generator=g) if n in names else t for n, t in pt.items()}
    model.load_state_dict(ft)
    batches = tr.fisher_batches(processor, ("corners",), 4)
    acts = activation_stats(model, batches, names)                     # target inputs, at w_ft
    inputs = MergeInputs(activations=acts, target=TargetData(model, batches))
    n = sum(pt[m].numel() for m in names)
    for method, hp in (("model_tailor", {"k": 0.9}), ("grafting", {"k": 0.9, "steps": 2})):
        out = merge_state(method, pt, ft, names=names, inputs=inputs, **hp)
        assert list(out) == list(ft)
        for m in ft:
            if m in names:
                assert out[m].shape == ft[m].shape and out[m].dtype == ft[m].dtype and torch.isfinite(out[m]).all()
                assert not torch.equal(out[m], ft[m]), (method, m)
            else:
                assert out[m] is ft[m], (method, m)
        reverted = sum(int((out[m] == pt[m]).sum()) for m in names)
        if method == "grafting":
            assert reverted == revert_count(n, 0.9)
        else:                                                           # exact per block and per tensor
            assert reverted == sum(revert_count(pt[m].numel(), 0.9) for m in names)
